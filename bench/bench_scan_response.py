#!/usr/bin/env python3
"""Scan with the response window: ``edge-mote scan --tokens response --max-new 32`` (the library's ``run_scan`` on the
Model's batched decode surface) against transformers' batched ``generate`` with forward hooks on every router.

    .venv/bin/python bench/bench_scan_response.py [--rounds 3] [--prompts 16] [--new 32] [--threads 2] [--quick]

Model: a random Qwen3-MoE of ~260M parameters (8 layers, 64 experts, top-8, hidden 512), GGUF quantized to Q4_K_M
with the build's llama-quantize; transformers runs the same weights in F32 (its CPU path). Both produce, for every
generated token of every prompt, the experts each MoE layer selected. One process, 2 threads each, rounds
interleaved (alternating which goes first); throughput = generated tokens / wall time; ratio per round, median and
range. Target (issue #11): edge-mote >= 10x transformers + hooks. A third engine bounds what the scan can reach:
the same Model's batched greedy decoding of the same prompts with no capture and no statistics (plain llama.cpp
decodes, unsteered graph).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256,
              intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
QUICK = dict(hidden_size=128, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
             intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
PROMPTS = ["Tell me about the history of {}.", "How do I cook {} at home?", "Write a short poem about {}.",
           "What is the best way to learn {}?"]
TOPICS = ["rivers", "bread", "chess", "the moon"]


def make_model(quick: bool) -> tuple[Path, Path]:
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.runtime.native import tool, vendored_llama_cpp
    from edge_mote.tiny import make_tiny_hf_model

    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    d = root / "bench-models" / ("scan-response-quick" if quick else "scan-response")
    hf, f32, q4 = d / "hf", d / "model-f32.gguf", d / "model-q4_k_m.gguf"
    if not q4.exists():
        vendor = vendored_llama_cpp()
        if not f32.exists():
            make_tiny_hf_model("qwen3moe", hf, vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0,
                               **(QUICK if quick else CONFIG))
            convert_hf_to_gguf(hf, f32, vendor, outtype="f32")
        tmp = q4.with_suffix(".tmp")
        subprocess.run([str(tool("llama-quantize")), str(f32), str(tmp), "Q4_K_M"], check=True, capture_output=True)
        os.replace(tmp, q4)
    return hf, q4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import edge_mote
    from edge_mote.ftri.scan import run_scan

    torch.set_num_threads(args.threads)
    hf, gguf = make_model(args.quick)
    texts = [PROMPTS[i % 4].format(TOPICS[(i // 4) % 4]) for i in range(args.prompts)]
    half = args.prompts // 2

    tok = AutoTokenizer.from_pretrained(hf)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    hf_model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    routes: list = []

    def hook(_mod, _inp, out):
        logits = out[0] if isinstance(out, tuple) else out
        routes.append(torch.topk(logits, hf_model.config.num_experts_per_tok, dim=-1).indices)

    for layer in hf_model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)

    def run_hf() -> tuple[int, float]:
        routes.clear()
        batch = tok(texts, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(**batch, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
        return int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]), dt

    with edge_mote.load(gguf, n_ctx=256, n_threads=args.threads) as m:
        def run_em() -> tuple[int, float]:
            t0 = time.perf_counter()
            res = run_scan(m, texts[:half], texts[half:], tokens="response", max_new=args.new, raw=True,
                           progress=False, n_boot=1)
            dt = time.perf_counter() - t0
            return sum(r.n_response_tokens or 0 for r in res.prompts), dt

        prompt_tokens = [m.encode_prompt(t) for t in texts]  # as the scan tokenizes raw prompts

        def run_plain() -> tuple[int, float]:
            t0 = time.perf_counter()
            outs = m.greedy_many(prompt_tokens, args.new, keep_logits=0)
            dt = time.perf_counter() - t0
            return sum(len(new) for new, _ in outs), dt

        run_em(), run_hf(), run_plain()  # warm-up
        rows = []
        for r in range(args.rounds):
            order = [("em", run_em), ("hf", run_hf), ("plain", run_plain)]
            order = order[r % 3:] + order[: r % 3]
            res = {}
            for name, fn in order:
                n, dt = fn()
                res[name] = (n, dt, n / dt)
            rows.append(res)
            print(f"round {r + 1}: edge-mote {res['em'][2]:.0f} tok/s ({res['em'][0]} tokens), "
                  f"transformers+hooks {res['hf'][2]:.0f} tok/s ({res['hf'][0]} tokens), "
                  f"plain batched decode {res['plain'][2]:.0f} tok/s ({res['plain'][0]} tokens)", file=sys.stderr)
    ratios = [row["em"][2] / row["hf"][2] for row in rows]
    ceiling = [row["plain"][2] / row["hf"][2] for row in rows]
    of_plain = [row["em"][2] / row["plain"][2] for row in rows]
    params = sum(p.numel() for p in hf_model.parameters()) / 1e6
    print(f"\nscan --tokens response --max-new {args.new}, {args.prompts} prompts, {args.threads} threads; "
          f"random Qwen3-MoE {params:.0f}M params ({gguf.stat().st_size / 1e6:.0f} MB Q4_K_M GGUF; transformers F32)\n")
    print("| engine | generated tok/s (median) |\n|---|---|")
    print(f"| edge-mote scan (batched, capture) | {statistics.median(r['em'][2] for r in rows):.0f} |")
    print(f"| transformers generate + router hooks | {statistics.median(r['hf'][2] for r in rows):.0f} |")
    print(f"| plain batched greedy decode, no capture (same Model) | {statistics.median(r['plain'][2] for r in rows):.0f} |")
    print(f"\nratio edge-mote / transformers: {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}, {args.rounds} rounds); target >= 10")
    print(f"ratio plain decode / transformers (the scan's ceiling): {statistics.median(ceiling):.2f} "
          f"(range {min(ceiling):.2f}-{max(ceiling):.2f}); scan / plain decode: {statistics.median(of_plain):.2f} "
          f"(range {min(of_plain):.2f}-{max(of_plain):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
