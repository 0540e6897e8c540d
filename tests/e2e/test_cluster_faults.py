"""Cluster inference never takes the caller down: bad endpoints, dead, frozen and restarted workers.

Workers are separate ``edge-mote worker`` processes on loopback; the CLI runs as a subprocess (its exit code and
stderr are checked) or ``edge_mote.cluster.call`` runs in this very process (which must survive).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from edge_mote import UserError
from edge_mote.cluster import Runner, WorkerLost, call, health

from .cluster_util import REPO, FakeServer, WorkerProc, edge_mote, error_lines, free_port, tagged_pids


@pytest.fixture(scope="module")
def gguf(tiny_model):
    return str(tiny_model("qwen3moe")[1])


@pytest.fixture
def worker(native):
    w = WorkerProc()
    yield w
    w.stop()


def long_greedy(path, n_new, **load_kwargs):
    """Runs in the isolated child: a long greedy decode that never stops at EOS."""
    import edge_mote

    with edge_mote.load(path, **load_kwargs) as m:
        new, _ = m.greedy(m.tokenize("Hello world"), n_new, stop_at_eos=False)
        return len(new)


def wait_busy(port: int, timeout: float = 60.0) -> None:
    """Until a client holds a connection to the worker (the model is loading or running), plus a moment."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{port} )"], capture_output=True,
                             text=True).stdout
        if out.strip():
            time.sleep(2.0)
            return
        time.sleep(0.1)
    raise AssertionError("no client connected to the worker")


def one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = error_lines(res.stderr)
    assert len(lines) <= 2 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines
    assert "GGML" not in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("mode,needle", [
    ("echo", "is not a compatible RPC worker"),
    ("close", "is not a compatible RPC worker: it closed the connection"),
    ("old", "speaks ggml-rpc protocol v6.0.0"),
])
def test_not_a_worker_is_a_one_line_error(gguf, native, mode, needle):
    fake = FakeServer(mode)
    try:
        res = edge_mote("run", gguf, "-p", "Hello", "-n", "2", "--rpc", fake.endpoint)
        one_line_error(res, fake.endpoint, needle)
    finally:
        fake.close()


def test_silent_port_times_out(gguf, native):
    fake = FakeServer("silent")
    try:
        t0 = time.time()
        res = edge_mote("run", gguf, "-p", "Hello", "-n", "2", "--rpc", fake.endpoint)
        one_line_error(res, fake.endpoint, "did not answer the RPC hello")
        assert time.time() - t0 < 60
    finally:
        fake.close()


def test_bad_endpoints(gguf, native):
    port = free_port()
    one_line_error(edge_mote("run", gguf, "-p", "Hi", "--rpc", f"127.0.0.1:{port}"), "unreachable")
    one_line_error(edge_mote("run", gguf, "-p", "Hi", "--rpc", f"::1:{port}"), "put an IPv6 address in brackets")
    one_line_error(edge_mote("run", gguf, "-p", "Hi", "--rpc", "nonsense"), "expected HOST:PORT")
    # the library (no relay) refuses IPv6 for ggml clearly instead of aborting in ggml's first-colon split
    import edge_mote as em

    with pytest.raises(UserError, match="IPv4 only"):
        em.load(gguf, rpc_servers=[f"[::1]:{port}"])


def test_kill9_mid_generation(gguf, worker):
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "edge_mote", "run", gguf, "-p", "Hello world", "-n", "1500",
                             "--ctx", "2048", "--threads", "1", "--rpc", worker.endpoint], cwd=REPO,
                            env=dict(os.environ, EDGE_MOTE_TEST_TAG=tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_busy(worker.port)
    assert proc.poll() is None, "the run ended before the worker was killed"
    worker.kill9()
    out, err = proc.communicate(timeout=60)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    one_line_error(res, worker.endpoint, "went away mid-run")
    assert tagged_pids(tag) == []  # nothing left running
    # a restarted worker is usable again
    worker.start()
    res = edge_mote("run", gguf, "-p", "Hello", "-n", "4", "--rpc", worker.endpoint)
    assert res.returncode == 0, res.stderr[-2000:]


def test_sigstop_in_process_and_recovery(gguf, worker):
    server = worker.server_pid()
    before = set(tagged_pids(worker.tag))

    def freeze_later():
        wait_busy(worker.port)
        os.kill(server, signal.SIGSTOP)

    import threading

    t = threading.Thread(target=freeze_later, daemon=True)
    t.start()
    t0 = time.time()
    with pytest.raises(UserError, match=f"RPC worker {worker.endpoint} stopped answering"):
        call(long_greedy, gguf, 1500, rpc_servers=[worker.endpoint], rpc_timeout=3, n_ctx=2048, n_threads=1)
    assert time.time() - t0 < 120
    t.join()
    # this process is alive (we are here), and the isolated child is gone
    assert [p for p in children_of_self() if b"edge_mote.cluster.child" in cmdline(p)] == []
    os.kill(server, signal.SIGCONT)  # the worker wakes up, finds its client gone (EPIPE, not SIGPIPE), serves again
    time.sleep(1.0)
    assert set(tagged_pids(worker.tag)) == before, "the worker's server died or was restarted"
    assert health([worker.endpoint])[0][2] is None
    assert call(long_greedy, gguf, 8, rpc_servers=[worker.endpoint], n_ctx=256, n_threads=1) == 8


def children_of_self() -> list[int]:
    from .cluster_util import children_of

    return children_of(os.getpid())


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _vanish(endpoint: str, size: int = 64 << 20) -> None:
    """A client that asks for a big tensor and disappears (RST) before reading the answer."""
    from edge_mote.runtime import rpc_protocol as P

    host, port = P.parse_endpoint(endpoint)
    c = P.Conn(host, port)
    c.hello()
    ptr, _ = c.alloc_buffer(size)
    base = c.buffer_base(ptr)
    t = P.pack_tensor(1, (size // 4,), buffer=ptr, data=base)
    c.send(P.GET_TENSOR, t + struct.pack("<QQ", 0, size))
    c.close()  # the worker's next write after our kernel answers with RST raises SIGPIPE


def test_worker_survives_a_vanishing_client(native, worker):
    server = worker.server_pid()
    for _ in range(3):
        _vanish(worker.endpoint)
        time.sleep(0.5)
    assert health([worker.endpoint])[0][2] is None
    assert worker.server_pid() == server  # not even restarted: SIGPIPE is ignored
    # stock ggml-rpc-server with the default SIGPIPE action dies of the same client
    port = free_port()
    stock = subprocess.Popen([str(native.tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, restore_signals=True)
    try:
        for _ in range(100):
            if health([f"127.0.0.1:{port}"], 0.5)[0][2] is None:
                break
            time.sleep(0.1)
        for _ in range(3):
            if stock.poll() is not None:
                break
            _vanish(f"127.0.0.1:{port}")
            time.sleep(0.5)
        assert stock.wait(10) == -signal.SIGPIPE
    finally:
        stock.kill()
        stock.wait()


def test_worker_mem_cap(native):
    from edge_mote.runtime import rpc_protocol as P

    w = WorkerProc(None, "--mem", "0.25")
    try:
        info = P.preflight(w.endpoint)
        assert info.devices[0][1] == 1 << 28
        with P.Conn("127.0.0.1", w.port) as c:
            c.hello()
            ptr, size = c.alloc_buffer(200 << 20)
            assert ptr and size >= 200 << 20
            assert c.device_memory()[0] <= (1 << 28) - (200 << 20)
            assert c.alloc_buffer(100 << 20) == (0, 0)  # beyond the cap: refused, the connection still works
            c.free_buffer(ptr)
            assert c.alloc_buffer(100 << 20)[0] != 0
    finally:
        w.stop()


def test_ipv6_worker(gguf, native):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    w = WorkerProc(None, host="::1")
    try:
        res = edge_mote("run", gguf, "-p", "Hello", "-n", "4", "--rpc", w.endpoint, "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        local = edge_mote("run", gguf, "-p", "Hello", "-n", "4", "--json")
        import json

        assert json.loads(res.stdout)["text"] == json.loads(local.stdout)["text"]
    finally:
        w.stop()


def greedy_n(model, n):
    """Runs in a Runner's child: ``model`` is what the setup (edge_mote.load) returned."""
    new, _ = model.greedy(model.tokenize("Hello world"), n, stop_at_eos=False)
    return len(new)


def test_runner_session_survives_calls_and_reports_a_lost_worker(gguf, worker):
    import edge_mote as em

    kw = {"n_ctx": 2048, "n_threads": 1}
    with Runner([worker.endpoint], em.load, (gguf,), kw, stall_timeout=5) as r:
        assert r.call(greedy_n, 4) == 4 and r.call(greedy_n, 6) == 6  # the model stays loaded between calls
        import threading

        threading.Timer(3.0, worker.kill9).start()
        with pytest.raises(WorkerLost, match=f"RPC worker {worker.endpoint}") as e:
            r.call(greedy_n, 1500)
        assert e.value.endpoint == worker.endpoint and not r.alive
        assert r.proc.poll() is not None  # the child is gone
    assert health([worker.endpoint])[0][1] is None
    worker.start()  # back: a new session works
    assert health([worker.endpoint])[0][2] is None
    with Runner([worker.endpoint], em.load, (gguf,), kw) as r:
        assert r.call(greedy_n, 3) == 3
