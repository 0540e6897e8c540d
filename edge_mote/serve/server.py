"""Start ``edge-mote serve``: load the model, start the scheduler, bind the socket, run uvicorn until interrupted.

With RPC workers the model is loaded in an isolated child behind the cluster watchdog (``serve/cluster.py``): a
worker fault fails the requests in flight, never the server, which loads the model again once the worker is back."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from ..runtime.rpc import is_loopback

LOOPBACK_WARNING = (
    "warning: serving on {host}, reachable from other machines: edge-mote serve has no user accounts or TLS; "
    "anyone who can reach this port can use the model{key}. Put it behind a reverse proxy with authentication "
    "and TLS, or bind 127.0.0.1.")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    n_ctx: int = 2048                    # tokens per sequence (prompt + generated)
    profile: str | None = None           # the server's steering (None: the GGUF's default profile)
    rpc_servers: Sequence[str] | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    api_key: str | None = None
    name: str | None = None              # the model name clients use (default: the file's stem)
    rpc_fallback: float | None = 10.0    # with RPC workers: seconds after a fault before serving on those that
                                         # remain if the model fits them (None: always wait for every worker)
    plan: str | None = None              # with RPC workers: --plan auto|even|PLAN.json, applied at every (re)load
    prompt_cache_mib: int = 1024         # host memory for finished prompts' KV cells (runtime/scheduler.py)


def serve(cfg: ServeConfig, on_ready: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. ``on_ready(line)`` is called once the socket listens, with the base URL."""
    try:
        import uvicorn

        from .app import ServerState, build_app
    except ImportError as e:
        raise UserError(f"edge-mote serve needs starlette, uvicorn and sse-starlette ({e.name} is missing)",
                        hint="pip install 'edge-mote[serve]'") from None
    from ..ftri.prompts import ChatTemplate
    from ..runtime.model import load
    from ..runtime.scheduler import Scheduler
    from .protocol import Catalog

    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    if cfg.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {cfg.parallel}")
    if not is_loopback(cfg.host):
        warn(LOOPBACK_WARNING.format(host=cfg.host, key="" if cfg.api_key else " (no --api-key given)"))
    cluster = None
    if cfg.rpc_servers:
        from .cluster import ClusterModel

        # the profile is applied in the child, at every (re)load
        model = cluster = ClusterModel(
            cfg.model, list(cfg.rpc_servers), n_seq=cfg.parallel, n_ctx_seq=cfg.n_ctx, profile=cfg.profile,
            load_kwargs=dict(n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_gpu_layers=cfg.n_gpu_layers),
            fallback_after=cfg.rpc_fallback, plan=cfg.plan, warn=warn)
    else:
        model = load(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_gpu_layers=cfg.n_gpu_layers)
    sched = sock = None
    terminated = False
    try:
        sock = _bind(cfg.host, cfg.port)
        if cfg.profile is not None and cluster is None:
            model.use_profile(cfg.profile)
        default_profile = model.info.default_profile if cfg.profile is None else (
            None if cfg.profile == "none" else cfg.profile)
        info = model.info
        catalog = Catalog(
            base=cfg.name or Path(info.path).stem,
            profiles={name: p.steering for name, p in model.profiles.items()},
            default=model.steering, default_profile=default_profile,
            shape=(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used),
            created=int(os.path.getmtime(info.path)))
        template = ChatTemplate.from_model(model)
        sched = Scheduler(model, n_seq=cfg.parallel, n_ctx_seq=cfg.n_ctx,
                          prompt_cache_bytes=max(0, cfg.prompt_cache_mib) << 20).start()
        app = build_app(ServerState(sched, catalog, template, info.n_vocab, cfg.api_key, cluster))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        names = ", ".join(catalog.names())
        on_ready(f"edge-mote serve: http://{url_host}:{port}/v1  models: {names}  ({cfg.parallel} slots x "
                 f"{cfg.n_ctx} tokens)")
        terminated = _run(server, sock)
    finally:
        if sched is not None:
            sched.close()
        model.close()
        if sock is not None:
            sock.close()
    if terminated:
        signal.raise_signal(signal.SIGTERM)  # die of SIGTERM as uvicorn would have, now that all is closed


class _Terminated(BaseException):
    pass


def _run(server, sock) -> bool:
    """``server.run``; True when it ended for SIGTERM. uvicorn shuts down gracefully, then raises the signal again
    with the previous handler, which by default would end the process before the caller's cleanup (stopping the
    scheduler and, with --rpc, the cluster child cleanly): here that handler returns control to the caller."""
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return False

    def on_term(sig, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.run(sockets=[sock])
        return False
    except _Terminated:
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without it every
    # response on a kept-alive connection waited ~40 ms for the client's delayed ACK (Nagle), 44 ms vs 0.4 ms measured
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        hint="choose another --port (0: any free port) or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
