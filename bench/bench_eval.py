#!/usr/bin/env python3
"""Batched evaluation: ``Model.greedy_many`` / ``score_many`` (up to 16 sequences per ``llama_decode``) against one
sequence per decode (``Model.greedy`` / ``Model.logits``), the way ``edge-mote eval`` worked before.

    .venv/bin/python bench/bench_eval.py [--prompts 128] [--new 16] [--rounds 3] [--gguf MODEL]

Default model: the refusal organism of ``edge-mote demo`` (trained into the demo cache on first use, ~3 minutes),
prompts: its held-out behaviour and control sets rendered with its chat template. Each round runs both ways on the
same prompts, in alternating order: greedy continuations, then scoring of prompt + reference answer. Medians over
rounds; both ways must produce the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _model_and_prompts(gguf: str | None):
    from edge_mote.demo import demo_dir
    from edge_mote.organism.train import build_organism

    org = build_organism(demo_dir() / "organism", seed=0, progress=sys.stderr.isatty())
    sets = [org.sets["behavior_heldout"], org.sets["control_heldout"]]
    return Path(gguf) if gguf else org.gguf, sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gguf", help="another GGUF (prompts still come from the organism's held-out sets)")
    args = ap.parse_args(argv)

    import edge_mote
    from edge_mote.api import prepare_prompts
    from edge_mote.ftri.prompts import load_prompts

    gguf, sets = _model_and_prompts(args.gguf)
    with edge_mote.load(gguf, n_ctx=512, n_threads=2) as m:
        prepared = [p for s in sets for p in prepare_prompts(m, load_prompts(s))][: args.prompts]
        prompts = [p.tokens for p in prepared]
        scored = [p.tokens + (p.answer or []) for p in prepared]
        first = [len(p.tokens) - 1 for p in prepared]

        def one_by_one():
            new = [m.greedy(t, args.new)[0] for t in prompts]
            for s, f in zip(scored, first):
                m.logits(s)[f:]
            return new

        def batched():
            new = [n for n, _ in m.greedy_many(prompts, args.new, keep_logits=0)]
            m.score_many(scored, first, reduce=lambda i, rows: float(rows[:, 0].sum()))
            return new

        batched()  # make the batched context outside the timings
        times: dict[str, list[float]] = {"one": [], "batched": []}
        same = True
        for r in range(args.rounds):
            order = [("one", one_by_one), ("batched", batched)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                if name == "one":
                    ref = out
                else:
                    got = out
            same &= ref == got
    n_tok = sum(len(p) for p in prompts)
    one, bat = statistics.median(times["one"]), statistics.median(times["batched"])
    print(f"# bench_eval: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {gguf.name}, "
          f"{len(prompts)} prompts ({n_tok} prompt tokens), {args.new} new tokens each + scoring of the reference "
          f"answers, {args.rounds} rounds, medians; same tokens both ways: {'yes' if same else 'NO'}")
    print("| evaluation | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| one sequence per decode (`greedy`, `logits`) | {one:.2f} | 1.00 (baseline) |")
    print(f"| batched (`greedy_many`, `score_many`) | {bat:.2f} | {one / bat:.2f} x faster |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
