#!/usr/bin/env python3
"""Benchmark the cost of edge-mote's llama.cpp patch: steering overhead and routing-capture cost.

Builds (once, cached under ``$EDGE_MOTE_CACHE/bench-models``, default ``~/.cache/edge-mote``) a random Qwen3-MoE
model of ~400 MB in F16 and measures, in worker subprocesses spawned by this driver:

1. prompt-eval and decode speed of the UNPATCHED libllama (``LLAMA_CPP_LIB_PATH`` = the stock build from the
   manifest) against the patched one, unsteered and with 10 experts OFF (the experts the model itself uses most
   on the prompt, spread over the layers). Stock and patched workers alternate round by round; unsteered and
   steered share one process and one model. Ratios are medians of per-round ratios.
2. the cost of reading the routing: ``Model.routing`` (the patch's capture) against llama.cpp's generic eval
   callback (``cb_eval`` reading ``ffn_moe_topk-<il>``) and against a plain evaluation of the same tokens
   (all three compute the logits of every token, as ``Model.routing`` does); both captures must agree.

    .venv/bin/python bench/bench_steering.py            # full benchmark, markdown for BENCHMARKS.md
    .venv/bin/python bench/bench_steering.py --quick    # small model, 2 rounds: smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FULL_CONFIG: dict[str, Any] = dict(hidden_size=512, num_hidden_layers=8, num_experts=32, num_experts_per_tok=4,
                                   moe_intermediate_size=384, intermediate_size=1024, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=64)
QUICK_CONFIG: dict[str, Any] = dict(hidden_size=128, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4,
                                    moe_intermediate_size=128, intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32)
SIZE_RANGE_MB = {"full": (200, 500), "quick": (5, 100)}
N_OFF = 10
TARGET_UNSTEERED = 0.995
TARGET_STEERED = 0.99
TOPK_PREFIX = b"ffn_moe_topk-"


# ---------------------------------------------------------------------------------------------------- model
def bench_model(quick: bool) -> Path:
    """The cached benchmark GGUF (built on first use with make_tiny_hf_model + llama.cpp's converter)."""
    from edge_mote.runtime import native

    cfg = QUICK_CONFIG if quick else FULL_CONFIG
    key = hashlib.sha256(json.dumps([cfg, native.manifest()["llama_cpp_python"], 1], sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser() / "bench-models"
    out = root / f"qwen3moe-{'quick' if quick else 'full'}-{key}.gguf"
    if not out.exists():
        from edge_mote.conversion import convert_hf_to_gguf
        from edge_mote.tiny import make_tiny_hf_model

        vendor = native.vendored_llama_cpp()
        root.mkdir(parents=True, exist_ok=True)
        print(f"building benchmark model {out.name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            hf = make_tiny_hf_model("qwen3moe", Path(tmp) / "hf", vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0, **cfg)
            convert_hf_to_gguf(hf, Path(tmp) / out.name, vendor, outtype="f16")
            os.replace(Path(tmp) / out.name, out)
    lo, hi = SIZE_RANGE_MB["quick" if quick else "full"]
    mb = out.stat().st_size / 1e6
    if not lo <= mb <= hi:
        raise SystemExit(f"{out} is {mb:.0f} MB, outside the intended {lo}-{hi} MB")
    return out


def bench_tokens(n: int) -> list[int]:
    """Deterministic pseudo-random token ids, identical in every worker."""
    return [int(t) for t in np.random.default_rng(1234).integers(1000, 50000, size=n)]


def llama_kwargs(spec: dict) -> dict[str, Any]:
    return dict(n_ctx=spec["n_ctx"], n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_gpu_layers=0, seed=0, verbose=False)


# ---------------------------------------------------------------------------------------------------- workers
def worker_speed(spec: dict) -> dict:
    """Prompt-eval and decode timings of one library (stock, or patched unsteered + steered)."""
    import llama_cpp

    patched = hasattr(llama_cpp.llama_cpp._lib, "llama_set_expert_steering")
    if patched != (spec["lib"] == "patched"):
        raise SystemExit(f"worker expected the {spec['lib']} libllama, got {llama_cpp.llama_cpp._lib._name}")
    llm = llama_cpp.Llama(model_path=spec["model"], logits_all=False, **llama_kwargs(spec))
    n_p, n_d = spec["prompt_tokens"], spec["decode_tokens"]
    toks = bench_tokens(n_p + n_d)
    configs: dict[str, Callable[[], None]] = {"stock": lambda: None}
    if patched:
        from edge_mote.runtime import bindings as B
        from edge_mote.steering import Steering

        lib, mp, ctx = B.lib(), llm._model.model, llm._ctx.ctx
        n_layer, n_expert = lib.llama_model_n_layer_all(mp), lib.llama_model_n_expert(mp)
        moe = [il for il in range(n_layer) if lib.llama_model_layer_is_moe(mp, il) == 1]
        steer = Steering.parse(spec["steering"])
        state, bias = steer.to_arrays(n_layer, n_expert, moe, {il: lib.llama_model_n_expert_used(mp, il) for il in moe})

        def unsteered() -> None:
            B.check(lib.llama_clear_expert_steering(ctx), "clearing the steering")

        def steered() -> None:
            B.check(lib.llama_set_expert_steering(ctx, B.as_ptr(state, ctypes.c_int8), B.as_ptr(bias, ctypes.c_float),
                                                  steer.margin, n_layer, n_expert), "setting the steering")
        configs = {"patched": unsteered, "steered": steered}

    def once() -> tuple[float, float, np.ndarray]:
        llm.reset()  # eval() then removes the cached cells from position 0
        t0 = time.perf_counter()
        llm.eval(toks[:n_p])
        t1 = time.perf_counter()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
        for t in toks[n_p:]:
            llm.eval([t])
        t2 = time.perf_counter()
        return n_p / (t1 - t0), n_d / (t2 - t1), logits

    out: dict[str, dict[str, list[float]]] = {name: {"prompt": [], "decode": []} for name in configs}
    last: dict[str, np.ndarray] = {}
    def switch(name: str) -> None:
        """Apply a configuration, then one untimed token: a steering change re-reserves the scheduler."""
        configs[name]()
        llm.reset()
        llm.eval(toks[:1])

    for name in configs:  # warm-up (page cache, graph allocation)
        switch(name)
        once()
    for rep in range(spec["inner"]):
        for name in (list(configs) if rep % 2 == 0 else list(reversed(configs))):
            switch(name)
            pp, tg, last[name] = once()
            out[name]["prompt"].append(pp)
            out[name]["decode"].append(tg)
    if patched and np.array_equal(last["patched"], last["steered"]):
        raise SystemExit("steering had no effect on the logits: the steered run is not steered")
    return {"lib": llama_cpp.llama_cpp._lib._name, "results": out}


class GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (ggml/include/ggml.h of the vendored llama.cpp)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def loaded_ggml_base() -> ctypes.CDLL:
    """The libggml-base already mapped into this process (RTLD_NOLOAD: never a second copy)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/libggml-base.so" in line}
    if len(paths) != 1:
        raise SystemExit(f"expected one libggml-base in the process, found {sorted(paths) or 'none'}")
    h = ctypes.CDLL(paths.pop(), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    h.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    h.ggml_backend_tensor_get.restype = None
    h.ggml_tensor_overhead.restype = ctypes.c_size_t
    if h.ggml_tensor_overhead() != 32 + ctypes.sizeof(GgmlTensor):  # GGML_OBJECT_SIZE + GGML_TENSOR_SIZE
        raise SystemExit("the ctypes mirror of struct ggml_tensor does not match this ggml")
    return h


def worker_capture(spec: dict) -> dict:
    """Pick the experts to switch OFF, then time plain eval vs Model.routing vs an eval-callback capture."""
    import llama_cpp

    import edge_mote
    from edge_mote.steering import Steering

    m = edge_mote.load(spec["model"], n_ctx=spec["n_ctx"], n_batch=512, n_threads=spec["threads"], seed=0)
    llm, info = m._llm, m.info
    toks = bench_tokens(spec["prompt_tokens"])
    trace = m.routing(toks)
    counts = trace.counts(info.n_expert)
    ranked = [np.argsort(-counts[i], kind="stable") for i in range(len(trace.layers))]
    off: list[tuple[int, int]] = []
    for rank in range(info.n_expert):
        off += [(il, int(ranked[i][rank])) for i, il in enumerate(trace.layers)]
    steering = Steering(off=off[:N_OFF])
    with m.steer(steering):
        steered = m.routing(toks)
    if any(np.isin(steered.ids[il], [e for l, e in steering.off if l == il]).any() for il in steered.layers):
        raise SystemExit("an OFF expert was still selected")
    rerouted = sum(int((trace.ids[il] != steered.ids[il]).any(axis=1).sum()) for il in trace.layers)

    ggml = loaded_ggml_base()
    name_off = GgmlTensor.name.offset
    cb_ids: dict[int, np.ndarray] = {}

    def on_tensor(t: int, ask: bool, _user: int | None) -> bool:
        if ask:
            return ctypes.string_at(t + name_off, len(TOPK_PREFIX)) == TOPK_PREFIX
        g = GgmlTensor.from_address(t)
        k, n, nb0, nb1 = g.ne[0], g.ne[1], g.nb[0], g.nb[1]
        nbytes = (k - 1) * nb0 + (n - 1) * nb1 + 4  # ggml_nbytes of an I32 2-D view
        buf = np.empty(nbytes // 4, dtype=np.int32)
        ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
        cb_ids[int(g.name[len(TOPK_PREFIX):])] = np.lib.stride_tricks.as_strided(buf, (n, k), (nb1, nb0)).copy()
        return True

    # Three contexts on one model, each configured once (toggling the capture would re-reserve the scheduler):
    # the Model's (capture on), a plain one and one with the eval callback, all with llm's context parameters.
    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)  # kept alive until the end
    contexts = []
    for cb in (None, callback):
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        if cb is not None:
            params.cb_eval, params.cb_eval_user_data = cb, None
        c = llama_cpp.llama_init_from_model(m._mp, params)
        if not c:
            raise SystemExit("llama_init_from_model failed")
        contexts.append(c)
    batch = llama_cpp.llama_batch_init(len(toks), 0, 1)
    for i, t in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(toks)

    def raw_eval(c: Any) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(c), True)
        if llama_cpp.llama_decode(c, batch) != 0:
            raise SystemExit("llama_decode failed")

    def by_callback() -> dict[int, np.ndarray]:
        cb_ids.clear()
        raw_eval(contexts[1])
        return dict(cb_ids)

    runs: dict[str, Callable[[], Any]] = {"plain": lambda: raw_eval(contexts[0]), "capture": lambda: m.routing(toks),
                                          "callback": by_callback}
    for f in runs.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for rnd in range(spec["rounds"]):
        for name in (list(runs) if rnd % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - t0)
    cap, cbk = results["capture"].ids, results["callback"]
    same_set = sorted(cap) == sorted(cbk) and all(np.array_equal(np.sort(cap[il], 1), np.sort(cbk[il], 1)) for il in cap)
    same_order = same_set and all(np.array_equal(cap[il], cbk[il]) for il in cap)
    llama_cpp.llama_batch_free(batch)
    for c in contexts:
        llama_cpp.llama_free(c)
    m.close()
    return {"steering": str(steering), "rerouted_rows": rerouted, "times": times, "ids_equal": same_set,
            "ids_same_order": same_order, "checked": f"{len(cap)} layers x {len(toks)} tokens x {cap[trace.layers[0]].shape[1]}",
            "model": {"n_layer": info.n_layer, "n_expert": info.n_expert, "k": info.n_expert_used[trace.layers[0]]}}


# ---------------------------------------------------------------------------------------------------- driver
def spawn(mode: str, spec: dict, stock_dir: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if stock_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(stock_dir)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", mode, json.dumps(spec)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} worker ({spec.get('lib', 'patched')}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": cpu,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(exe), os.path.relpath(Path(__file__).resolve()), *sys.argv[1:]])


def spread(xs: list[float]) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}"


def mark(value: float, target: float) -> str:
    return f"{value:.3f} {'✓' if value >= target else '✗'}"


def report(r: dict) -> str:
    sp, cap, mc = r["speed"], r["capture"], r["machine"]
    med = {c: {k: statistics.median(v) for k, v in sp[c].items()} for c in ("stock", "patched", "steered")}
    ratio = {c: {k: statistics.median(a / b for a, b in zip(sp[c][k], sp["stock"][k])) for k in ("prompt", "decode")}
             for c in ("patched", "steered")}
    per_round = [a / b for c in ("patched", "steered") for k in ("prompt", "decode") for a, b in zip(sp[c][k], sp["stock"][k])]
    md = r["model"]
    p, d = r["prompt_tokens"], r["decode_tokens"]
    out = [f"### Steering overhead and routing capture ({mc['date']})", "",
           f"Command: `{r['command']}`  ",
           f"Machine: {mc['nproc']} cores ({mc['cpu']}), load average at start {mc['load']}; "
           f"{r['threads']} threads, CPU only  ",
           f"Model: random Qwen3-MoE, F16, {md['size_mb']:.0f} MB, {md['n_layer']} layers, {md['n_expert']} experts, "
           f"top-{md['k']}, hidden {md['hidden']}  ",
           f"Rounds: {r['rounds']} (stock and patched workers alternate; {r['inner']} runs per worker and round); "
           f"medians, ratio = median of per-round ratios (which ranged {min(per_round):.2f}-{max(per_round):.2f}); "
           f"spread = min-max over rounds", "",
           f"| configuration | prompt tok/s ({p} tok, 1 batch) | spread | decode tok/s ({d} tok) | spread "
           f"| prompt ratio | decode ratio | target |",
           "|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| stock llama.cpp | {med['stock']['prompt']:.1f} | {spread(sp['stock']['prompt'])} "
           f"| {med['stock']['decode']:.1f} | {spread(sp['stock']['decode'])} | 1 | 1 | |"]
    for c, label, target in (("patched", "patched, unsteered", TARGET_UNSTEERED),
                             ("steered", f"patched, {N_OFF} experts OFF", TARGET_STEERED)):
        out.append(f"| {label} | {med[c]['prompt']:.1f} | {spread(sp[c]['prompt'])} | {med[c]['decode']:.1f} "
                   f"| {spread(sp[c]['decode'])} | {mark(ratio[c]['prompt'], target)} "
                   f"| {mark(ratio[c]['decode'], target)} | ≥ {target} |")
    t = {k: statistics.median(v) * 1e3 for k, v in cap["times"].items()}
    out += ["", f"OFF experts (most used on the prompt, spread over layers): `{cap['steering']}` "
            f"({cap['rerouted_rows']} token-layer rows rerouted)", "",
            f"| routing of {p} tokens (all logits) | ms per run (median) | spread ms | vs plain | vs capture |",
            "|---|---:|---:|---:|---:|",
            f"| plain evaluation, no capture | {t['plain']:.1f} | {spread([x * 1e3 for x in cap['times']['plain']])} | 1 | |",
            f"| `Model.routing` (patch capture) | {t['capture']:.1f} | {spread([x * 1e3 for x in cap['times']['capture']])} "
            f"| {t['capture'] / t['plain']:.3f} | 1 |",
            f"| llama.cpp `cb_eval` on `ffn_moe_topk-<il>` | {t['callback']:.1f} "
            f"| {spread([x * 1e3 for x in cap['times']['callback']])} | {t['callback'] / t['plain']:.3f} "
            f"| {t['callback'] / t['capture']:.3f} |", "",
            f"Expert ids of both captures identical: {'yes' if cap['ids_equal'] else 'NO'} ({cap['checked']}; "
            f"same order within each row: {'yes' if cap['ids_same_order'] else 'no'})"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--inner", type=int, default=3, help="runs per worker and round (the round's value: their median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small model and 2 rounds (smoke test)")
    ap.add_argument("--json", action="store_true", help="print all results as JSON instead of markdown")
    ap.add_argument("--stock-lib", type=Path, help="folder of the unpatched libllama (default: the build manifest's)")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        mode, spec = a.worker[0], json.loads(a.worker[1])
        print(json.dumps(worker_speed(spec) if mode == "speed" else worker_capture(spec)))
        return

    from edge_mote.runtime import native

    stock = a.stock_lib or native.stock_lib_dir()
    if stock is None or not (stock / "libllama.so").exists():
        raise SystemExit("no stock libllama: run `python native/build.py --with-stock` or pass --stock-lib DIR")
    rounds = a.rounds or (2 if a.quick else 7)
    if a.prompt_tokens > 512 or a.prompt_tokens < 1 or a.decode_tokens < 1 or rounds < 1:
        raise SystemExit("need 1 <= --prompt-tokens <= 512 (one batch), --decode-tokens >= 1, --rounds >= 1")
    model = bench_model(a.quick)
    cfg = QUICK_CONFIG if a.quick else FULL_CONFIG
    mc = machine()
    spec = dict(model=str(model), threads=a.threads, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens,
                n_ctx=a.prompt_tokens + a.decode_tokens + 16, inner=a.inner, rounds=rounds)
    cap = spawn("capture", spec, None)
    spec["steering"] = cap["steering"]
    speed: dict[str, dict[str, list[float]]] = {c: {"prompt": [], "decode": []} for c in ("stock", "patched", "steered")}
    for rnd in range(rounds):
        for lib in (("stock", "patched") if rnd % 2 == 0 else ("patched", "stock")):
            res = spawn("speed", {**spec, "lib": lib}, stock if lib == "stock" else None)["results"]
            for c, v in res.items():
                for k in ("prompt", "decode"):
                    speed[c][k].append(statistics.median(v[k]))
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)
    result = {"command": command_line(), "machine": mc, "rounds": rounds, "inner": a.inner, "threads": a.threads,
              "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens, "stock_lib_dir": str(stock),
              "model": {"path": str(model), "size_mb": model.stat().st_size / 1e6, "hidden": cfg["hidden_size"],
                        **cap["model"]}, "speed": speed, "capture": cap}
    print(json.dumps(result, indent=1) if a.json else report(result))


if __name__ == "__main__":
    main()
