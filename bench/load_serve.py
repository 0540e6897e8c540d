#!/usr/bin/env python3
"""Load test of ``edge-mote serve``: many concurrent clients, each request with its own steering, on the organism.

Starts ``edge-mote serve`` on loopback (``--parallel`` slots), sends ``--requests`` chat completions (greedy) from
``--clients`` concurrent clients, cycling the steering per request: none / the stored profile as the model name
(``organism:no-refusal``) / random experts OFF (``mote.off``) / a random expert ON (``mote.on``). Then it sends every
request again ALONE (one at a time) and compares: a response that differs from the same request served alone is
cross-talk (a neighbour's steering or KV cache leaking into it). Reports failed requests, cross-talk, p50/p95
latency and aggregate generated tokens/s; exits 1 unless there are 0 failures and 0 cross-talk.

    .venv/bin/python bench/load_serve.py                           # 200 requests, 8 clients
    .venv/bin/python bench/load_serve.py --requests 40 --json out.json

``run_load`` is also used by tests/e2e/test_serve_load.py (a smaller run).
"""

from __future__ import annotations

import argparse
import json
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

REPO = Path(__file__).resolve().parent.parent
PROFILE = "no-refusal"
STEERINGS = ("none", "profile", "random-off", "on")


def organism_with_profile(org_dir: Path | None = None) -> tuple[Path, list[tuple[int, int]], list[str], tuple]:
    """The organism (built once, cached) copied with profile ``no-refusal`` (its planted refusal experts OFF);
    returns (gguf, those experts, prompts: held-out sensitive and neutral, (n_expert, n_expert_used))."""
    from edge_mote.api import add_profile
    from edge_mote.ftri.prompts import load_prompts
    from edge_mote.gguf_meta.profiles import read_profiles
    from edge_mote.organism.train import build_organism
    from edge_mote.steering import Steering

    cache = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    org = build_organism(org_dir or cache / "bench-models" / "organism", seed=0, progress=False)
    experts = [(int(d["layer"]), int(d["expert"])) for d in org.meta["trainable_experts"]]
    out = org.gguf.parent / "served" / "organism.gguf"
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or PROFILE not in read_profiles(out)[0]:
        add_profile(org.gguf, out, PROFILE, Steering(off=experts), "the planted refusal experts OFF")
    prompts = []
    for name in ("behavior_heldout", "control_heldout"):
        prompts += [it.prompt or it.as_messages()[-1]["content"] for it in load_prompts(org.sets[name])]
    rec = org.meta["recipe"]
    return out, experts, prompts, (int(rec["n_expert"]), int(rec["top_k"]), int(rec["n_layer"]))


class ServerProcess:
    """``edge-mote serve MODEL --port 0 ARGS`` on loopback; ``url`` once it answers /health."""

    def __init__(self, model: Path, *args: str, timeout: float = 180):
        cmd = [sys.executable, "-m", "edge_mote", "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()
        m = re.search(r"http://(127\.0\.0\.1:\d+)/v1", line)
        if not m:
            self.close()
            raise SystemExit(f"edge-mote serve did not start: {line!r} {''.join(self.err)}")
        self.url = f"http://{m.group(1)}"
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise SystemExit("edge-mote serve never answered /health")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_requests(n: int, prompts: list[str], shape: tuple, max_tokens: int, seed: int = 0) -> list[dict]:
    """``n`` chat-completion bodies, the steering cycling none / profile / random OFF / ON (four in a row share a
    prompt)."""
    n_expert, top_k, n_layer = shape
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = STEERINGS[i % len(STEERINGS)]
        prompt = prompts[(i // len(STEERINGS)) % len(prompts)]   # each prompt under every kind of steering
        body = {"model": "organism", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        if kind == "profile":
            body["model"] = f"organism:{PROFILE}"
        elif kind == "random-off":
            layers = rng.sample(range(n_layer), 2)
            body["mote"] = {"off": ",".join(f"{l}:{rng.randrange(n_expert)}" for l in layers)}
        elif kind == "on":
            body["mote"] = {"on": f"{rng.randrange(n_layer)}:{rng.randrange(n_expert)}"}
        out.append({"kind": kind, "body": body})
    return out


def _send(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/chat/completions", json=body, timeout=600)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": r.text[:200], "seconds": dt}
        d = r.json()
        return {"ok": True, "text": d["choices"][0]["message"]["content"], "seconds": dt,
                "tokens": d["usage"]["completion_tokens"]}
    except Exception as e:  # a failed request is counted, not fatal
        return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


def run_load(url: str, requests: list[dict], clients: int) -> dict:
    """Send ``requests`` from ``clients`` concurrent clients, then each alone; compare."""
    import httpx

    lock = threading.Lock()
    todo = list(enumerate(requests))
    results: list[dict | None] = [None] * len(requests)

    def client_loop() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not todo:
                        return
                    i, req = todo.pop(0)
                results[i] = _send(client, url, req["body"])

    before = httpx.get(url + "/health", timeout=10).json()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(client_loop) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health", timeout=10).json()
    alone = []
    with httpx.Client() as client:
        for req in requests:
            alone.append(_send(client, url, req["body"]))
    failed = [i for i, r in enumerate(results) if not r["ok"]] + [i for i, r in enumerate(alone) if not r["ok"]]
    crosstalk = [i for i, (r, a) in enumerate(zip(results, alone)) if r["ok"] and a["ok"] and r["text"] != a["text"]]
    lat = sorted(r["seconds"] for r in results if r["ok"])
    tokens = sum(r.get("tokens", 0) for r in results if r["ok"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")

    by_kind = {k: sum(1 for r in requests if r["kind"] == k) for k in STEERINGS}
    distinct = {k: len({results[i]["text"] for i, r in enumerate(requests) if r["kind"] == k and results[i]["ok"]})
                for k in STEERINGS}
    return {"requests": len(requests), "clients": clients, "failed": len(failed), "crosstalk": len(crosstalk),
            "crosstalk_examples": [{"request": requests[i]["body"], "concurrent": results[i]["text"],
                                    "alone": alone[i]["text"]} for i in crosstalk[:3]],
            "errors": [(results + alone)[i].get("error") for i in failed[:3]],
            "p50_s": pct(0.5), "p95_s": pct(0.95), "wall_s": wall, "generated_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else float("nan"), "by_steering": by_kind,
            "texts": [r.get("text") for r in results],
            "steps": after["steps"] - before["steps"],
            "generated_tokens_server": after["generated_tokens"] - before["generated_tokens"],
            "max_seqs_in_step": after["max_seqs_in_step"],
            "distinct_texts": distinct}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=8, help="the server's slots")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (on a busy 2-core machine, 2 threads make ggml's spinning workers stall)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--organism", type=Path, default=None,
                    help="folder of an organism build to reuse (default: built once under the cache)")
    a = ap.parse_args()
    model, _, prompts, shape = organism_with_profile(a.organism)
    reqs = make_requests(a.requests, prompts, shape, a.max_tokens)
    server = ServerProcess(model, "--parallel", str(a.parallel), "--ctx", "256", "--threads", str(a.threads))
    try:
        res = run_load(server.url, reqs, a.clients)
        res["server"] = server.health()
    finally:
        server.close()
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    res["command"] = "bench/load_serve.py " + " ".join(sys.argv[1:])
    print(f"edge-mote serve load test ({res['machine']}): {res['requests']} requests from {res['clients']} clients, "
          f"--parallel {a.parallel}, greedy, max_tokens {a.max_tokens}, steering cycling {'/'.join(STEERINGS)}")
    print(f"  failed: {res['failed']}   cross-talk (differs from the same request alone): {res['crosstalk']}")
    print(f"  latency p50 {res['p50_s']:.3f} s  p95 {res['p95_s']:.3f} s   wall {res['wall_s']:.1f} s   "
          f"{res['tokens_per_s']:.1f} generated tok/s")
    print(f"  server (concurrent phase): {res['steps']} decode steps for {res['generated_tokens_server']} generated "
          f"tokens, up to {res['max_seqs_in_step']} sequences in one step; distinct answers per steering kind: "
          f"{res['distinct_texts']}")
    for ex in res["crosstalk_examples"]:
        print("  cross-talk:", json.dumps(ex)[:400])
    for err in res["errors"]:
        print("  error:", err)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0 if res["failed"] == 0 and res["crosstalk"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
