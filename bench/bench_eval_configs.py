#!/usr/bin/env python3
"""The demo's evaluation (``edge-mote demo --top 2,4``: 25 configurations, modes off and on on the organism's 391 held-out prompts)
with all configurations sharing decodes -- every sequence carrying its own steering (issue #11) -- against one
configuration after another (the protocol before per-sequence steering), in one process, rounds interleaved.

    .venv/bin/python bench/bench_eval_configs.py [--rounds 2] [--top 2,4] [--random-trials 5]

Both ways must give the same table, to the digit (compared as the rounded JSON rows). Needs the demo's organism
and scan (``edge-mote demo`` makes them in ``~/.cache/edge-mote/demo``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top", default="2,4")
    ap.add_argument("--random-trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import edge_mote
    from edge_mote.api import prepare_prompts, scan_ranking
    from edge_mote.demo import demo_dir
    from edge_mote.evaluate.protocol import evaluate
    from edge_mote.ftri.prompts import load_prompts

    d = demo_dir()
    org, scan = d / "organism", d / "scan.json"
    if not scan.exists():
        raise SystemExit(f"{scan} not found: run `edge-mote demo` first")
    ranking, _ = scan_ranking(scan)
    tops = [int(x) for x in args.top.split(",")]
    with edge_mote.load(org / "organism.gguf", n_ctx=512, n_threads=args.threads) as m:
        b = prepare_prompts(m, load_prompts(org / "behavior_heldout.jsonl"))
        c = prepare_prompts(m, load_prompts(org / "control_heldout.jsonl"))

        def run(batch: bool):
            t0 = time.perf_counter()
            rep = evaluate(m, b, c, ranking, tops=tops, modes=("off", "on"), random_trials=args.random_trials,
                           seed=0, max_new=16,
                           batch_configurations=batch)
            return time.perf_counter() - t0, json.dumps([r.to_dict() for r in rep.rows], sort_keys=True)

        times = {True: [], False: []}
        tables = set()
        for r in range(args.rounds):
            for batch in ((True, False) if r % 2 == 0 else (False, True)):
                dt, table = run(batch)
                times[batch].append(dt)
                tables.add(table)
                print(f"round {r + 1}: {'all configurations batched' if batch else 'one configuration at a time'}"
                      f" {dt:.1f} s", file=sys.stderr)
    ratios = [a / b for a, b in zip(times[False], times[True])]
    n_configs = 1 + len(tops) * 2 * (1 + args.random_trials)  # the demo's modes: off, on
    print(f"\neval of {n_configs} configurations x {len(b) + len(c)} prompts (organism, {args.threads} threads), "
          f"{args.rounds} rounds\n")
    print("| way | seconds (median) |\n|---|---|")
    print(f"| one configuration after another | {statistics.median(times[False]):.1f} |")
    print(f"| all configurations in shared decodes | {statistics.median(times[True]):.1f} |")
    print(f"\nspeed-up {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"tables identical: {len(tables) == 1}")
    return 0 if len(tables) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
