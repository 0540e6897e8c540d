"""Helpers for the cluster tests: workers as separate processes, fake workers, process bookkeeping."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class WorkerProc:
    """``edge-mote worker`` in its own process (and process group)."""

    def __init__(self, port: int | None = None, *extra: str, host: str = "127.0.0.1", netns: str | None = None,
                 tag: str | None = None):
        self.port = port or free_port()
        self.host = host
        self.extra = extra
        self.netns = netns
        self.tag = tag or uuid.uuid4().hex
        self.proc = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> "WorkerProc":
        cmd = [sys.executable, "-m", "edge_mote", "worker", "--host", self.host, "--port", str(self.port),
               "--threads", "1", *self.extra]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        env = dict(os.environ, EDGE_MOTE_TEST_TAG=self.tag)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        deadline = time.time() + 60
        for line in self.proc.stderr:
            if "worker ready" in line:
                break
            if time.time() > deadline:
                break
        else:
            raise RuntimeError(f"worker on {self.endpoint} did not start (exit {self.proc.wait()})")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        return self

    def server_pid(self) -> int:
        """The ggml-rpc-server process under the supervisor."""
        for _ in range(50):
            for pid in tagged_pids(self.tag):
                try:
                    if b"ggml-rpc-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("no ggml-rpc-server found")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
        # the server may have been left stopped
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries EDGE_MOTE_TEST_TAG=tag (zombies excluded)."""
    needle = f"EDGE_MOTE_TEST_TAG={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    out.append(int(d.name))
        except OSError:
            pass
    return out


class FakeServer:
    """A TCP server that is not a (compatible) worker. ``mode``: 'echo' (sends back what it gets), 'silent'
    (accepts, never answers), 'close' (closes after reading the hello, like an older worker) or 'old' (answers the
    hello like a worker of protocol v6.0.0)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            try:
                data = c.recv(64)
                if self.mode == "echo":
                    c.sendall(data)
                elif self.mode == "close":
                    c.close()
                elif self.mode == "old":
                    c.sendall(struct.pack("<Q", 28) + bytes([6, 0, 0, 0]) + bytes(24))
            except OSError:
                pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def edge_mote(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_mote", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


class NetNS:
    """A network namespace joined to this one by a veth pair (10.213.N.1 here, 10.213.N.2 there), with an optional
    rate limit (``tc tbf``, both directions). This kernel has no netem: latency comes from a delay relay
    (``edge_mote.cluster.relay.Relay`` route with ``delay``, ``frames=False``), see ``emulated_link``."""

    def __init__(self, index: int, rate_mbit: float | None = None):
        self.name = f"emtest{os.getpid() % 10000}x{index}"
        self.dev = f"emv{os.getpid() % 10000}x{index}"
        self.host_ip, self.ns_ip = f"10.213.{index}.1", f"10.213.{index}.2"
        peer = self.dev + "p"
        self._run("ip", "netns", "add", self.name)
        try:
            self._run("ip", "link", "add", self.dev, "type", "veth", "peer", "name", peer)
            self._run("ip", "link", "set", peer, "netns", self.name)
            self._run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.dev)
            self._run("ip", "link", "set", self.dev, "up")
            self._ns("ip", "addr", "add", f"{self.ns_ip}/24", "dev", peer)
            self._ns("ip", "link", "set", peer, "up")
            self._ns("ip", "link", "set", "lo", "up")
            if rate_mbit:
                tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "500ms"]
                self._run("tc", "qdisc", "add", "dev", self.dev, "root", *tbf)
                self._ns("tc", "qdisc", "add", "dev", peer, "root", *tbf)
        except Exception:
            self.close()
            raise

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else the reason."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"ip netns unavailable: {r.stderr.strip()}"
        if subprocess.run(["tc", "-V"], capture_output=True).returncode != 0:
            return "tc (iproute2) unavailable"
        return None

    @staticmethod
    def _run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    def _ns(self, *cmd):
        self._run("ip", "netns", "exec", self.name, *cmd)

    def close(self):
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def emulated_link(relay, target: tuple[str, int], rtt_ms: float) -> str:
    """A loopback endpoint that reaches ``target`` with ``rtt_ms`` of added round-trip latency."""
    route = relay.add_route(f"link-{target[0]}:{target[1]}", target, frames=False, delay=rtt_ms / 2e3)
    return f"127.0.0.1:{route.address[1]}"
