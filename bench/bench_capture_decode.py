#!/usr/bin/env python3
"""Routing capture during token-by-token decoding: the patch's capture vs llama.cpp's generic eval callback.

    .venv/bin/python bench/bench_capture_decode.py [--tokens 64] [--rounds 7] [--quick]

Three contexts on one model (same parameters, 2 threads): plain decoding, decoding with the patch's routing capture
on (ids and weights read after every decode with ``llama_get_expert_capture``), and decoding with a ``cb_eval``
callback that asks for every ``ffn_moe_topk-<il>`` tensor and copies it out (the scheduler then splits the graph
at every MoE layer and synchronises there). Each round decodes the same tokens one at a time in every context, in
alternating order; medians over rounds. Both captures must report the same experts.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steering import TOPK_PREFIX, GgmlTensor, bench_model, bench_tokens, loaded_ggml_base  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 16, 2

    import llama_cpp

    import edge_mote
    from edge_mote.runtime import bindings as B

    gguf = bench_model(args.quick)
    m = edge_mote.load(gguf, n_ctx=args.tokens + 16, n_batch=64, n_threads=2, seed=0)
    lib = B.lib()
    toks = bench_tokens(args.tokens)
    ggml = loaded_ggml_base()
    name_off = GgmlTensor.name.offset
    cb_ids: list[dict[int, np.ndarray]] = []

    def on_tensor(t: int, ask: bool, _user) -> bool:
        if ask:
            return ctypes.string_at(t + name_off, len(TOPK_PREFIX)) == TOPK_PREFIX
        g = GgmlTensor.from_address(t)
        k, n, nb0, nb1 = g.ne[0], g.ne[1], g.nb[0], g.nb[1]
        nbytes = (k - 1) * nb0 + (n - 1) * nb1 + 4
        buf = np.empty(nbytes // 4, dtype=np.int32)
        ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
        cb_ids[-1][int(g.name[len(TOPK_PREFIX):])] = np.lib.stride_tricks.as_strided(buf, (n, k), (nb1, nb0)).copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    contexts = {}
    for name in ("plain", "capture", "callback"):
        params = llama_cpp.llama_context_params.from_buffer_copy(m._llm.context_params)
        if name == "callback":
            params.cb_eval, params.cb_eval_user_data = callback, None
        c = llama_cpp.llama_init_from_model(m._mp, params)
        if name == "capture":
            B.check(lib.llama_set_expert_capture(c, True), "capture")
        contexts[name] = c
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    layers = m.info.moe_layers
    ids_p, w_p, k = ctypes.POINTER(ctypes.c_int32)(), ctypes.POINTER(ctypes.c_float)(), ctypes.c_int32()

    def decode_all(name: str) -> list[dict[int, np.ndarray]]:
        c = contexts[name]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(c), True)
        got: list[dict[int, np.ndarray]] = []
        for pos, tok in enumerate(toks):
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tok, pos, 1, 1
            batch.seq_id[0][0] = 0
            batch.n_tokens = 1
            if name == "callback":
                cb_ids.append({})
            if llama_cpp.llama_decode(c, batch) != 0:
                raise SystemExit("llama_decode failed")
            if name == "capture":
                row = {}
                for il in layers:
                    n = B.check(lib.llama_get_expert_capture(c, il, ctypes.byref(ids_p), ctypes.byref(w_p),
                                                             ctypes.byref(k)), "capture")
                    row[il] = np.ctypeslib.as_array(ids_p, shape=(n * k.value,)).reshape(n, k.value).copy()
                got.append(row)
        if name == "callback":
            got, cb_ids[:] = list(cb_ids), []
        return got

    for name in contexts:  # warm-up
        decode_all(name)
    times = {name: [] for name in contexts}
    results = {}
    for rnd in range(args.rounds):
        for name in (list(contexts) if rnd % 2 == 0 else list(reversed(list(contexts)))):
            t0 = time.perf_counter()
            results[name] = decode_all(name)
            times[name].append(time.perf_counter() - t0)
    agree = all(np.array_equal(np.sort(a[il], 1), np.sort(b[il], 1))
                for a, b in zip(results["capture"], results["callback"]) for il in layers)
    med = {n: statistics.median(v) / args.tokens * 1000 for n, v in times.items()}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"### Routing capture while decoding ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(f"Command: `.venv/bin/python bench/bench_capture_decode.py{' --quick' if args.quick else ''}`  ")
    print(f"Machine: {os.cpu_count()} cores ({cpu}), load average at end {os.getloadavg()[0]:.2f}; 2 threads  ")
    print(f"Model: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), {len(layers)} MoE layers; {args.tokens} single-token "
          f"decodes x {args.rounds} rounds, medians; expert ids of both captures identical: {'yes' if agree else 'NO'}\n")
    print("| decoding | ms / token | vs plain | vs capture |")
    print("|---|---:|---:|---:|")
    for name, label in (("plain", "plain, no capture"), ("capture", "edge-mote routing capture"),
                        ("callback", "llama.cpp `cb_eval` on `ffn_moe_topk-<il>`")):
        print(f"| {label} | {med[name]:.2f} | {med[name] / med['plain']:.3f} | {med[name] / med['capture']:.3f} |")
    llama_cpp.llama_batch_free(batch)
    for c in contexts.values():
        llama_cpp.llama_free(c)
    m.close()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
