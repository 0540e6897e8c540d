"""`edge-mote serve --rpc` survives worker faults: workers are separate `edge-mote worker` processes on loopback, the
server a subprocess. A worker killed (kill -9) mid-stream ends that request with an error event naming it, /health
says degraded, new requests get 503 with Retry-After, the server stays up; the worker restarted on the same port is
found again, the model reloaded, and the same greedy request answers as before the fault (and as `edge-mote run`
without workers; a steered request too). A frozen worker (SIGSTOP) fails a request after EDGE_MOTE_RPC_TIMEOUT, a
worker that goes away between requests is noticed without one; nothing is left running after the server stops."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import httpx
import pytest

from .cluster_util import WorkerProc, tagged_pids
from .serve_util import Server, run_cli

PROMPT = "Hello world"
N = 8
STEER_OFF = "0:0,0:1,1:0,1:1,2:0,2:1"   # per-request steering crosses into the isolated child


@pytest.fixture(scope="module")
def gguf(tiny_model):
    return tiny_model("qwen3moe")[1]


@pytest.fixture
def workers(native):
    ws = [WorkerProc(), WorkerProc()]
    yield ws
    for w in ws:
        w.stop()


def greedy(server, n=N):
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": server.name, "prompt": PROMPT, "max_tokens": n, "temperature": 0})
    return r


def wait_health(server, state: str, timeout: float = 120.0, in_use: list | None = None) -> dict:
    deadline = time.time() + timeout
    h = None
    while time.time() < deadline:
        r = httpx.get(server.url + "/health", timeout=10)
        h = r.json()
        if h["cluster"]["state"] == state and (in_use is None or h["cluster"]["in_use"] == in_use):
            assert r.status_code == (200 if state in ("ok", "partial") else 503)
            assert h["status"] == ("degraded" if r.status_code == 503 else "ok")
            return h
        time.sleep(0.2)
    raise AssertionError(f"/health never said {state}: {h}")


def start_server(gguf, workers, tag, *extra, env=None):
    s = Server(gguf, "--rpc", ",".join(w.endpoint for w in workers), "--ctx", "1024", "--parallel", "2",
               "--threads", "1", *extra, env={"EDGE_MOTE_TEST_TAG": tag, **(env or {})})
    s.name = gguf.stem
    return s


def stop_server(s, tag):
    s.close()
    deadline = time.time() + 10
    while tagged_pids(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert tagged_pids(tag) == [], "the server left its cluster child running"
    assert "GGML" not in "".join(s.stderr) and "Traceback" not in "".join(s.stderr), "".join(s.stderr)[-3000:]


def test_kill9_mid_stream_then_the_worker_comes_back(gguf, workers):
    tag = uuid.uuid4().hex
    s = start_server(gguf, workers, tag, "--rpc-fallback", "off")
    try:
        h = s.health()
        assert h["status"] == "ok" and h["cluster"]["state"] == "ok"
        assert h["cluster"]["workers"] == [w.endpoint for w in workers]
        before = greedy(s)
        assert before.status_code == 200, before.text
        text = before.json()["choices"][0]["text"]
        assert text == run_cli(gguf, PROMPT, N)  # over two workers as without any
        steered = httpx.post(s.url + "/v1/completions", timeout=120,
                             json={"model": s.name, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                   "mote": {"off": STEER_OFF}})
        assert steered.status_code == 200, steered.text
        assert steered.json()["choices"][0]["text"] == run_cli(gguf, PROMPT, N, "--off", STEER_OFF)

        victim = workers[0]
        events, error = 0, None
        with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                          json={"model": s.name, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
                                "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    error = obj["error"]
                    continue
                assert obj["choices"][0]["finish_reason"] is None, "the generation ended before the fault"
                events += 1
                if events == 5:
                    victim.kill9()
        assert error is not None, "the stream ended without an error event"
        assert error["code"] == "worker_lost" and error["type"] == "server_error"
        assert victim.endpoint in error["message"] and "went away" in error["message"]

        assert s.proc.poll() is None  # the server is alive
        h = wait_health(s, "degraded", 30)
        assert h["status"] == "degraded" and victim.endpoint in h["cluster"]["error"]
        assert h["cluster"]["faults"] == 1 and h["cluster"]["retry_after"] >= 1
        r = greedy(s)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        msg = r.json()["error"]["message"]
        assert victim.endpoint in msg and "\n" not in msg and r.json()["error"]["code"] == "unavailable"
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 200  # the rest of the API answers

        victim.start()  # back on the same port
        h = wait_health(s, "ok")
        assert h["status"] == "ok" and h["cluster"]["reloads"] == 1
        after = greedy(s)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["text"] == text
        assert any("answers again" in line for line in s.stderr)
    finally:
        stop_server(s, tag)


def test_frozen_worker_and_one_lost_while_idle(gguf, workers):
    tag = uuid.uuid4().hex
    s = start_server(gguf, workers, tag, "--rpc-fallback", "off", env={"EDGE_MOTE_RPC_TIMEOUT": "3"})
    try:
        text = greedy(s).json()["choices"][0]["text"]
        # frozen: the request in flight fails after the stall timeout, with 502 naming the worker
        frozen = workers[1]
        server_pid = frozen.server_pid()
        os.kill(server_pid, signal.SIGSTOP)
        try:
            t0 = time.time()
            r = greedy(s, 200)
            assert r.status_code == 502, r.text
            msg = r.json()["error"]["message"]
            assert frozen.endpoint in msg and "stopped answering" in msg
            assert time.time() - t0 < 60
            assert s.health()["status"] == "degraded"
        finally:
            os.kill(server_pid, signal.SIGCONT)
        wait_health(s, "ok")  # the worker woke up, found its client gone and answers again
        assert greedy(s).json()["choices"][0]["text"] == text

        # gone while nobody asked: noticed without a request
        gone = workers[0]
        gone.kill9()
        h = wait_health(s, "degraded", 30)
        assert gone.endpoint in h["cluster"]["error"]
        gone.start()
        wait_health(s, "ok")
        assert greedy(s).json()["choices"][0]["text"] == text
        assert s.proc.poll() is None
    finally:
        stop_server(s, tag)


def test_fallback_on_the_workers_that_remain_then_back_on_all(gguf, workers):
    """--rpc-fallback 0: a lost worker is not waited for when the model fits elsewhere (the one that remains, then
    this machine alone); every worker is used again once they answer. Greedy output never changes."""
    tag = uuid.uuid4().hex
    s = start_server(gguf, workers, tag, "--rpc-fallback", "0")
    try:
        text = greedy(s).json()["choices"][0]["text"]
        first, second = workers
        first.kill9()
        h = wait_health(s, "partial", 60, in_use=[second.endpoint])
        assert first.endpoint in h["cluster"]["error"]
        assert greedy(s).json()["choices"][0]["text"] == text
        second.kill9()
        wait_health(s, "partial", 60, in_use=[])  # on this machine alone
        assert greedy(s).json()["choices"][0]["text"] == text
        first.start()
        second.start()
        h = wait_health(s, "ok", 120, in_use=[w.endpoint for w in workers])
        assert h["cluster"]["faults"] == 2
        assert greedy(s).json()["choices"][0]["text"] == text
        assert any("without" in line for line in s.stderr) and any("answers again" in line for line in s.stderr)
    finally:
        stop_server(s, tag)


def test_cluster_model_survives_its_child_dying(gguf, native):
    """The in-process API under the server: the isolated child killed outright (not a worker) fails the call with
    ClusterFault, the model is then unavailable, and comes back by itself with the same logits."""
    import numpy as np

    from edge_mote.serve.cluster import ClusterFault, ClusterModel, ClusterUnavailable, _step

    lines = []
    cm = ClusterModel(str(gguf), [], n_seq=1, n_ctx_seq=64, load_kwargs={"n_ctx": 64, "n_threads": 1},
                      warn=lines.append)
    try:
        pc = cm.open_batch(n_seq=1, n_ctx_seq=64)
        toks = cm.tokenize(PROMPT)

        def logits():
            pc.set_sequence_steering(0, None)
            pc.decode([(t, i, 0, i == len(toks) - 1) for i, t in enumerate(toks)])
            row = np.array(pc.logits(1)[0])
            pc.clear_sequence(0)
            return row

        ref = logits()
        os.kill(cm._runner.proc.pid, signal.SIGKILL)
        with pytest.raises(ClusterFault, match="died"):
            cm.call(_step, [(toks[0], 0, 0, True)], 1, False)
        assert not cm.healthy and cm.status()["faults"] == 1
        with pytest.raises(ClusterUnavailable):
            pc.set_sequence_steering(0, None)
        deadline = time.time() + 60
        while not cm.healthy and time.time() < deadline:
            time.sleep(0.2)
        assert cm.status()["state"] == "ok" and cm.reloads == 1
        assert np.array_equal(logits(), ref)
        assert any("answers again" in line for line in lines)
    finally:
        cm.close()
