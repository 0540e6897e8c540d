"""Cluster inference that never takes the caller's process down.

ggml aborts the whole process when an RPC worker dies mid-request and waits forever on a frozen one. ``call``
therefore runs the library function (``run_prompt``, ``scan_and_write``, ``run_eval``, ...) in a child process
(``python -m edge_mote.cluster.child``, result returned through a pipe) and puts a relay (``relay.py``) between
the child and every worker. The relay is the watchdog: it sees a worker close its connection, and a request that
goes unanswered with no progress for ``EDGE_MOTE_RPC_TIMEOUT`` seconds (default 60). Either way the child (its
whole process group) is killed at once -- before ggml notices and aborts -- and the caller gets a one-line
``UserError`` naming the worker. Nothing is left running: the relay stops with the call.

Before anything starts, every worker gets a protocol hello (``runtime.rpc_protocol.preflight``): a port that is
not a worker, a worker of another protocol version, or one that does not answer is a one-line error too. As ggml
only ever sees the relay's ``127.0.0.1:PORT``, IPv6 workers and host names work through it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from ..errors import EdgeMoteError, UserError
from ..runtime.rpc_protocol import WorkerInfo, format_endpoint, parse_endpoint, preflight

DEFAULT_STALL_TIMEOUT = 60.0
PREFLIGHT_TIMEOUT = 5.0


def stall_timeout_default() -> float:
    text = os.environ.get("EDGE_MOTE_RPC_TIMEOUT")
    if not text:
        return DEFAULT_STALL_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"EDGE_MOTE_RPC_TIMEOUT must be a number of seconds, got '{text}'") from None
    if value <= 0:
        raise UserError("EDGE_MOTE_RPC_TIMEOUT must be > 0")
    return value


def health(endpoints: Sequence[str], timeout: float = 2.0) -> list[tuple[str, WorkerInfo | None, str | None]]:
    """Say hello to every worker: ``(endpoint, info or None, one-line problem or None)`` each. Never raises for a
    worker's state (for ``serve`` to poll: a worker that answers again can be used again)."""
    out = []
    for ep in endpoints:
        try:
            info = preflight(ep, timeout)
            out.append((info.endpoint, info, None))
        except UserError as e:
            out.append((ep, None, str(e)))
    return out


def call(fn: Callable, *args, rpc_servers: Sequence[str] | None = None, plan=None,
         rpc_timeout: float | None = None, **kwargs):
    """``fn(*args, **kwargs)``; with ``rpc_servers``, isolated in a child process behind the watchdog.

    ``fn`` must be importable by name (a module-level function) and its result picklable. ``plan`` (``"auto"``,
    ``"even"`` or a ``cluster.plan.Plan``) chooses the layer split and worker order (``cluster.plan``);
    ``rpc_timeout``: seconds a worker may leave a request unanswered (default ``EDGE_MOTE_RPC_TIMEOUT`` or 60).
    A weight-upload progress bar shows on a terminal unless ``fn`` gets ``progress=False``.
    """
    if not rpc_servers:
        if plan not in (None, "none"):
            raise UserError("--plan needs RPC workers (--rpc HOST:PORT,...)")
        return fn(*args, **kwargs)
    return run_isolated(fn, args, kwargs, list(rpc_servers), plan=plan, stall_timeout=rpc_timeout,
                        progress=bool(kwargs.get("progress", True)))


def describe_failure(name: str, kind: str, detail: str, timeout: float) -> UserError:
    if kind == "stalled":
        return UserError(f"RPC worker {name} stopped answering (no reply for {timeout:g} s): it is frozen, asleep "
                         "or cut off", hint="nothing is left running here; wake or restart the worker and run again "
                                            "(EDGE_MOTE_RPC_TIMEOUT=SECONDS if it is only slow)")
    if kind == "unreachable":
        return UserError(f"RPC worker {name} became unreachable mid-run ({detail})",
                         hint="nothing is left running here; restart the worker and run again")
    return UserError(f"RPC worker {name} went away mid-run ({detail}): it crashed, was stopped or lost its network",
                     hint="nothing is left running here; restart the worker (edge-mote worker) and run again")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def _upload_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading weights to workers",
                file=sys.stderr, leave=False)


def run_isolated(fn: Callable, args: tuple, kwargs: dict, endpoints: list[str], *, plan=None,
                 stall_timeout: float | None = None, progress: bool = True):
    from .relay import Relay

    timeout = stall_timeout if stall_timeout is not None else stall_timeout_default()
    infos = [preflight(ep, PREFLIGHT_TIMEOUT) for ep in endpoints]  # one-line errors before anything starts
    seen = set()
    for info in infos:
        if info.endpoint in seen:
            raise UserError(f"RPC worker {info.endpoint} is listed twice")
        seen.add(info.endpoint)
    kwargs = dict(kwargs)
    if plan not in (None, "none"):
        from .plan import apply_plan

        infos, extra = apply_plan(plan, args, kwargs, infos)
        kwargs.update(extra)

    relay = Relay().start()
    proc = None
    rfd = wfd = -1
    bar = None
    failure = None
    data = bytearray()
    try:
        routes = [relay.add_route(info.endpoint, parse_endpoint(info.endpoint), stall_timeout=timeout)
                  for info in infos]
        kwargs["rpc_servers"] = [format_endpoint(*r.address) for r in routes]
        payload = pickle.dumps((fn, args, kwargs))
        rfd, wfd = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "edge_mote.cluster.child", str(wfd)], stdin=subprocess.PIPE,
                                pass_fds=(wfd,), start_new_session=True)
        os.close(wfd)
        wfd = -1
        proc.stdin.write(payload)
        proc.stdin.close()
        bar = _upload_bar(progress)
        eof = False
        while not eof:
            ready, _, _ = select.select([rfd], [], [], 0.1)
            if ready:
                chunk = os.read(rfd, 1 << 20)
                if chunk:
                    data += chunk
                else:
                    eof = True
            if not relay.events.empty():
                failure = relay.events.get_nowait()
                break
            if bar is not None:
                up = sum(r.stats.uploaded for r in routes)
                bar.update(up - bar.n)
                if any(r.stats.graph_computes for r in routes):
                    bar.close()
                    bar = None
        if failure is None:
            proc.wait()
            # the child may have died of a worker failure the relay saw just before
            time.sleep(0.05)
            if not data and not relay.events.empty():
                failure = relay.events.get_nowait()
    except KeyboardInterrupt:
        raise
    finally:
        if bar is not None:
            bar.close()
        if proc is not None:
            kill_group(proc)
        relay.close()
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
    if failure is not None:
        raise describe_failure(*failure, timeout) from None
    if not data:
        return blame_worker(proc.returncode, infos)
    return unpack_outcome(pickle.loads(bytes(data)))


def unpack_outcome(outcome):
    """The child's ``("ok", value)`` as the value, or its ``("error", ...)`` raised again here."""
    if outcome[0] == "ok":
        return outcome[1]
    _, cls_name, message, hint, is_user, tb = outcome
    if os.environ.get("EDGE_MOTE_DEBUG") == "1" and tb:
        sys.stderr.write(tb)
    if is_user:
        raise UserError(message, hint=hint)
    if cls_name == "EdgeMoteError":
        raise EdgeMoteError(message, hint=hint)
    raise EdgeMoteError(f"{cls_name}: {message}", hint=hint or "rerun with EDGE_MOTE_DEBUG=1 for a traceback")


def blame_worker(returncode: int, infos: list[WorkerInfo]):
    """The child ended without a result: blame a worker that no longer answers, else report the signal."""
    for info in infos:
        try:
            preflight(info.endpoint, 2.0)
        except UserError as e:
            raise UserError(f"the run stopped because {str(e)[0].lower()}{str(e)[1:]}",
                            hint="nothing is left running here; restart the worker and run again") from None
    how = f"signal {signal.Signals(-returncode).name}" if returncode and returncode < 0 else f"exit code {returncode}"
    raise EdgeMoteError(f"the cluster inference process died ({how})",
                        hint="rerun with EDGE_MOTE_DEBUG=1 and verbose logs to see llama.cpp's message")
