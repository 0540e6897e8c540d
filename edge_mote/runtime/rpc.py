"""llama.cpp's RPC backend: run layers on other machines (``ggml-rpc-server`` workers) on a home cluster.

Security: an RPC worker executes whatever graph a client sends and reads/writes its memory on request, with no
authentication or encryption (llama.cpp calls it a proof of concept; advisories have shown memory corruption from
crafted requests). Anyone who can reach its port can use it, so workers bind to 127.0.0.1 unless the user explicitly
asks otherwise, and then only on a trusted private network.

ggml itself aborts the process when a worker is not what it expects (a port that is not a worker, another
protocol version) and hangs when one freezes. ``connect`` therefore says hello to every worker in Python first
(``rpc_protocol.preflight``: version checked, with a timeout). A worker that fails *during* inference still takes
the process down: ``edge_mote.cluster.isolate`` runs cluster inference in a child process with a watchdog.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

from ..errors import UserError
from .rpc_protocol import WorkerInfo, format_endpoint, parse_endpoint, preflight

DEFAULT_PORT = 50052
LOCAL_HOST = "127.0.0.1"
PREFLIGHT_TIMEOUT = 5.0

EXPOSURE_WARNING = (
    "the RPC worker accepts unauthenticated, unencrypted requests that read and write its memory and run "
    "arbitrary compute graphs, and it sees every weight a client uploads: anyone who can reach {endpoint} can "
    "use (and may compromise) this machine. Expose it only on a private network you trust, never to the internet."
)

__all__ = ["DEFAULT_PORT", "LOCAL_HOST", "EXPOSURE_WARNING", "parse_endpoint", "format_endpoint", "preflight",
           "WorkerInfo", "check_reachable", "ggml_endpoint", "connect", "check_registered", "is_loopback"]


def check_reachable(endpoint: str, timeout: float = PREFLIGHT_TIMEOUT) -> WorkerInfo:
    """A one-line UserError unless a compatible RPC worker answers the hello at ``endpoint``."""
    return preflight(endpoint, timeout)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ggml_endpoint(endpoint: str) -> str:
    """The ``a.b.c.d:port`` form ggml can use: it splits at the first colon and connects over IPv4 only, so a
    host name is resolved here and an IPv6 address is refused with a clear message."""
    host, port = parse_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise UserError(f"cannot resolve RPC worker host '{host}' to an IPv4 address ({e.strerror})") from None
        return f"{infos[0][4][0]}:{port}"
    if ip.version == 6:
        raise UserError(f"RPC worker {format_endpoint(host, port)}: llama.cpp's RPC client connects over IPv4 only",
                        hint="the edge-mote CLI relays IPv6 workers (cluster inference runs through a local relay); "
                             "in Python use edge_mote.cluster.call, or give the worker's IPv4 address")
    return f"{host}:{port}"


def connect(endpoints: Iterable[str]) -> list[str]:
    """Preflight and register RPC workers so that llama.cpp can place layers on them (in this order)."""
    from . import bindings as B

    out = []
    for ep in endpoints:
        norm = ggml_endpoint(ep)
        preflight(norm, PREFLIGHT_TIMEOUT)
        B.add_rpc_server(norm)
        out.append(norm)
    return out


def check_registered() -> None:
    """Every RPC worker registered in this process must still answer: llama.cpp queries all devices on load, and
    ggml aborts the process if one is gone. (Registration cannot be undone within a process.)"""
    from . import bindings as B

    for ep in sorted(B._rpc_registered):  # (bindings has no public accessor yet: reported to the lead)
        try:
            preflight(ep, timeout=2.0)
        except UserError as e:
            raise UserError(f"{e} (it was connected earlier in this process, and llama.cpp cannot forget it)",
                            hint="restart that worker, or start a new process") from None


def worker_command(host: str = LOCAL_HOST, port: int = DEFAULT_PORT, threads: int | None = None,
                   device: str | None = None, cache: bool = False) -> list[str]:
    """The ggml-rpc-server command line for a worker (built with the patch; the RPC protocol is unchanged).
    ggml-rpc-server binds IPv4 addresses only; ``edge-mote worker`` puts a relay in front for other addresses."""
    from .native import tool

    cmd = [str(tool("ggml-rpc-server")), "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if device:
        cmd += ["-d", device]
    if cache:
        cmd += ["-c"]
    return cmd
