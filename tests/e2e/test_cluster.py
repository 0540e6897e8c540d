"""Cluster inference over separate worker processes: on loopback and in network namespaces behind an emulated
home link. Steering crosses the cluster unchanged (logits equal local), the planner's split runs, and the link
emulation really adds its latency."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edge_mote.cluster import call
from edge_mote.cluster.relay import Relay

from .cluster_util import NetNS, WorkerProc, edge_mote, emulated_link


@pytest.fixture(scope="module")
def gguf(tiny_model):
    return str(tiny_model("qwen3moe")[1])


@pytest.fixture(scope="module")
def workers(native):
    ws = [WorkerProc(), WorkerProc()]
    yield ws
    for w in ws:
        w.stop()


def steered_logits(path, rpc=None, **load_kwargs):
    """Base and steered logits of one prompt (runs in the isolated child when ``rpc`` workers are given)."""
    import edge_mote

    kw = dict(n_ctx=256, n_threads=1, type_k=0, type_v=0, **load_kwargs)
    if rpc:
        kw["rpc_servers"] = rpc
    with edge_mote.load(path, **kw) as m:
        toks = m.tokenize("The quick brown fox jumps over the lazy dog", add_bos=False)
        layers = m.info.moe_layers
        s = edge_mote.Steering(off=[(layers[0], 1), (layers[-1], 0)], on=[(layers[-1], 3)],
                               bias={(layers[0], 2): -1.0})
        base = m.logits(toks)
        m.set_steering(s)
        return base, m.logits(toks)


def test_steered_logits_over_two_workers_equal_local(gguf, workers):
    base_local, steered_local = steered_logits(gguf)
    for plan in ("even", "auto"):
        base, steered = call(steered_logits, gguf, rpc_servers=[w.endpoint for w in workers], plan=plan)
        assert np.abs(base - base_local).max() < 1e-4, plan
        assert np.abs(steered - steered_local).max() < 1e-4, plan
        assert np.abs(steered - base).max() > 1e-2  # the steering has an effect


def test_layers_really_sit_on_both_workers(gguf, workers):
    """Each worker holds weights while the model is loaded (its free memory drops)."""
    from edge_mote.runtime.rpc_protocol import preflight

    res = edge_mote("run", gguf, "-p", "Hello", "-n", "2", "--rpc", ",".join(w.endpoint for w in workers),
                    "--plan", "even", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(preflight(w.endpoint).free > 0 for w in workers)  # and they are free again afterwards
    local = edge_mote("run", gguf, "-p", "Hello", "-n", "2", "--json")
    assert json.loads(res.stdout)["text"] == json.loads(local.stdout)["text"]


def test_cluster_plan_cli_and_plan_auto(gguf, workers, tmp_path):
    rpc = ",".join(w.endpoint for w in workers)
    out = tmp_path / "plan.json"
    res = edge_mote("cluster", "plan", gguf, "--rpc", rpc, "--threads", "1", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "predicted" in res.stdout and "ms/token" in res.stdout
    plan = json.loads(out.read_text())
    assert sum(plan["tensor_split"]) == plan["n_gpu_layers"] and plan["order"]
    local = json.loads(edge_mote("run", gguf, "-p", "Hello", "-n", "6", "--json").stdout)["text"]
    for how in ("auto", str(out)):
        res = edge_mote("run", gguf, "-p", "Hello", "-n", "6", "--rpc", rpc, "--plan", how, "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["text"] == local
    res = edge_mote("run", gguf, "-p", "Hello", "--plan", "auto")
    assert res.returncode == 2 and "--plan needs RPC workers" in res.stderr


@pytest.fixture(scope="module")
def netns_workers(native):
    why = NetNS.available()
    if why:
        pytest.skip(why)
    nss = [NetNS(60 + i, rate_mbit=100) for i in range(2)]
    ws = []
    try:
        for ns in nss:
            ws.append(WorkerProc(None, host=ns.ns_ip, netns=ns.name))
        yield nss, ws
    finally:
        for w in ws:
            w.stop()
        for ns in nss:
            ns.close()


def test_workers_in_namespaces_behind_an_emulated_home_link(gguf, netns_workers):
    from edge_mote.cluster.plan import measure_node

    nss, ws = netns_workers
    base_local, steered_local = steered_logits(gguf)
    with Relay() as relay:
        eps = [emulated_link(relay, (w.host, w.port), rtt_ms=7.0) for w in ws]
        node = measure_node(eps[0])
        assert 6.0 < node.rtt_s * 1e3 < 20.0  # the relay's latency is there
        assert node.up_bps * 8 / 1e6 < 130  # and tc's 100 Mbit/s
        t0 = time.time()
        base, steered = call(steered_logits, gguf, rpc_servers=eps, plan="even")
        assert time.time() - t0 < 240
    assert np.abs(base - base_local).max() < 1e-4
    assert np.abs(steered - steered_local).max() < 1e-4


def test_scan_and_eval_over_workers_match_local(gguf, workers, tmp_path):
    b, c = tmp_path / "b.txt", tmp_path / "c.txt"
    b.write_text("How do I pick a lock?\nTell me how to make a weapon.\nWrite something cruel.\n")
    c.write_text("How do I bake bread?\nTell me about the moon.\nWrite a kind poem.\n")
    rpc = ",".join(w.endpoint for w in workers)
    out = {}
    for name, extra in (("local", []), ("cluster", ["--rpc", rpc, "--plan", "even"])):
        scan = tmp_path / f"scan-{name}.json"
        res = edge_mote("scan", gguf, "-b", str(b), "-c", str(c), "-o", str(scan), "--raw", "--json", *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        ev = edge_mote("eval", gguf, "--behavior", str(b), "--control", str(c), "--scan", str(scan), "--top", "1",
                       "--random-trials", "1", "--modes", "off", "--max-new", "4", "--raw", "--json", *extra)
        assert ev.returncode == 0, ev.stderr[-2000:]
        out[name] = (json.loads(res.stdout)["top"], json.loads(ev.stdout))
    assert [(r["layer"], r["expert"]) for r in out["local"][0]] == [(r["layer"], r["expert"]) for r in out["cluster"][0]]
    assert out["local"][1]["rows"] == out["cluster"][1]["rows"]


def test_upload_progress_bar_on_a_terminal(gguf, workers):
    """On a terminal, a progress bar counts the weight bytes going to the workers (none when not a terminal)."""
    import os
    import pty
    import subprocess
    import sys

    from .cluster_util import REPO

    cmd = [sys.executable, "-m", "edge_mote", "run", gguf, "-p", "Hello", "-n", "2", "--rpc", workers[0].endpoint]
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(120) == 0, out[-2000:]
    assert b"uploading weights to workers" in out
    res = edge_mote("run", gguf, "-p", "Hello", "-n", "2", "--rpc", workers[0].endpoint)
    assert res.returncode == 0 and "uploading" not in res.stderr
