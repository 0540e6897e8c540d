"""Steering works unchanged when the layers sit on an RPC device (a local ggml-rpc-server on 127.0.0.1).

RPC devices stay registered for the life of a process, so the comparison runs in a child process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

import edge_mote
from edge_mote import UserError

CHILD = r"""
import json, sys
import numpy as np
import edge_mote
gguf, worker = sys.argv[1], sys.argv[2]
kw = dict(n_ctx=256, n_threads=1, type_k=0, type_v=0)
out = {}
with edge_mote.load(gguf, **kw) as local:
    toks = local.tokenize("The quick brown fox jumps over the lazy dog", add_bos=False)
    layers = local.info.moe_layers
    s = edge_mote.Steering(off=[(layers[0], 1), (layers[-1], 0)], on=[(layers[-1], 3)], bias={(layers[0], 2): -1.0})
    base_local = local.logits(toks)
    local.set_steering(s)
    steered_local, trace_local = local.logits(toks), local.routing(toks)
with edge_mote.load(gguf, rpc_servers=[worker], verbose=True, **kw) as remote:  # the log says where layers go
    base_remote = remote.logits(toks)
    remote.set_steering(s)
    steered_remote, trace_remote = remote.logits(toks), remote.routing(toks)
    remote.set_steering(None)
    out["cleared"] = float(np.abs(remote.logits(toks) - base_local).max())
out["base"] = float(np.abs(base_remote - base_local).max())
out["steered"] = float(np.abs(steered_remote - steered_local).max())
out["effect"] = float(np.abs(steered_remote - base_remote).max())
out["routing_equal"] = all(np.array_equal(trace_remote.ids[l], trace_local.ids[l]) for l in trace_local.layers)
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_worker(native):
    port = free_port()
    proc = subprocess.Popen([str(native.tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("ggml-rpc-server did not start")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseekv3"])
def test_steering_on_rpc_device_matches_local(arch, tiny_model, rpc_worker):
    gguf = tiny_model(arch)[1]
    res = subprocess.run([sys.executable, "-c", CHILD, str(gguf), rpc_worker], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert f"assigned to device RPC0" in res.stderr and "offloaded" in res.stderr  # the layers sit on the worker
    assert out["base"] < 1e-4 and out["cleared"] < 1e-4
    assert out["steered"] < 1e-4
    assert out["effect"] > 1e-2
    assert out["routing_equal"]


def test_unreachable_rpc_worker_is_a_one_line_error(tiny_model):
    port = free_port()  # nothing listens there
    with pytest.raises(UserError, match=f"RPC worker 127.0.0.1:{port} is unreachable"):
        edge_mote.load(tiny_model("qwen3moe")[1], rpc_servers=[f"127.0.0.1:{port}"])
    with pytest.raises(UserError, match="expected HOST:PORT"):
        edge_mote.load(tiny_model("qwen3moe")[1], rpc_servers=["nonsense"])
