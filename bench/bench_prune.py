#!/usr/bin/env python3
"""Expert pruning (``edge-mote prune``): quality by saliency method on the organism, size and memory by fraction.

    .venv/bin/python bench/bench_prune.py [--calib 300] [--random-seeds 3] [--rss-rounds 3]

A. Quality on the refusal organism (Qwen3-MoE, 4 layers x 16 experts, top-2; edge_mote/organism): remove 25% and
   50% of each layer's experts chosen by REAP saliency, by routing frequency x gate weight, and at random (several
   seeds), saliency measured on ``--calib`` prompts drawn from the organism's training sets (behaviour + control).
   Measured against the unpruned file on the held-out sets: first-token KL and mean KL over the reference answers,
   answer perplexity (control prompts), first-token KL and decision-level refusal rate of greedy answers
   (behaviour prompts).
B. Size, routed-expert bytes, peak RSS and decode speed vs fraction pruned, on a random Qwen3-MoE with 64 experts
   (hidden and expert width 256, 3 layers, top-2), quantized Q4_K_M, pruned in place of its quantized tensors.
   Peak RSS: a fresh process loads the file, evaluates 64 tokens and decodes 32; its own peak (VmHWM: see
   RSS_SCRIPT for why not ``ru_maxrss``), median of ``--rss-rounds`` interleaved rounds, also minus the peak of the same process that
   imports everything but loads no model (what the model itself costs).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ship_common as SC  # noqa: E402

RSS_SCRIPT = r"""
import sys, time
import edge_mote
import edge_mote.runtime.model  # the library and its imports, also for the no-model baseline


def peak_rss():
    # VmHWM: the high-water mark of this process's own address space since exec. Not ru_maxrss: Linux carries the
    # peak of the pre-exec image (the forked/vforked copy of the parent, here a bench holding torch and the
    # organism: ~0.9 GB) into the exec'd child's ru_maxrss, so every file measured the same
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))


if sys.argv[1] == "-":
    print(peak_rss(), 0.0)
    raise SystemExit(0)
with edge_mote.load(sys.argv[1], n_ctx=256, n_threads=2) as m:
    toks = m.tokenize("The quick brown fox jumps over the lazy dog. " * 6, add_bos=False)[:64]
    m.logits(toks)
    t = time.perf_counter(); new, _ = m.greedy(toks[:8], 32, stop_at_eos=False); dt = time.perf_counter() - t
    rss = peak_rss()
print(rss, len(new) / dt)
"""


def run_measured(path) -> tuple[int, float]:
    """Peak RSS (bytes) of a fresh process that loads ``path`` ("-": none) and evaluates/decodes, and its decode
    tok/s (RSS_SCRIPT)."""
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"RSS probe failed on {path}: {res.stderr[-2000:]}")
    a, b = res.stdout.split()[-2:]
    return int(a), float(b)


def part_a(args, work: Path) -> list[dict]:
    from edge_mote.ship.prune import prune_model

    org = SC.organism()
    lines = []
    for name in ("behavior_train", "control_train"):
        lines += Path(org.sets[name]).read_text().splitlines()
    random.Random(0).shuffle(lines)
    calib = work / "calib.jsonl"
    calib.write_text("\n".join(lines[: args.calib]) + "\n")
    ctrl = SC.sequences(org.gguf, org.sets["control_heldout"])
    beh = SC.sequences(org.gguf, org.sets["behavior_heldout"])
    ref_c, ref_b = SC.run_model(org.gguf, ctrl), SC.run_model(org.gguf, beh, greedy=8)
    base_refusal = SC.refusal_rate(ref_b["greedy"])
    rows = []
    methods = [("reap", 0), ("frequency", 0)] + [("random", s) for s in range(args.random_seeds)]
    for frac in (0.25, 0.5):
        for method, seed in methods:
            out = work / f"pruned-{method}-{seed}-{frac}.gguf"
            t0 = time.perf_counter()
            r = prune_model(org.gguf, out, keep_ratio=1 - frac, calib=calib, saliency=method, seed=seed, n_threads=2)
            secs = time.perf_counter() - t0
            test_c, test_b = SC.run_model(out, ctrl), SC.run_model(out, beh, greedy=8)
            q = SC.quality(ref_c, test_c, ctrl)
            rows.append({"fraction": frac, "method": method, "seed": seed, "n_expert": r.n_expert_after,
                         "prune_seconds": secs, **q, "behavior_first_kl": SC.quality(ref_b, test_b, beh)["first_kl"],
                         "refusal": SC.refusal_rate(test_b["greedy"]), "base_refusal": base_refusal,
                         "dropped": {str(k): list(v) for k, v in r.dropped.items()}})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "dropped"}), file=sys.stderr)
            out.unlink()
    return rows


def part_b(args, work: Path) -> list[dict]:
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.runtime.native import vendored_llama_cpp
    from edge_mote.ship.inspect import inspect_tensors
    from edge_mote.ship.prune import prune_model
    from edge_mote.ship.quantize import quantize_model
    from edge_mote.tiny import make_tiny_hf_model

    vendor = vendored_llama_cpp()
    hf = make_tiny_hf_model("qwen3moe", work / "hf64", vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0,
                            hidden_size=256, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=2)
    f32 = convert_hf_to_gguf(hf, work / "e64-f32.gguf", vendor, outtype="f32")
    q = work / "e64-q4km.gguf"
    quantize_model(f32, q, "Q4_K_M")
    files = {0.0: q}
    for frac in (0.125, 0.25, 0.5, 0.75):
        n = int(64 * frac)
        drop = [(l, e) for l in range(3) for e in range(64 - n, 64)]
        files[frac] = prune_model(q, work / f"e64-q4km-p{frac}.gguf", drop=drop).output
    rss: dict[float, list[float]] = {f: [] for f in files}
    tps: dict[float, list[float]] = {f: [] for f in files}
    floor: list[float] = []
    for rnd in range(args.rss_rounds):
        for frac in (list(files) if rnd % 2 == 0 else list(reversed(files))):
            a, b = run_measured(files[frac])
            rss[frac].append(float(a))
            tps[frac].append(b)
        floor.append(float(run_measured("-")[0]))
    args.rss_floor = floor
    base = inspect_tensors(files[0.0])
    rows = []
    for frac, path in files.items():
        rep = inspect_tensors(path)
        rows.append({"fraction": frac, "bytes": Path(path).stat().st_size, "expert_bytes": rep.experts.bytes,
                     "file_shrink": 1 - Path(path).stat().st_size / Path(files[0.0]).stat().st_size,
                     "expert_shrink": 1 - rep.experts.bytes / base.experts.bytes,
                     "rss": rss[frac], "tok_s": tps[frac], "rss_floor": args.rss_floor})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=300, help="calibration prompts for saliency")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--rss-rounds", type=int, default=3)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as d:
        work = Path(d)
        a = [] if args.skip_a else part_a(args, work)
        b = [] if args.skip_b else part_b(args, work)
    print(f"machine: {SC.machine()}")
    if a:
        print(f"\nA. organism, held-out sets; unpruned refusal rate {a[0]['base_refusal']:.0%}")
        print("| pruned | saliency | experts left | control first-token KL | control answer KL | control ppl "
              "| behaviour first-token KL | refusal |")
        print("|---|---|---|---|---|---|---|---|")
        for frac in (0.25, 0.5):
            for method in ("reap", "frequency", "random"):
                rs = [r for r in a if r["fraction"] == frac and r["method"] == method]
                f = lambda k: SC.median_spread(r[k] for r in rs)  # noqa: E731
                print(f"| {frac:.0%} | {method}{' (%d seeds)' % len(rs) if len(rs) > 1 else ''} | "
                      f"{rs[0]['n_expert']} | {f('first_kl')} | {f('answer_kl')} | {f('ppl')} | "
                      f"{f('behavior_first_kl')} | {f('refusal')} |")
    if b:
        import statistics

        floor = statistics.median(b[0]["rss_floor"])
        print("\nB. random Qwen3-MoE, 64 experts x 3 layers, Q4_K_M")
        print(f"peak RSS of the same process without a model (Python, numpy, libllama): "
              f"{SC.median_spread(x / 2**20 for x in b[0]['rss_floor'])} MiB")
        print("| pruned | file MiB | file shrink | expert-tensor MiB | expert-tensor shrink / fraction "
              "| peak RSS MiB (median [range]) | peak RSS above the no-model process MiB | decode tok/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in b:
            ratio = r["expert_shrink"] / r["fraction"] if r["fraction"] else float("nan")
            print(f"| {r['fraction']:.1%} | {r['bytes'] / 2**20:.2f} | {r['file_shrink']:.1%} | "
                  f"{r['expert_bytes'] / 2**20:.2f} | {ratio:.3f} | {SC.median_spread(x / 2**20 for x in r['rss'])} | "
                  f"{(statistics.median(r['rss']) - floor) / 2**20:.1f} | {SC.median_spread(r['tok_s'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": a, "b": b}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
