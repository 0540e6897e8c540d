"""llama.cpp's RPC backend: run layers on other machines (``ggml-rpc-server`` workers) on a home cluster.

Security: an RPC worker executes whatever graph a client sends and reads/writes its memory on request, with no
authentication or encryption (llama.cpp calls it a proof of concept; advisories have shown memory corruption from
crafted requests). Anyone who can reach its port can use it, so workers bind to 127.0.0.1 unless the user explicitly
asks otherwise, and then only on a trusted private network.
"""

from __future__ import annotations

import socket
from typing import Iterable

from ..errors import UserError

DEFAULT_PORT = 50052
LOCAL_HOST = "127.0.0.1"

EXPOSURE_WARNING = (
    "the RPC worker accepts unauthenticated, unencrypted requests that read and write its memory and run "
    "arbitrary compute graphs: anyone who can reach {endpoint} can use (and may compromise) this machine. "
    "Expose it only on a private network you trust, never to the internet."
)


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise UserError(f"bad RPC worker '{text}': expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    try:
        p = int(port)
    except ValueError:
        raise UserError(f"bad RPC worker '{text}': PORT must be a number") from None
    if not 0 < p < 65536:
        raise UserError(f"bad RPC worker '{text}': PORT must be 1-65535")
    return host.strip("[]"), p


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    """Raise a one-line UserError when no RPC worker answers at ``endpoint`` (ggml would abort instead)."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"RPC worker {host}:{port} is unreachable ({e.strerror or e})",
                        hint=f"start one there with `edge-mote rpc-worker --port {port}` (or ggml-rpc-server)") from None


def connect(endpoints: Iterable[str]) -> list[str]:
    """Check and register RPC workers so that llama.cpp can place layers on them."""
    from . import bindings as B

    out = []
    for ep in endpoints:
        host, port = parse_endpoint(ep)
        norm = f"{host}:{port}"
        check_reachable(norm)
        B.add_rpc_server(norm)
        out.append(norm)
    return out


def check_registered() -> None:
    """Every RPC worker registered in this process must still answer: llama.cpp queries all devices on load, and
    ggml aborts the process if one is gone. (Registration cannot be undone within a process.)"""
    from . import bindings as B

    for ep in sorted(B._rpc_registered):
        try:
            check_reachable(ep, timeout=2.0)
        except UserError as e:
            raise UserError(f"{e} (it was connected earlier in this process, and llama.cpp cannot forget it)",
                            hint="restart that worker, or start a new process") from None


def worker_command(host: str = LOCAL_HOST, port: int = DEFAULT_PORT, threads: int | None = None,
                   device: str | None = None, cache: bool = False) -> list[str]:
    """The ggml-rpc-server command line for a worker (built with the patch; the RPC protocol is unchanged)."""
    from .native import tool

    cmd = [str(tool("ggml-rpc-server")), "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if device:
        cmd += ["-d", device]
    if cache:
        cmd += ["-c"]
    return cmd
