#!/usr/bin/env python3
"""Quantization (``edge-mote quantize``): recipe moe vs uniform, and whether a steering profile survives shipping.

    .venv/bin/python bench/bench_quantize.py [--random-trials 3] [--max-new 8] [--time-rounds 3]

The refusal organism (edge_mote/organism: Qwen3-MoE, hidden 128, expert width 64) is too narrow for K-quants
(256-wide blocks: llama.cpp would fall back to Q5_0/Q8_0), so it is first widened losslessly to hidden 256 and
expert width 256 by zero-padding (RMSNorm weights x sqrt(128/256) and eps x 128/256 keep every activation equal;
the padded expert units compute silu(0) x 0 = 0); the bench prints how close the widened file's logits are to the
organism's. Its profile ``no-refusal`` (the scan's top-2 refusal experts OFF, as ``edge-mote demo`` makes it) is
stored in the F32 file, which is then quantized to Q8_0, Q4_K_M, Q3_K_M (llama.cpp's mixes) and with ``--recipe
moe`` at Q4_K_M and Q3_K_M. For every file: size, bits/weight of the routed experts, the types the expert tensors
got, KL vs F32 (first token and over the reference answers of the held-out control prompts), routing fidelity
(share of (token, MoE layer) top-k sets identical to F32's on the control prompts), and the profile's effect
measured by edge_mote.evaluate (decision-level refusal unsteered / with the profile's experts OFF / random-2 OFF,
first-token KL of the profile on the control prompts).

Wall time of ``edge-mote quantize`` (the whole command: Python start-up, header checks, llama-quantize, metadata
comparison, fsync, rename) vs running ``llama-quantize`` directly on the same file, Q4_K_M with 2 threads,
interleaved rounds (the order rotates every round; the page cache is flushed with ``sync`` outside the timed region
between runs; one untimed warm-up run each, which also writes edge-mote's byte-code caches), medians: on a realistic file -- the ~260M-parameter random Qwen3-MoE
of bench_steering.py (F16, a few hundred MB) -- and on the small widened organism (F32, a few MB, where the fixed
cost dominates). ``llama-quantize + fsync`` is llama-quantize followed by an fsync of its output: the share of the
difference that is edge-mote's durability (atomic output is fsync'd) rather than Python.

    .venv/bin/python bench/bench_quantize.py --time-only [--time-rounds 5]   # only the wall-time comparison
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ship_common as SC  # noqa: E402

HIDDEN, FFN = 256, 256


def widen(src_hf: Path, out_hf: Path) -> Path:
    """The organism zero-padded to hidden HIDDEN and expert width FFN (same function; see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(src_hf), dtype=torch.float32)
    cfg = src.config.to_dict()
    h0, f0 = cfg["hidden_size"], cfg["moe_intermediate_size"]
    r = h0 / HIDDEN
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update(hidden_size=HIDDEN, moe_intermediate_size=FFN, intermediate_size=4 * HIDDEN,
               rms_norm_eps=cfg["rms_norm_eps"] * r)
    new = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg)).to(torch.float32)
    old_sd, new_sd = src.state_dict(), new.state_dict()
    with torch.no_grad():
        for name, t in new_sd.items():
            o = old_sd[name]
            t.zero_()
            if name.endswith("gate_up_proj"):      # [E, 2F, H]: gate rows, then up rows
                t[:, :f0, :h0] = o[:, :f0]
                t[:, FFN:FFN + f0, :h0] = o[:, f0:]
            elif name.endswith("norm.weight") and "q_norm" not in name and "k_norm" not in name:
                t[:h0] = o * math.sqrt(r)            # RMSNorm over the hidden size
            else:
                t[tuple(slice(0, s) for s in o.shape)] = o
    new.load_state_dict(new_sd)
    new.save_pretrained(str(out_hf))
    for f in src_hf.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json") \
                and not f.name.endswith(".safetensors"):
            shutil.copy(f, out_hf / f.name)
    return out_hf


WAYS = ("edge-mote", "llama-quantize", "llama-quantize + fsync")


def time_quantize(src: Path, work: Path, rounds: int, qtype: str = "Q4_K_M", threads: int = 2) -> dict:
    """Wall seconds per way (module doc), interleaved rounds with a rotating order, one warm-up run each."""
    import os

    from edge_mote.runtime.native import tool

    exe = str(tool("llama-quantize"))
    em = str(Path(sys.executable).parent / "edge-mote")
    # as installed: byte-code caches written (by the warm-up run) and used; PYTHONDONTWRITEBYTECODE=1 in the
    # environment would recompile every edge-mote module from source on each run (~0.25 s on this machine)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def once(way: str) -> float:
        target = work / f"t-{way.replace(' ', '')}.gguf"
        os.sync()
        t0 = time.perf_counter()
        if way == "edge-mote":
            res = subprocess.run([em, "quantize", str(src), str(target), "--type", qtype, "--threads", str(threads),
                                  "--json"], capture_output=True, text=True, env=env)
        else:
            res = subprocess.run([exe, str(src), str(target), qtype, str(threads)], capture_output=True, text=True)
            if res.returncode == 0 and way.endswith("fsync"):
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
        target.unlink()
        return dt

    times: dict = {w: [] for w in WAYS}
    for w in WAYS:
        once(w)  # warm-up: page cache, first exec
    for rnd in range(rounds):
        order = WAYS[rnd % len(WAYS):] + WAYS[:rnd % len(WAYS)]
        for w in order:
            times[w].append(once(w))
            print(f"time {src.name} round {rnd} {w}: {times[w][-1]:.2f} s", file=sys.stderr)
    return times


def print_times(name: str, t: dict) -> None:
    em, lq = statistics.median(t["edge-mote"]), statistics.median(t["llama-quantize"])
    lqf = statistics.median(t["llama-quantize + fsync"])
    ratios = [b / a for a, b in zip(t["edge-mote"], t["llama-quantize"])]
    print(f"| {name} | {t['bytes'] / 2**20:.1f} | {SC.median_spread(t['edge-mote'])} | "
          f"{SC.median_spread(t['llama-quantize'])} | {SC.median_spread(t['llama-quantize + fsync'])} | "
          f"**{lq / em:.3f}x** (per round {min(ratios):.3f}-{max(ratios):.3f}) | {lqf / em:.3f}x |")


def print_times_header() -> None:
    print("| input file | MiB | edge-mote quantize s | llama-quantize s | llama-quantize + fsync s "
          "| speed ratio (llama-quantize / edge-mote) | ratio vs llama-quantize + fsync |")
    print("|---|---|---|---|---|---|---|")


def bench_file_times(args, work: Path) -> dict:
    from bench_steering import bench_model

    src = bench_model(False)
    t = time_quantize(src, work, args.time_rounds)
    t["bytes"] = src.stat().st_size
    t["file"] = src.name
    return t


def profile_effect(gguf, ranking, bset, cset, random_trials, max_new) -> dict:
    import edge_mote
    from edge_mote.api import prepare_prompts
    from edge_mote.evaluate.protocol import evaluate
    from edge_mote.ftri.prompts import load_prompts

    with edge_mote.load(gguf, n_ctx=512, n_threads=2) as m:
        m.use_profile("none")
        b, c = prepare_prompts(m, load_prompts(bset)), prepare_prompts(m, load_prompts(cset))
        rep = evaluate(m, b, c, ranking, tops=(2,), modes=("off",), random_trials=random_trials, seed=0,
                       max_new=max_new)
        profile_off = sorted(m.profiles["no-refusal"].steering.off)
    top = rep.row("top-2 off")
    if sorted(edge_mote.Steering.parse(top.steering).off) != profile_off:
        raise SystemExit("the evaluated top-2 experts are not the profile's")
    return {"unsteered": rep.row("unsteered").values["behavior_decision"],
            "profile": top.values["behavior_decision"], "profile_kl_first": top.values["kl_first"],
            "random": rep.row("random-2 off").values["behavior_decision"],
            "random_kl_first": rep.row("random-2 off").values["kl_first"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random-trials", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--time-rounds", type=int, default=5)
    ap.add_argument("--time-only", action="store_true", help="only the wall-time comparison on the bench model")
    ap.add_argument("--scan", action="store_true", help="rank by an fTRI scan of the training sets (as the demo) "
                    "instead of the planted refusal experts")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    if args.time_only:
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as d:
            t = bench_file_times(args, Path(d))
        print(f"machine: {SC.machine()}")
        print_times_header()
        print_times(f"bench model {t['file']} (F16)", t)
        if args.json:
            Path(args.json).write_text(json.dumps({"times": {"bench_model": t}}, indent=1))
        return 0

    import numpy as np

    from edge_mote.api import add_profile, scan_ranking, steering_from_ranking
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.ftri.scan import scan_and_write
    from edge_mote.runtime.native import vendored_llama_cpp
    from edge_mote.ship.inspect import inspect_tensors
    from edge_mote.ship.quantize import quantize_model

    org = SC.organism()
    out: dict = {"machine": SC.machine()}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as d:
        work = Path(d)
        wide = convert_hf_to_gguf(widen(Path(org.hf_dir), work / "wide-hf"), work / "wide-f32.gguf",
                                  vendored_llama_cpp(), outtype="f32")
        ctrl = SC.sequences(org.gguf, org.sets["control_heldout"])
        ref_org = SC.run_model(org.gguf, ctrl[:40])
        ref_wide = SC.run_model(wide, ctrl[:40])
        out["widen_max_logit_diff"] = max(float(np.abs(a - b).max())
                                          for a, b in zip(ref_org["logits"], ref_wide["logits"]))
        print(f"widened organism: max |logit diff| vs the organism {out['widen_max_logit_diff']:.2e}", file=sys.stderr)

        if args.scan:
            scan_and_write(org.gguf, org.sets["behavior_train"], org.sets["control_train"], work / "scan.json",
                           tokens="decision", progress=False, n_threads=2)
            ranking, info = scan_ranking(work / "scan.json")
        else:  # the experts the organism's refusal was planted in, most refusal-linked first (no scan: faster)
            planted = sorted(org.meta["trainable_experts"], key=lambda e: -e["stage1_decision_rd"])
            planted = sorted(planted, key=lambda e: -org.meta["stage2"]["decision_rd_of_trainable"][e["layer"]])
            ranking, info = [(int(e["layer"]), int(e["expert"])) for e in planted], None
        steering = steering_from_ranking(ranking, 2, "off", None, info)
        f32 = add_profile(wide, work / "f32.gguf", "no-refusal", steering, "top-2 refusal experts OFF")
        out["profile"] = str(steering)

        files = {"F32": f32}
        specs = [("Q8_0", "Q8_0", "uniform"), ("Q4_K_M", "Q4_K_M", "uniform"), ("Q3_K_M", "Q3_K_M", "uniform"),
                 ("moe Q4_K_M", "Q4_K_M", "moe"), ("moe Q3_K_M", "Q3_K_M", "moe")]
        for name, qtype, recipe in specs:
            files[name] = quantize_model(f32, work / f"{name.replace(' ', '-')}.gguf", qtype, recipe=recipe,
                                         n_threads=2).output

        out["times"] = {"organism": time_quantize(f32, work, args.time_rounds)}
        out["times"]["organism"]["bytes"] = f32.stat().st_size

        ref = SC.run_model(f32, ctrl, routing=True)
        rows = []
        for name, path in files.items():
            rep = inspect_tensors(path)
            test = ref if name == "F32" else SC.run_model(path, ctrl, routing=True)
            q = SC.quality(ref, test, ctrl)
            eff = profile_effect(path, ranking, org.sets["behavior_heldout"], org.sets["control_heldout"],
                                 args.random_trials, args.max_new)
            rows.append({"file": name, "bytes": Path(path).stat().st_size, "expert_bpw": rep.experts.bits_per_weight,
                         "expert_types": {f: d["types"] for f, d in rep.expert_tensors.items()},
                         "attn_types": rep.by_family.get("attn_q").types if "attn_q" in rep.by_family else {},
                         "kl_first": q["first_kl"], "kl_answer": q["answer_kl"], "ppl": q["ppl"],
                         "routing_fidelity": SC.routing_fidelity(ref, test), **eff})
            print(json.dumps(rows[-1]), file=sys.stderr)
        out["rows"] = rows
        out["times"]["bench_model"] = bench_file_times(args, work)

    print(f"machine: {out['machine']}")
    print(f"widened organism (hidden {HIDDEN}, expert width {FFN}): max |logit diff| vs the organism "
          f"{out['widen_max_logit_diff']:.1e}; profile no-refusal = {out['profile']}")
    f32_cut = rows[0]["unsteered"] - rows[0]["profile"]
    print("| file | MiB | expert bpw | expert types (gate/up/down) | KL vs F32 first / answer | ppl | routing "
          "fidelity | refusal unsteered -> profile (random-2) | cut kept | profile KL first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["expert_types"]
        types = " / ".join("+".join(sorted(t.get(f, {}))) for f in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        cut = r["unsteered"] - r["profile"]
        kept = cut / f32_cut if f32_cut else float("nan")
        print(f"| {r['file']} | {r['bytes'] / 2**20:.2f} | {r['expert_bpw']:.2f} | {types} | "
              f"{r['kl_first']:.4f} / {r['kl_answer']:.4f} | {r['ppl']:.3f} | {r['routing_fidelity']:.3f} | "
              f"{r['unsteered']:.0%} -> {r['profile']:.0%} ({r['random']:.0%}) | {kept:.0%} | "
              f"{r['profile_kl_first']:.4f} |")
    print(f"\nquantize Q4_K_M wall time, 2 threads, {args.time_rounds} interleaved rounds, medians [range]:")
    print_times_header()
    print_times(f"bench model {out['times']['bench_model']['file']} (F16)", out["times"]["bench_model"])
    print_times("widened organism (F32)", out["times"]["organism"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
