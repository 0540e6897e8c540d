"""``edge-mote worker``: llama.cpp's RPC server, supervised, on loopback unless asked otherwise.

What it adds to a bare ``ggml-rpc-server``:

- it survives a client that vanishes mid-request: the server runs with SIGPIPE ignored (stock ``rpc-server``,
  started from a shell, dies of SIGPIPE when it answers a client that is gone) and is restarted if it still dies
  (e.g. on a malformed request that trips an assert);
- ``--mem GiB`` caps the memory it offers: a relay in front (``relay.py``) shrinks the GET_DEVICE_MEMORY answers
  (what llama.cpp's default split and ``cluster plan`` read) and refuses allocations beyond the cap cleanly;
- IPv6 addresses and host names for ``--host`` (ggml-rpc-server binds IPv4 literals only): the relay listens there;
- the weight cache is on by default (``--cache DIR``; ``--no-cache``): a second load of the same model sends only
  hashes for tensors over 10 MiB, the worker reads them from its disk.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..runtime.rpc import DEFAULT_PORT, EXPOSURE_WARNING, LOCAL_HOST, is_loopback, worker_command
from ..runtime.rpc_protocol import Conn, format_endpoint, ProtocolError

GIB = 1 << 30


def default_cache_dir() -> Path:
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    return root / "worker-cache"


@dataclass(frozen=True)
class WorkerConfig:
    host: str = LOCAL_HOST
    port: int = DEFAULT_PORT
    mem_gib: float | None = None
    cache_dir: Path | None = None     # None: no weight cache
    threads: int | None = None
    device: str | None = None

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)

    @property
    def needs_relay(self) -> bool:
        if self.mem_gib is not None:
            return True
        try:
            return ipaddress.ip_address(self.host).version != 4
        except ValueError:
            return True  # a host name


def exposure_warning(cfg: WorkerConfig) -> str | None:
    """The warning to print when the worker is reachable from other machines (None on loopback)."""
    return None if is_loopback(cfg.host) else EXPOSURE_WARNING.format(endpoint=cfg.endpoint)


def check_config(cfg: WorkerConfig) -> None:
    if cfg.mem_gib is not None and cfg.mem_gib <= 0:
        raise UserError("--mem must be > 0 GiB")
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot use --host '{cfg.host}': {e.strerror}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr[:2] if fam == socket.AF_INET else addr)
        except OSError as e:
            raise UserError(f"cannot listen on {cfg.endpoint}: {e.strerror}",
                            hint="another worker may already run there; choose another --port") from None


def _die_with_parent() -> None:
    """In the server process before exec: SIGKILL it when the supervisor dies (Linux), so no worker outlives
    ``edge-mote worker``."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_HOST, 0))
        return s.getsockname()[1]


def _wait_ready(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"ggml-rpc-server exited at start (code {proc.returncode})")
        try:
            with Conn(host, port, 1.0) as c:
                c.hello()
            return
        except (OSError, ProtocolError):
            time.sleep(0.1)
    raise UserError(f"ggml-rpc-server did not answer on {format_endpoint(host, port)} within {timeout:g} s")


class Worker:
    """A running worker: ``start()``, then ``wait()`` (supervises, restarts) or ``stop()``."""

    def __init__(self, cfg: WorkerConfig, log=None):
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.proc: subprocess.Popen | None = None
        self.relay = None
        self.route = None
        self.restarts = 0
        self._stop = threading.Event()
        if cfg.needs_relay:
            self.backend = (LOCAL_HOST, _free_port())
        else:
            self.backend = (cfg.host, cfg.port)

    def _spawn(self) -> None:
        cfg = self.cfg
        env = dict(os.environ)
        if cfg.cache_dir is not None:
            env["LLAMA_CACHE"] = str(cfg.cache_dir)  # ggml-rpc-server caches in $LLAMA_CACHE/rpc
        cmd = worker_command(self.backend[0], self.backend[1], cfg.threads, cfg.device, cfg.cache_dir is not None)
        # restore_signals=False keeps SIGPIPE ignored (Python ignores it): a vanished client is then an EPIPE error
        # the server handles, not a signal that kills it
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, restore_signals=False, preexec_fn=_die_with_parent)
        _wait_ready(*self.backend, self.proc)

    def start(self) -> "Worker":
        cfg = self.cfg
        check_config(cfg)
        if cfg.cache_dir is not None:
            Path(cfg.cache_dir, "rpc").mkdir(parents=True, exist_ok=True)
        self._spawn()
        if cfg.needs_relay:
            from .relay import Relay

            self.relay = Relay().start()
            cap = int(cfg.mem_gib * GIB) if cfg.mem_gib is not None else None
            self.route = self.relay.add_route(cfg.endpoint, self.backend, listen=(cfg.host, cfg.port), mem_cap=cap)
        return self

    def wait(self) -> None:
        """Supervise until ``stop()`` (or SIGINT/SIGTERM in the CLI): restart the server if it dies."""
        recent: list[float] = []
        while not self._stop.is_set():
            if self.proc.poll() is not None and not self._stop.is_set():
                code = self.proc.returncode
                now = time.monotonic()
                recent = [t for t in recent if now - t < 60] + [now]
                if len(recent) > 5:
                    raise UserError(f"ggml-rpc-server died {len(recent)} times within a minute (last exit {code})",
                                    hint="run ggml-rpc-server by hand to see why")
                self.log(f"worker: ggml-rpc-server exited ({code}); restarting")
                self.restarts += 1
                self._spawn()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.relay is not None:
            self.relay.close()


def serve(cfg: WorkerConfig, log=None) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM."""
    worker = Worker(cfg, log).start()

    def _term(signum, frame):
        worker.stop()

    old = signal.signal(signal.SIGTERM, _term)
    try:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"worker ready on {cfg.endpoint}" + (f" (cap {cfg.mem_gib:g} GiB)" if cfg.mem_gib else "")
            + (f", weight cache {cfg.cache_dir}" if cfg.cache_dir else ", no weight cache"))
        worker.wait()
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        signal.signal(signal.SIGTERM, old)
