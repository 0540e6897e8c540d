"""`edge-mote serve --rpc ... --plan auto`: the planner's split is applied at every load of the server's cluster child.
Two loopback workers: /health shows the split the planner chose, greedy output equals `edge-mote run --rpc ...
--plan auto`; after the worker holding the output layer is lost the model is planned again over the worker that
answers (--rpc-fallback 0), with the same output."""

from __future__ import annotations

import uuid

from .cluster_util import WorkerProc
from .serve_util import run_cli
from .test_serve_cluster import PROMPT, N, gguf, greedy, start_server, stop_server, wait_health  # noqa: F401


def test_serve_plan_auto_and_again_on_the_worker_that_remains(gguf, native):  # noqa: F811
    ws = [WorkerProc(), WorkerProc()]
    tag = uuid.uuid4().hex
    s = None
    try:
        rpc = ",".join(w.endpoint for w in ws)
        ref = run_cli(gguf, PROMPT, N, "--rpc", rpc, "--plan", "auto")  # before the server holds the workers
        s = start_server(gguf, ws, tag, "--plan", "auto", "--rpc-fallback", "0")
        h = s.health()
        plan = h["cluster"]["plan"]
        assert h["cluster"]["state"] == "ok" and plan["kind"] == "auto", h
        assert plan["order"] and set(plan["order"]) <= {w.endpoint for w in ws}
        assert sum(plan["tensor_split"]) == plan["n_gpu_layers"] and plan["predicted_ms"] > 0
        assert any("--plan auto: --tensor-split" in line for line in s.stderr)
        r = greedy(s)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref

        # lose the worker that holds the output layer: planned again over the one that answers
        victim = next(w for w in ws if w.endpoint == plan["order"][-1])
        other = next(w for w in ws if w is not victim)
        victim.kill9()
        h = wait_health(s, "partial", 120, in_use=[other.endpoint])
        assert h["cluster"]["plan"]["order"] == [other.endpoint] and h["cluster"]["plan"]["kind"] == "auto"
        assert greedy(s).json()["choices"][0]["text"] == ref
    finally:
        if s is not None:
            stop_server(s, tag)
        for w in ws:
            w.stop()
