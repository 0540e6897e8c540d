#!/usr/bin/env python3
"""Benchmark ``edge-mote serve`` against llama.cpp's own ``llama-server --parallel 8`` on the same model and clients.

Aggregate generated tokens/s of N concurrent clients (1, 4, 8), each sending completions one after another
(greedy, ``--max-tokens`` new tokens, prompts of ~``--prompt-words`` words) to

* ``stock``: ``llama-server -np 8`` built by the set-up, run on the UNPATCHED libllama/ggml of the set-up's stock
  build (``LD_LIBRARY_PATH``; ``--server-lib patched`` uses the patched one), no steering;
* ``edge-mote``: ``edge-mote serve --parallel 8``, no steering;
* ``edge-mote mixed``: the same server, every request with its own steering (random experts OFF, a different set
  per request, one request in four unsteered).

Both servers run side by side (an idle one costs nothing) with the same threads and per-sequence context; the
configurations are interleaved round by round and each number is the median over rounds (spread: min-max).
The bench model is the random Qwen3-MoE of bench/bench_steering.py (~400 MB F16, 8 layers x 32 experts, top-4;
``--quick``: a small one). Prints a markdown table for BENCHMARKS.md and the two target ratios of issue #10:
8 clients mixed >= 0.8x stock with 8 clients, and >= 2.5x edge-mote with 1 client.

    .venv/bin/python bench/bench_serve.py                  # full
    .venv/bin/python bench/bench_serve.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steering import FULL_CONFIG, QUICK_CONFIG, bench_model  # noqa: E402
from load_serve import ServerProcess  # noqa: E402

WORDS = ("the river flows past old stone bridges while children count boats and merchants weigh grain under "
         "a pale morning sky that smells of rain and bread").split()


class LlamaServer:
    """llama.cpp's llama-server on loopback with ``n_parallel`` slots of ``n_ctx_seq`` tokens."""

    def __init__(self, model: Path, n_parallel: int, n_ctx_seq: int, threads: int, lib: str):
        from edge_mote.runtime import native

        exe = native.tool("llama-server")
        env = dict(os.environ)
        self.lib = "patched"
        if lib == "stock" and native.stock_lib_dir() is not None:
            env["LD_LIBRARY_PATH"] = str(native.stock_lib_dir())
            self.lib = "stock"
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(n_parallel),
               "-c", str(n_parallel * n_ctx_seq), "-t", str(threads), "-tb", str(threads), "-cb", "-ngl", "0",
               "--no-warmup"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("llama-server exited: " + "".join(self.err[-20:]))
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise SystemExit("llama-server never became healthy")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def prompts(n: int, words: int) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def steering_for(i: int, rng: random.Random, cfg: dict) -> dict | None:
    """Random OFF experts, different per request (every fourth request unsteered)."""
    if i % 4 == 0:
        return None
    layers, n_exp = cfg["num_hidden_layers"], cfg["num_experts"]
    picks = {(rng.randrange(layers), rng.randrange(n_exp)) for _ in range(6)}
    return {"off": ",".join(f"{l}:{e}" for l, e in sorted(picks))}


def measure(url: str, clients: int, per_client: int, texts: list[str], max_tokens: int, model: str,
            steer_cfg: dict | None) -> tuple[float, int]:
    """Aggregate generated tok/s of ``clients`` clients sending ``per_client`` requests each."""
    rng = random.Random(clients)
    jobs = []
    for c in range(clients):
        jobs.append([(texts[(c * per_client + k) % len(texts)],
                      steering_for(c * per_client + k + 1, rng, steer_cfg) if steer_cfg else None)
                     for k in range(per_client)])
    counts = [0] * clients

    def run(c: int) -> None:
        with httpx.Client(timeout=600) as client:
            for text, steer in jobs[c]:
                body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
                if steer:
                    body["mote"] = steer
                r = client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                counts[c] += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(run, c) for c in range(clients)]:
            f.result()
    dt = time.perf_counter() - t0
    return sum(counts) / dt, sum(counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--per-client", type=int, default=3, help="requests per client per measurement")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, both servers")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per sequence, both servers")
    ap.add_argument("--server-lib", choices=("stock", "patched"), default="stock")
    a = ap.parse_args()
    cfg = QUICK_CONFIG if a.quick else FULL_CONFIG
    model = bench_model(a.quick)
    clients = [int(c) for c in a.clients.split(",")]
    texts = prompts(64, a.prompt_words)
    ours = ServerProcess(model, "--parallel", "8", "--ctx", str(a.ctx), "--threads", str(a.threads), "--name", "bench")
    stock = LlamaServer(model, 8, a.ctx, a.threads, a.server_lib)
    results: dict[tuple[str, int], list[float]] = {}
    try:
        configs = [("stock", n) for n in clients] + [("edge-mote", n) for n in clients] + \
                  [("edge-mote mixed", n) for n in clients if n > 1]
        # warm-up (page in weights, first graph builds)
        measure(stock.url, 2, 1, texts, 8, "bench", None)
        measure(ours.url, 2, 1, texts, 8, "bench", cfg)
        for r in range(a.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for name, n in order:
                url = stock.url if name == "stock" else ours.url
                tps, _ = measure(url, n, a.per_client, texts, a.max_tokens, "bench",
                                 cfg if name == "edge-mote mixed" else None)
                results.setdefault((name, n), []).append(tps)
                print(f"  round {r + 1}: {name:16s} {n} clients  {tps:7.1f} tok/s", file=sys.stderr, flush=True)
        health = ours.health()
    finally:
        ours.close()
        stock.close()

    def med(key):
        return statistics.median(results[key]) if key in results else float("nan")

    mb = model.stat().st_size / 1e6
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}; "
          f"model {model.name} ({mb:.0f} MB F16, {cfg['num_hidden_layers']} layers x {cfg['num_experts']} experts, "
          f"top-{cfg['num_experts_per_tok']}); --threads {a.threads}, 8 slots x {a.ctx} tokens; {a.per_client} "
          f"requests per client, {a.max_tokens} new tokens, prompts of {a.prompt_words} words; "
          f"{a.rounds} rounds, medians (min-max). llama-server on the {stock.lib} libllama.\n")
    print("| clients | llama-server (unsteered) | edge-mote serve (unsteered) | edge-mote serve (mixed steering) |")
    print("|---|---|---|---|")
    for n in clients:
        cells = []
        for name in ("stock", "edge-mote", "edge-mote mixed"):
            v = results.get((name, n))
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
        print(f"| {n} | " + " | ".join(cells) + " |")
    top = max(clients)
    r1 = med(("edge-mote mixed", top)) / med(("stock", top))
    r2 = med(("edge-mote mixed", top)) / med(("edge-mote", 1)) if 1 in clients else float("nan")
    print(f"\n{top} clients, mixed steering vs llama-server unsteered: {r1:.2f}x (target >= 0.8x)")
    print(f"{top} clients, mixed steering vs edge-mote with 1 client: {r2:.2f}x (target >= 2.5x)")
    print(f"edge-mote serve: {health['steps']} decode steps, up to {health['max_seqs_in_step']} sequences in one step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
