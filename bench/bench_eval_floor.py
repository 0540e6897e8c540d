#!/usr/bin/env python3
"""Where the demo's evaluation spends its time, and the floor its output layer sets (issue #11's ">= 3x" target).

    .venv/bin/python bench/bench_eval_floor.py [--top 2,4] [--reps 40] [--threads 2]

Runs the demo's eval (``edge-mote demo``'s organism, scan and held-out sets; modes off/on, 5 random trials) once with
every ``llama_decode`` counted (tokens, output rows, seconds inside), then measures on the same model and context
what one output row costs: decodes of 31 tokens with 31 vs 2 output rows, interleaved, ``--reps`` each, medians.
Prints the eval's seconds, the share inside llama_decode, and the seconds its output rows alone take at that cost
(the organism's tied 50257 x 128 F32 output layer, computed per output row) -- a floor no scheduling of the same
decodes gets under.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", default="2,4")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import edge_mote
    from edge_mote.api import prepare_prompts, scan_ranking
    from edge_mote.demo import demo_dir
    from edge_mote.evaluate.protocol import evaluate
    from edge_mote.ftri.prompts import load_prompts
    from edge_mote.runtime.parallel import ParallelContext

    d = demo_dir()
    if not (d / "scan.json").exists():
        raise SystemExit(f"no demo in {d}: run `edge-mote demo` first")
    count = {"decodes": 0, "tokens": 0, "rows": 0, "seconds": 0.0}
    plain_decode = ParallelContext.decode

    def counted(self, entries):
        t0 = time.perf_counter()
        plain_decode(self, entries)
        count["seconds"] += time.perf_counter() - t0
        count["decodes"] += 1
        count["tokens"] += len(entries)
        count["rows"] += sum(1 for e in entries if e[3])

    org = d / "organism"
    ranking, _ = scan_ranking(d / "scan.json")
    with edge_mote.load(d / "organism-steered.gguf", n_ctx=512, n_threads=args.threads) as m:
        b = prepare_prompts(m, load_prompts(org / "behavior_heldout.jsonl"))
        c = prepare_prompts(m, load_prompts(org / "control_heldout.jsonl"))
        ParallelContext.decode = counted
        try:
            t0 = time.perf_counter()
            evaluate(m, b, c, ranking, tops=[int(x) for x in args.top.split(",")], modes=("off", "on"),
                     random_trials=5, seed=0, max_new=16)
            total = time.perf_counter() - t0
        finally:
            ParallelContext.decode = plain_decode

        # one output row: 31-token decodes with 31 vs 2 output rows, interleaved
        with m.open_batch(n_seq=31, n_ctx_seq=64, n_batch=64) as pc:
            times: dict[int, list[float]] = {31: [], 2: []}
            for _ in range(args.reps):
                for n_out in (31, 2):
                    pc.clear_all()
                    entries = [(100 + s, 0, s, s < n_out) for s in range(31)]
                    t0 = time.perf_counter()
                    pc.decode(entries)
                    times[n_out].append(time.perf_counter() - t0)
        per_row = (statistics.median(times[31]) - statistics.median(times[2])) / 29

    print(f"demo eval --top {args.top} (modes off/on, 5 random trials), {args.threads} threads: {total:.1f} s")
    print(f"  inside llama_decode: {count['seconds']:.1f} s ({count['seconds'] / total:.0%}) in {count['decodes']} "
          f"decodes of {count['tokens']} tokens, {count['rows']} output rows")
    print(f"  one output row: {per_row * 1e3:.3f} ms (31-token decodes, 31 vs 2 rows, {args.reps} reps, medians "
          f"{statistics.median(times[31]) * 1e3:.2f} / {statistics.median(times[2]) * 1e3:.2f} ms)")
    floor = count["rows"] * per_row
    print(f"  output rows alone: {floor:.1f} s = {floor / total:.0%} of the eval; an eval 3x faster than X s needs "
          f"X >= {3 * floor:.0f} s even if nothing else took time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
