#!/usr/bin/env python3
"""Decode speed with per-sequence steering (issue #11): 16 sequences decoded together, one token each per
``llama_decode``, under

* ``mixed``  -- 16 different steerings (sequence i: its own 10 experts OFF), one decode for all (per-token rows);
* ``shared`` -- the 16 sequences share one steering (10 experts OFF, context-wide);
* ``plain``  -- the patched library unsteered;
* ``stock``  -- the UNPATCHED libllama (``LLAMA_CPP_LIB_PATH``), unsteered.

Model: the cached ~400 MB random Qwen3-MoE of ``bench_steering.py`` (F16, 8 layers x 32 experts, top-4). Each round
runs one stock worker process and one patched worker process (which measures mixed / shared / plain in rotating
order), alternating which process goes first; ratios are per round, reported as median and range.

    .venv/bin/python bench/bench_per_sequence.py [--rounds 5] [--steps 32] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

N_SEQ = 16
PROMPT = 32
N_OFF = 10


def worker(spec: dict) -> dict:
    import numpy as np
    import llama_cpp

    C = llama_cpp
    C.llama_backend_init()
    model = C.llama_model_load_from_file(spec["gguf"].encode(), C.llama_model_default_params())
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = N_SEQ * (PROMPT + spec["steps"] + 8), 512, 512
    cp.n_seq_max, cp.kv_unified = N_SEQ, True
    cp.n_threads = cp.n_threads_batch = spec["threads"]
    ctx = C.llama_init_from_model(model, cp)
    mem = C.llama_get_memory(ctx)
    batch = C.llama_batch_init(512, 0, 1)
    rng = np.random.default_rng(7)
    prompts = rng.integers(1000, 50000, size=(N_SEQ, PROMPT))
    n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))

    def decode(entries):
        for i, (t, p, s, o) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), p, 1, o
            batch.seq_id[i][0] = s
        batch.n_tokens = len(entries)
        assert C.llama_decode(ctx, batch) == 0

    def run() -> float:
        C.llama_memory_clear(mem, True)
        decode([(prompts[s, j], j, s, j == PROMPT - 1) for s in range(N_SEQ) for j in range(PROMPT)])
        nxt = np.argmax(np.ctypeslib.as_array(C.llama_get_logits(ctx), shape=(N_SEQ, n_vocab)), axis=1)
        t0 = time.perf_counter()
        for step in range(spec["steps"]):
            decode([(nxt[s], PROMPT + step, s, True) for s in range(N_SEQ)])
            nxt = np.argmax(np.ctypeslib.as_array(C.llama_get_logits(ctx), shape=(N_SEQ, n_vocab)), axis=1)
        return N_SEQ * spec["steps"] / (time.perf_counter() - t0)

    out = {}
    if spec["lib"] == "stock":
        run()  # warm-up
        out["stock"] = run()
        return out
    from edge_mote.runtime import bindings as B

    lib = B.lib()
    L, E = lib.llama_model_n_layer_all(model), lib.llama_model_n_expert(model)
    moe = [il for il in range(L) if lib.llama_model_layer_is_moe(model, il) == 1]

    def state_for(seed: int):
        st = np.zeros((L, E), np.int8)
        r = np.random.default_rng(seed)
        for k in r.choice(len(moe) * E, size=N_OFF, replace=False):
            st[moe[k // E], k % E] = B.LLAMA_EXPERT_STATE_OFF
        return np.ascontiguousarray(st)

    def set_mode(mode: str):
        lib.llama_clear_expert_steering(ctx)
        for s in range(N_SEQ):
            lib.llama_clear_expert_steering_seq(ctx, s)
        if mode == "shared":
            st = state_for(0)
            assert lib.llama_set_expert_steering(ctx, B.as_ptr(st, ctypes.c_int8), None, 0.01, L, E) == 0
        elif mode == "mixed":
            for s in range(N_SEQ):
                st = state_for(s)
                assert lib.llama_set_expert_steering_seq(ctx, s, B.as_ptr(st, ctypes.c_int8), None, 0.01, L, E) == 0

    modes = ["mixed", "shared", "plain"]
    k = spec["round"] % 3
    for mode in modes[k:] + modes[:k]:
        set_mode(mode)
        run()  # warm-up: builds the graph of this mode
        out[mode] = run()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the small bench model (smoke test)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_steering import bench_model
    from edge_mote.runtime import native

    gguf = bench_model(args.quick)
    stock_dir = native.stock_lib_dir()
    if stock_dir is None:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "native" / "build.py"),
                        "--stock-only"], check=True)
        native.manifest.cache_clear()
        stock_dir = native.stock_lib_dir()
    rows = []
    for r in range(args.rounds):
        res = {}
        order = ["stock", "patched"] if r % 2 == 0 else ["patched", "stock"]
        for lib in order:
            env = dict(os.environ)
            if lib == "stock":
                env["LLAMA_CPP_LIB_PATH"] = str(stock_dir)
            spec = {"gguf": str(gguf), "lib": lib, "steps": args.steps, "threads": args.threads, "round": r}
            p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                               text=True, env=env, check=True)
            res.update(json.loads(p.stdout.strip().splitlines()[-1]))
        rows.append(res)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in sorted(res.items())), file=sys.stderr)

    def ratio(a: str, b: str) -> str:
        xs = [row[a] / row[b] for row in rows]
        return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

    mb = gguf.stat().st_size / 1e6
    print(f"\n{N_SEQ} sequences, 1 token each per decode, {args.steps} steps, {args.threads} threads, "
          f"{gguf.name} ({mb:.0f} MB), {args.rounds} rounds; median (range) of per-round ratios\n")
    print("| measure | tok/s (median) | ratio | target |")
    print("|---|---|---|---|")
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print(f"| 16 steerings (mixed) vs 1 shared steering | {med['mixed']:.1f} vs {med['shared']:.1f} | "
          f"{ratio('mixed', 'shared')} | >= 0.95 |")
    print(f"| 16 steerings (mixed) vs stock unsteered | {med['mixed']:.1f} vs {med['stock']:.1f} | "
          f"{ratio('mixed', 'stock')} | >= 0.93 |")
    print(f"| patched unsteered vs stock unsteered | {med['plain']:.1f} vs {med['stock']:.1f} | "
          f"{ratio('plain', 'stock')} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
