#!/usr/bin/env python3
"""The demo's evaluation (``edge-mote demo --top 2,4``: 25 configurations, modes off/on, on the organism's 391
held-out prompts) with this checkout against an earlier edge-mote (its source tree and its patched libllama), in
one run, rounds interleaved -- issue #11's "≥ 3x faster than the evaluation before per-sequence steering, same table".

    git worktree add /tmp/before f67b59b            # the last commit before per-sequence steering
    # its patched llama.cpp, in a cache of its own (the build folder is keyed by the sdist, not by the patch):
    (cd /tmp/before && EDGE_MOTE_CACHE=/tmp/before-cache /path/to/checkout/.venv/bin/python native/build.py --no-install)
    .venv/bin/python bench/bench_eval_before_after.py --before-src /tmp/before \
        --before-lib /tmp/before-cache/build-<hash>/cmake-build/bin [--rounds 1] [--top 2,4]

Run on 2026-12-06 (BENCHMARKS.md, per-sequence steering section).
Each evaluation runs in a child process (the earlier tree on PYTHONPATH, its libllama through LLAMA_CPP_LIB_PATH).
Prints both times, the ratio and whether the printed tables (the demo's 2-3 decimals) are identical, and where not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
src, top, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if src:
    sys.path.insert(0, src)
import edge_mote
from edge_mote.api import prepare_prompts, scan_ranking
from edge_mote.demo import demo_dir
from edge_mote.evaluate.protocol import evaluate
from edge_mote.ftri.prompts import load_prompts
assert not src or edge_mote.__file__.startswith(src), edge_mote.__file__
d = demo_dir()
org = d / "organism"
ranking, _ = scan_ranking(d / "scan.json")
with edge_mote.load(d / "organism-steered.gguf", n_ctx=512, n_threads=threads) as m:
    b = prepare_prompts(m, load_prompts(org / "behavior_heldout.jsonl"))
    c = prepare_prompts(m, load_prompts(org / "control_heldout.jsonl"))
    t0 = time.perf_counter()
    rep = evaluate(m, b, c, ranking, tops=[int(x) for x in top.split(",")], modes=("off", "on"), random_trials=5,
                   seed=0, max_new=16)
    dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rows": [r.to_dict() for r in rep.rows]}))
"""

# the demo's table: these metrics, printed with 2 (rates) or 3 (KL, ppl) decimals
PRINTED = {"behavior_decision": 2, "behavior_phrase": 2, "compliant": 2, "reference_match": 2, "control_decision": 2,
           "control_phrase": 2, "kl_first": 3, "kl_mean": 3, "ppl_control": 3, "ppl_behavior": 3}


def printed(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        cells = [r["name"]]
        for k, nd in PRINTED.items():
            v = r.get(k)
            cells.append(None if v is None else f"{v:.{nd}f}")
            if "sd" in r:
                sd = r["sd"].get(k)
                cells.append(None if sd is None else f"{sd:.{nd}f}")
        out.append(tuple(cells))
    return out


def run(src: str, lib: str | None, top: str, threads: int) -> dict:
    env = dict(os.environ)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    res = subprocess.run([sys.executable, "-c", CHILD, src, top, str(threads)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-src", required=True)
    ap.add_argument("--before-lib", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--top", default="2,4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {"before": [], "now": []}
    tables: dict[str, list] = {}
    for r in range(args.rounds):
        for way in (("before", "now") if r % 2 == 0 else ("now", "before")):
            out = run(args.before_src if way == "before" else "", args.before_lib if way == "before" else None,
                      args.top, args.threads)
            times[way].append(out["seconds"])
            tables[way] = printed(out["rows"])
            print(f"round {r + 1}: {way} {out['seconds']:.1f} s", file=sys.stderr, flush=True)
    ratios = [b / n for b, n in zip(times["before"], times["now"])]
    print(f"| eval (--top {args.top}, 391 prompts, {args.threads} threads) | seconds (median) |\n|---|---|")
    for way in times:
        print(f"| {way} | {statistics.median(times[way]):.1f} |")
    print(f"\nspeed-up {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")
    same = tables["before"] == tables["now"]
    print(f"printed tables identical: {same}")
    if not same:
        for a, b in zip(tables["before"], tables["now"]):
            if a != b:
                print(f"  before {a}\n  now    {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
