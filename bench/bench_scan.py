#!/usr/bin/env python3
"""Scan throughput: routing capture in the patched llama.cpp vs plain prompt evaluation vs transformers + hooks.

    .venv/bin/python bench/bench_scan.py [--prompts 48] [--tokens 48] [--rounds 3] [--gguf-type q8_0] [--quick]

One process, interleaved rounds, medians. Three ways to get, for every prompt token, the experts each MoE layer
selected, on the same random Qwen3-MoE (F32 weights in both engines, 2 threads each):

* ``capture``  -- ``Model.routing(tokens)`` (the patch's capture: ggml_cont outputs read after compute);
* ``plain``    -- ``Model.logits(tokens)``: the same prompt evaluation with no capture (the baseline);
* ``hooks``    -- transformers forward with a forward hook on every router module collecting the top-k ids,
  which is how MoTE/SteerMoE-style profiling is done in PyTorch.

Targets: capture/plain >= 0.9 (throughput ratio), capture/hooks >= 10. ``--gguf-type q8_0`` quantizes the GGUF with
the build's llama-quantize (what a user scans and ships); transformers keeps the F32 weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
              intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
QUICK = dict(hidden_size=128, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
             intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def make_model(quick: bool) -> tuple[Path, Path]:
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.runtime.native import vendored_llama_cpp
    from edge_mote.tiny import make_tiny_hf_model

    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    d = root / "bench-models" / ("scan-quick" if quick else "scan")
    hf, gguf = d / "hf", d / "model-f32.gguf"
    if not gguf.exists():
        vendor = vendored_llama_cpp()
        make_tiny_hf_model("qwen3moe", hf, vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0,
                           **(QUICK if quick else CONFIG))
        convert_hf_to_gguf(hf, gguf, vendor, outtype="f32")
    return hf, gguf


def quantize(gguf: Path, qtype: str) -> Path:
    import subprocess

    from edge_mote.runtime.native import tool

    out = gguf.with_name(f"model-{qtype}.gguf")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(tool("llama-quantize")), str(gguf), str(tmp), qtype.upper()], check=True,
                       capture_output=True)
        tmp.replace(out)
    return out


def prompts(n: int, n_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, min(vocab, 50000), size=n_tokens)] for _ in range(n)]


def run_capture(model, ps) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [model.routing(p) for p in ps]
    return time.perf_counter() - t0, out


def run_plain(model, ps) -> float:
    t0 = time.perf_counter()
    for p in ps:
        model.logits(p)
    return time.perf_counter() - t0


def run_hooks(hf_model, routers, ps) -> tuple[float, list]:
    import torch

    captured: dict[int, torch.Tensor] = {}

    def hook_for(il):
        def hook(_mod, _inp, out):
            captured[il] = out[2].detach().clone() if isinstance(out, tuple) and len(out) > 2 else out[1].detach().clone()
        return hook

    handles = [r.register_forward_hook(hook_for(il)) for il, r in routers.items()]
    results = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in ps:
            captured.clear()
            hf_model(input_ids=torch.tensor([p]), use_cache=False)
            results.append({il: t.numpy().reshape(len(p), -1) for il, t in captured.items()})
    dt = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return dt, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gguf-type", default="f32", help="f32, or a llama-quantize type such as q8_0 or q4_k_m")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.tokens, args.rounds = 8, 24, 2

    import torch

    import edge_mote

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracle"))
    from reference import load_reference_model, router_modules

    torch.set_num_threads(2)
    hf, gguf = make_model(args.quick)
    if args.gguf_type.lower() != "f32":
        gguf = quantize(gguf, args.gguf_type.lower())
    model = edge_mote.load(gguf, n_ctx=max(256, args.tokens + 8), n_threads=2)
    hf_model = load_reference_model(hf)
    routers = router_modules(hf_model)
    ps = prompts(args.prompts, args.tokens, model.info.n_vocab)
    n_tok = args.prompts * args.tokens

    # warm-up and agreement check: both capture paths must report the same experts
    _, cap = run_capture(model, ps[:2])
    _, hk = run_hooks(hf_model, routers, ps[:2])
    agree = np.mean([np.array_equal(np.sort(c.ids[il], 1), np.sort(h[il], 1))
                     for c, h in zip(cap, hk) for il in c.layers])
    run_plain(model, ps[:2])

    t = {"capture": [], "plain": [], "hooks": []}
    for _ in range(args.rounds):
        t["plain"].append(run_plain(model, ps))
        t["capture"].append(run_capture(model, ps)[0])
        t["hooks"].append(run_hooks(hf_model, routers, ps)[0])
    med = {k: statistics.median(v) for k, v in t.items()}
    tps = {k: n_tok / v for k, v in med.items()}
    size = gguf.stat().st_size / 2**20
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"# command: .venv/bin/python bench/bench_scan.py --gguf-type {args.gguf_type}")
    print(f"# bench_scan: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), 2 threads per engine")
    print(f"# model: random Qwen3-MoE {model.info.n_layer} layers x {model.info.n_expert} experts (top-"
          f"{max(model.info.n_expert_used.values())}), GGUF {args.gguf_type.upper()} ({size:.0f} MiB) vs transformers F32; {args.prompts} prompts x {args.tokens} tokens; "
          f"{args.rounds} rounds, medians")
    print(f"# expert ids agree (capture vs hooks): {agree:.0%} of (prompt, layer) pairs")
    print("| method | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| plain prompt eval (llama.cpp, no capture) | {tps['plain']:.0f} | 1.00 (baseline) |")
    print(f"| edge-mote capture (`Model.routing`) | {tps['capture']:.0f} | {tps['capture'] / tps['plain']:.3f} x plain (target >= 0.9) |")
    print(f"| transformers + forward hooks | {tps['hooks']:.0f} | capture is {tps['capture'] / tps['hooks']:.1f} x faster (target >= 10) |")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
