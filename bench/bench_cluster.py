#!/usr/bin/env python3
"""Home-cluster benchmark: decode tok/s locally vs 2 and 3 RPC workers, on loopback and behind an emulated home
link (network namespaces, ``tc tbf`` 100 Mbit/s both ways, a delay relay adding ~7 ms RTT); a model larger than
one worker's ``--mem`` cap across workers; the planner's predicted vs measured ms/token (nodes measured as
``cluster plan`` does: compute benchmark, link, and the fixed per-token cost of a short decode through each worker);
the planner's split vs an even split when one worker is slow (its CPU throttled with a cgroup quota).

Every configuration runs through ``edge_mote.cluster.call`` (the isolated child + watchdog relay users get).
Timing: greedy decode of --tokens tokens after a short prompt (EOS ignored), --repeats rounds interleaved over
the configurations, median and spread (min-max) reported; workers keep their weight cache, so only the first
load of each configuration uploads the weights. Needs root for namespaces and cgroups (skips those parts
otherwise, saying so).

    .venv/bin/python bench/bench_cluster.py [--tokens 32] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench"), str(REPO)] + [os.environ.get("PYTHONPATH", "")])

from tests.e2e.cluster_util import NetNS, WorkerProc, emulated_link  # noqa: E402

BENCH_MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                   intermediate_size=1024, moe_intermediate_size=1536, num_experts=8, num_experts_per_tok=2)
# expert tensors of 8 x 512 x 1536 f16 = 12 MiB: above ggml-rpc's 10 MiB hash threshold, so the workers' weight
# cache serves them on the second load


def bench_model() -> Path:
    """A random qwen3moe of ~0.3 GB (f16), built once and cached (no downloads)."""
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.runtime.native import vendored_llama_cpp
    from edge_mote.tiny import make_tiny_hf_model

    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    out = root / "bench-models" / "qwen3moe-cluster-e8i1536-f16.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        vendor = vendored_llama_cpp()
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_tiny_hf_model("qwen3moe", Path(tmp) / "hf", vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0,
                                    **BENCH_MODEL)
            convert_hf_to_gguf(hf, out, vendor, outtype="f16")
    return out


def decode_ms(path, n_tokens, n_ctx=256, n_batch=64, **load_kwargs):
    """(ms per decoded token (greedy, EOS ignored), load seconds) -- runs in the isolated child for cluster runs."""
    import edge_mote

    t_load = time.perf_counter()
    with edge_mote.load(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=1, **load_kwargs) as m:
        t_load = time.perf_counter() - t_load
        toks = m.tokenize("The home cluster")
        m.greedy(toks, 4, stop_at_eos=False)  # warm up (graph allocation, first RPC round trips)
        t0 = time.perf_counter()
        m.greedy(toks, n_tokens, stop_at_eos=False)
        dt = time.perf_counter() - t0
    return dt * 1e3 / n_tokens, t_load


def run_config(model, cfg, n_tokens):
    import importlib

    from edge_mote.cluster import call

    decode_ms = importlib.import_module("bench_cluster").decode_ms  # by module name: the child imports it

    if not cfg["rpc"]:
        return call(decode_ms, str(model), n_tokens)
    extra = dict(cfg.get("load", {}))
    return call(decode_ms, str(model), n_tokens, rpc_servers=cfg["rpc"], plan=cfg.get("plan"), rpc_timeout=120,
                n_ctx=256, n_batch=64, **extra)


class Throttle:
    """Put a worker's processes in a cgroup (v1 cpu controller) with a CPU quota: a slower node."""

    def __init__(self, pids, share: float):
        self.path = Path(f"/sys/fs/cgroup/cpu/edge-mote-bench-{os.getpid()}")
        self.path.mkdir()
        try:
            # a short period, so that even a benchmark burst of a few ms sees the quota (the kernel's minimum
            # quota is 1 ms)
            (self.path / "cpu.cfs_period_us").write_text("20000")
            (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(20000 * share))))
            for pid in pids:
                (self.path / "cgroup.procs").write_text(str(pid))
        except OSError:
            self.close()
            raise

    def close(self):
        root = self.path.parent
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        self.path.rmdir()


def predicted(model, cfg_plan, endpoints, local_node, nodes_by_ep) -> float:
    from edge_mote.cluster.plan import even_plan, make_plan, predict_split

    if not endpoints:
        return predict_split(model, local_node, [], [], model.n_layer)[0] * 1e3
    ws = [nodes_by_ep[e] for e in endpoints]
    p = even_plan(model, local_node, ws) if cfg_plan == "even" else make_plan(model, local_node, ws)
    return p.predicted_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="loopback only (no namespaces, no throttling)")
    args = ap.parse_args(argv)

    from edge_mote.cluster.plan import calibrated, measure_local, measure_node, model_profile, predict_split

    model = bench_model()
    prof = model_profile(model, 256, 64)
    size_mib = model.stat().st_size / 2**20
    print(f"model: {model.name}, {size_mib:.0f} MiB, {prof.n_layer} layers; decode {args.tokens} tokens x "
          f"{args.repeats} rounds; machine: {os.cpu_count()} CPUs (shared), every process 1 thread", flush=True)
    cache = tempfile.mkdtemp(prefix="edge-mote-bench-cache-")
    tmpdirs = [cache]
    started, nss, relays, throttles = [], [], [], []
    configs = {}
    try:
        lo = [WorkerProc(None, "--cache", cache) for _ in range(3)]
        started += lo
        configs["local"] = {"rpc": []}
        configs["loopback 2 workers (even)"] = {"rpc": [w.endpoint for w in lo[:2]], "plan": "even"}
        configs["loopback 3 workers (even)"] = {"rpc": [w.endpoint for w in lo], "plan": "even"}
        why = None if not args.quick else "--quick"
        why = why or NetNS.available()
        from edge_mote.cluster.relay import Relay

        if why is None:
            relay = Relay().start()
            relays.append(relay)
            link = []
            cache_link = tempfile.mkdtemp(prefix="edge-mote-bench-cache-link-")  # a cold cache: round 1 uploads
            tmpdirs.append(cache_link)
            for i in range(3):
                ns = NetNS(90 + i, rate_mbit=100)
                nss.append(ns)
                w = WorkerProc(None, "--cache", cache_link, host=ns.ns_ip, netns=ns.name)
                started.append(w)
                link.append(emulated_link(relay, (w.host, w.port), rtt_ms=7.0))
            configs["7 ms/100 Mbit 2 workers (even)"] = {"rpc": link[:2], "plan": "even"}
            configs["7 ms/100 Mbit 3 workers (even)"] = {"rpc": link, "plan": "even"}
            # a model larger than one worker's memory cap: three capped workers
            cap_gib = round(size_mib * 0.75 / 1024, 3)
            capped = [WorkerProc(None, "--cache", cache, "--mem", str(cap_gib)) for _ in range(3)]
            started += capped
            configs[f"loopback 3 workers --mem {cap_gib * 1024:.0f} MiB each (even)"] = {
                "rpc": [w.endpoint for w in capped], "plan": "even"}
            # heterogeneous nodes: one worker throttled to 5% of a core (under this machine's load every process gets
            # ~20-50% of a core anyway)
            slow = WorkerProc(None, "--cache", cache)
            started.append(slow)
            throttles.append(Throttle([slow.proc.pid, slow.server_pid()], 0.05))
            het = [lo[0].endpoint, slow.endpoint]
            configs["loopback fast + slow worker (even)"] = {"rpc": het, "plan": "even"}
            configs["loopback fast + slow worker (auto)"] = {"rpc": het, "plan": "auto"}
        else:
            print(f"skipping the emulated link, memory cap and slow-node parts: {why}", flush=True)

        # node measurements for the predictions (the same benchmark the planner runs)
        local_node = measure_local(prof.weight_type, 1, prof.n_embd)
        nodes = {}
        for cfg in configs.values():
            for ep in cfg["rpc"]:
                if ep not in nodes:
                    nodes[ep] = measure_node(ep, prof.weight_type, n_embd=prof.n_embd)
                    n = nodes[ep]
                    print(f"  node {ep}: RTT {n.rtt_s * 1e3:.2f} ms, fixed per-token cost {n.token_s * 1e3:.2f} ms, "
                          f"{n.bytes_per_s / 1e9:.1f} GB/s, op {n.op_s * 1e6:.1f} µs, "
                          f"up {8 * n.up_bps / 1e6:.0f} Mbit/s", flush=True)
        raw_local = predict_split(prof, local_node, [], [], prof.n_layer)[0] * 1e3
        times = {name: [] for name in configs}
        loads = {name: [] for name in configs}
        for r in range(args.repeats):
            for name, cfg in configs.items():
                t, t_load = run_config(model, cfg, args.tokens)
                times[name].append(t)
                loads[name].append(t_load)
                print(f"  round {r + 1}: {name}: {t:.2f} ms/token (load {t_load:.1f} s)", flush=True)

        # predictions: the planner's model, its compute calibrated in each round by that round's local decode (what
        # `--plan auto` does right before a run), against the measured time of the same round
        preds = {name: [] for name in configs}
        factors = []
        for r in range(args.repeats):
            f = times["local"][r] / raw_local
            factors.append(f)
            loc, *rest = calibrated([local_node] + list(nodes.values()), f)
            cal = dict(zip(nodes, rest))
            for name, cfg in configs.items():
                preds[name].append(predicted(prof, cfg.get("plan"), cfg["rpc"], loc, cal))
        base = statistics.median(times["local"])
        print(f"\ncompute calibration per round (local decode / benchmark prediction): "
              f"{', '.join(f'x{f:.2f}' for f in factors)}")
        print("| configuration | ms/token (median, min-max) | tok/s | vs local | predicted ms/token (median) | "
              "pred/meas (median of rounds, min-max) |")
        print("|---|---|---|---|---|---|")
        for name, cfg in configs.items():
            med = statistics.median(times[name])
            ratios = [p / t for p, t in zip(preds[name], times[name])]
            print(f"| {name} | {med:.2f} ({min(times[name]):.2f}-{max(times[name]):.2f}) | {1e3 / med:.1f} | "
                  f"{base / med:.2f}x | {statistics.median(preds[name]):.2f} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |")
        print("\nload time, first round (weights uploaded) -> later rounds (worker cache): "
              + "; ".join(f"{n}: {loads[n][0]:.1f} s -> {statistics.median(loads[n][1:]):.1f} s"
                          for n in configs if len(loads[n]) > 1))
        if "loopback fast + slow worker (auto)" in times:
            e = statistics.median(times["loopback fast + slow worker (even)"])
            a = statistics.median(times["loopback fast + slow worker (auto)"])
            print(f"\nplanner vs even split with a slow node: {e / a:.2f}x faster")
    finally:
        for t in throttles:
            t.close()
        for w in started:
            w.stop()
        for relay in relays:
            relay.close()
        for ns in nss:
            ns.close()
        for d in tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
