"""A long-lived isolated session over RPC workers, for ``serve``: the model stays loaded in a child process.

    runner = Runner(endpoints, setup=edge_mote.load, setup_args=("model.gguf",), setup_kwargs={"n_ctx": 2048})
    text = runner.call(generate_fn, "Hello")          # generate_fn(model, "Hello") runs in the child
    ...
    runner.close()

``call`` raises ``WorkerLost`` (a ``UserError`` whose message names the worker) when a worker dies, freezes or
vanishes while the call runs; the child has then been killed and the runner is dead (``alive`` is False): answer the
affected requests with that error, poll ``isolate.health(endpoints)`` and make a new ``Runner`` when every worker
answers again (or one over the workers that remain, if the model still fits). Calls are serialised (one at a time);
the setup's result stays in the child, only ``call`` results (pickled) come back. Any other error raised in the
child comes back as the same ``UserError`` / ``EdgeMoteError`` and leaves the runner alive.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import threading
from typing import Callable, Sequence

from ..errors import EdgeMoteError, UserError
from ..runtime.rpc_protocol import format_endpoint, parse_endpoint, preflight
from .isolate import PREFLIGHT_TIMEOUT, blame_worker, describe_failure, kill_group, stall_timeout_default, unpack_outcome


class WorkerLost(UserError):
    """A worker failed during a call; ``endpoint`` names it."""

    def __init__(self, message: str, hint: str | None = None, endpoint: str | None = None):
        super().__init__(message, hint)
        self.endpoint = endpoint


class Runner:
    def __init__(self, endpoints: Sequence[str], setup: Callable, setup_args: tuple = (),
                 setup_kwargs: dict | None = None, *, stall_timeout: float | None = None):
        from .relay import Relay

        self.timeout = stall_timeout if stall_timeout is not None else stall_timeout_default()
        self.infos = [preflight(ep, PREFLIGHT_TIMEOUT) for ep in endpoints]
        self._lock = threading.Lock()
        self.relay = Relay().start()
        self.proc = None
        self._rfd = -1
        self.alive = False
        try:
            routes = [self.relay.add_route(i.endpoint, parse_endpoint(i.endpoint), stall_timeout=self.timeout)
                      for i in self.infos]
            kwargs = dict(setup_kwargs or {})
            kwargs["rpc_servers"] = [format_endpoint(*r.address) for r in routes]
            rfd, wfd = os.pipe()
            self._rfd = rfd
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_mote.cluster.child", str(wfd), "--loop"],
                                         stdin=subprocess.PIPE, pass_fds=(wfd,), start_new_session=True)
            os.close(wfd)
            self.alive = True
            self._request(setup, tuple(setup_args), kwargs)
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [i.endpoint for i in self.infos]

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(state, *args, **kwargs)`` in the child (``state``: what ``setup`` returned)."""
        with self._lock:
            if not self.alive:
                raise EdgeMoteError("this cluster session has ended (a worker failed or it was closed)")
            return self._request(fn, args, kwargs)

    def _request(self, fn, args, kwargs):
        data = pickle.dumps((fn, args, kwargs))
        try:
            self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone: found below
        buf = bytearray()
        need = None
        failure = None
        while need is None or len(buf) < need:
            ready, _, _ = select.select([self._rfd], [], [], 0.1)
            if ready:
                chunk = os.read(self._rfd, 1 << 20)
                if not chunk:
                    break
                buf += chunk
                if need is None and len(buf) >= 8:
                    need = 8 + int.from_bytes(buf[:8], "little")
            if not self.relay.events.empty():
                failure = self.relay.events.get_nowait()
                break
        if failure is not None or need is None or len(buf) < need:
            self.close()
            if failure is not None:
                e = describe_failure(*failure, self.timeout)
                raise WorkerLost(str(e), e.hint, failure[0]) from None
            try:
                blame_worker(self.proc.returncode, self.infos)
            except UserError as e:
                raise WorkerLost(str(e), e.hint) from None
        return unpack_outcome(pickle.loads(bytes(buf[8:need])))

    def close(self) -> None:
        """End the session: the child, its workers' connections and the relay (idempotent)."""
        self.alive = False
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write((0).to_bytes(8, "little"))
                    self.proc.stdin.flush()
                    self.proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            kill_group(self.proc)
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        self.relay.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
