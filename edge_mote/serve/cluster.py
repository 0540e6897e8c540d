"""``edge-mote serve --rpc``: the served model lives in an isolated child behind the cluster watchdog, so a worker that
dies, freezes or vanishes fails the affected requests and never the server.

``ClusterModel`` stands in for a ``Model`` in the scheduler (``runtime.scheduler``):

- the weights, the batched context and every ``llama_decode`` are in a ``cluster.Runner`` child (model loaded over
  the workers, relay watchdog in between); one decode step is one call to the child (decode + the logits rows +
  the routing capture come back together);
- tokenization, detokenization and the end-of-generation test run here on a vocabulary-only load of the same GGUF
  (no weights, no workers), so they keep working while the cluster is down.

A worker fault during a call (``WorkerLost``, or the child dying) raises ``ClusterFault`` (HTTP 502, naming the
worker) for the requests in flight and turns the model *degraded*: calls raise ``ClusterUnavailable`` (HTTP 503 with
``retry_after``) until a supervisor thread, which says hello to every worker with a backoff (0.5 s doubling to
10 s), finds them all answering again and has loaded the model anew in a fresh child. With ``fallback_after``
seconds, it also loads the model on the workers that still answer (on this machine alone if none does) when their
free memory holds it, serves there ("partial"), and goes back to every worker once the missing ones answer and no
request runs. While serving and idle, the supervisor pings the child every second, so a worker that goes away
between requests is noticed before the next request (a frozen worker is noticed by the first request that waits
``EDGE_MOTE_RPC_TIMEOUT`` seconds for it).

With ``plan`` (``--plan auto|even|PLAN.json``) every load -- the first, after a reconnect, on fewer workers after a
fallback, back on all -- splits the layers by that plan over the workers it loads on: ``auto`` measures them and
plans again each time (``cluster.plan``), ``even`` splits evenly, a plan file is used while every worker it names is
in use and replaced by ``auto`` over the workers that answer otherwise. /health shows the split in use.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import EdgeMoteError

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
PING_EVERY = 1.0


class ClusterFault(EdgeMoteError):
    """A worker failed while this call ran (HTTP 502): the requests in flight are lost; ``endpoint`` names it."""

    http_status = 502
    code = "worker_lost"

    def __init__(self, message: str, endpoint: str | None = None):
        super().__init__(message)
        self.endpoint = endpoint


class ClusterUnavailable(EdgeMoteError):
    """The cluster is degraded (HTTP 503): a worker is gone and the model waits to be loaded again."""

    http_status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


# -- the child side (module-level: the Runner pickles them by name) ---------------------------------------------
class _Session:
    def __init__(self, model, pc):
        self.model, self.pc = model, pc
        self.capture = False

    def close(self) -> None:
        self.pc.close()
        self.model.close()


def _open(path: str, profile: str | None, n_seq: int, n_ctx_seq: int, **load_kwargs) -> _Session:
    from ..runtime.model import load

    model = load(path, **load_kwargs)
    try:
        if profile is not None:
            model.use_profile(profile)
        pc = model.open_batch(n_seq=n_seq, n_ctx_seq=n_ctx_seq)
    except BaseException:
        model.close()
        raise
    return _Session(model, pc)


def _describe(s: _Session):
    m = s.model
    return m.info, m.profiles, m.steering, s.pc.n_batch


def _step(s: _Session, entries, n_logits: int, capture: bool):
    if capture != s.capture:
        s.pc.set_capture(capture)
        s.capture = capture
    s.pc.decode(entries)
    logits = np.array(s.pc.logits(n_logits)) if n_logits else None
    return logits, (s.pc.capture() if capture else None)


def _set_steering(s: _Session, seq: int, steering) -> None:
    s.pc.set_sequence_steering(seq, steering)


def _clear(s: _Session, seq: int) -> None:
    s.pc.clear_sequence(seq)


def _keep_prefix(s: _Session, seq: int, n: int) -> bool:
    return s.pc.keep_prefix(seq, n)


def _ping(s: _Session) -> bool:
    return True


def describe_split(split: dict) -> str:
    """One line for the split a plan chose (``ClusterModel.plan_used``)."""
    line = (f"--plan {split['kind']}: --tensor-split {','.join(f'{x:g}' for x in split['tensor_split'])} over "
            f"{', '.join(split['order'])}")
    if split.get("local_layers"):
        line += f", {split['local_layers']} first layer(s) on this machine"
    if split.get("predicted_ms") is not None:
        line += f" (predicted {split['predicted_ms']:.2f} ms/token)"
    return line


# -- this side --------------------------------------------------------------------------------------------------
class RemoteBatch:
    """The scheduler's batched context, in the child. A sequence set up before a reload is refused afterwards."""

    def __init__(self, cm: "ClusterModel", n_seq: int, n_ctx_seq: int):
        self.cm, self.n_seq, self.n_ctx_seq = cm, n_seq, n_ctx_seq
        self.n_batch = cm.n_batch
        self._capture = False
        self._rows = None
        self._cap = None
        self._gen: dict[int, int] = {}     # sequence -> the session it was set up in
        self.busy: set[int] = set()        # sequences a request runs in (the others only keep cells for reuse)

    def set_capture(self, enable: bool) -> None:
        self._capture = bool(enable)      # sent with the next decode

    def set_sequence_steering(self, seq: int, steering) -> None:
        self._gen[seq] = self.cm.call(_set_steering, seq, steering, with_generation=True)[0]
        self.busy.add(seq)

    def release_sequence(self, seq: int) -> None:
        self.busy.discard(seq)

    def save_sequence(self, seq: int) -> bytes | None:
        return None  # not kept across the child boundary: finished prompts are reused only from their slots

    def load_sequence(self, seq: int, data: bytes) -> bool:
        return False

    def clear_sequence(self, seq: int) -> None:
        gen = self._gen.pop(seq, None)
        self.busy.discard(seq)
        if gen is not None and gen == self.cm.generation and self.cm.healthy:
            try:
                self.cm.call(_clear, seq)
            except (ClusterFault, ClusterUnavailable):
                pass  # the session is gone, and its sequences with it

    def keep_prefix(self, seq: int, n: int) -> bool:
        """As ``ParallelContext.keep_prefix``; the cells of a session that is gone are gone (False unless n = 0)."""
        if self._gen.get(seq) != self.cm.generation or not self.cm.healthy:
            return n <= 0
        try:
            return self.cm.call(_keep_prefix, seq, n)
        except (ClusterFault, ClusterUnavailable):
            return n <= 0

    def decode(self, entries) -> None:
        cm = self.cm
        gen = cm.generation
        if not cm.healthy or any(self._gen.get(e[2]) != gen for e in entries):
            # the session these sequences live in is gone (the supervisor's ping found the fault between steps)
            raise ClusterFault(cm.error if not cm.healthy and cm.error else
                               "the request's sequence was lost with the cluster session it ran in; send it again")
        n = sum(1 for e in entries if e[3])
        self._rows, self._cap = None, None
        self._rows, self._cap = self.cm.call(_step, list(entries), n, self._capture)

    def logits(self, n: int) -> np.ndarray:
        return self._rows[:n]

    def capture(self):
        return self._cap

    def close(self) -> None:
        pass


class ClusterModel:
    """The served model over RPC workers, isolated (see the module docstring). Raises the ``Runner``'s one-line
    ``UserError`` at start (bad endpoint, not a worker, model does not load).

    ``fallback_after``: seconds after a fault from which the model may be loaded on the workers that still answer
    (or on this machine alone, when none does), if it fits their free memory; None: never, wait for every worker.
    """

    def __init__(self, path: str, endpoints: Sequence[str], *, n_seq: int, n_ctx_seq: int, profile: str | None = None,
                 load_kwargs: dict | None = None, stall_timeout: float | None = None,
                 fallback_after: float | None = None, plan=None, warn: Callable[[str], None] = print):
        from ..runtime.model import load

        self.endpoints = list(endpoints)
        self.in_use = list(endpoints)
        self.fallback_after = fallback_after
        self._plan = plan if plan not in (None, "none") else None
        self.plan_used: dict | None = None   # the split of the session in use (with a plan)
        self._path, self._profile = str(path), profile
        self._n_seq, self._n_ctx_seq = int(n_seq), int(n_ctx_seq)
        self._load_kwargs = dict(load_kwargs or {})
        self._stall_timeout = stall_timeout
        self._warn = warn
        self._mu = threading.Lock()
        self._closed = threading.Event()
        self._batch: RemoteBatch | None = None
        self.vocab = load(self._path, vocab_only=True, n_ctx=64, n_threads=1)
        self._runner = None
        self.generation = 0
        self.state = "loading"
        self.error: str | None = None
        self.since: float | None = None
        self.reloads = 0
        self.lost = 0
        self._backoff = BACKOFF_FIRST
        self._next_try = 0.0
        self._fault_at = 0.0
        self._last_call = time.monotonic()
        self._load_seconds = 0.0
        try:
            runner = self._start_runner(self.endpoints)
            self.info, self._profiles, self._steering, self.n_batch = runner.call(_describe)
        except BaseException:
            self.vocab.close()
            raise
        with self._mu:
            self._runner, self.generation, self.state = runner, 1, "ok"
            self.plan_used = runner.plan
        if runner.plan is not None:
            self._warn(f"edge-mote serve: {describe_split(runner.plan)}")
        self._thread = threading.Thread(target=self._supervise, name="edge-mote-cluster", daemon=True)
        self._thread.start()

    # -- what the server and the scheduler use of a Model ---------------------------------------------------------
    @property
    def profiles(self) -> dict:
        return dict(self._profiles)

    @property
    def steering(self):
        return self._steering

    @property
    def metadata(self) -> dict:
        return self.vocab.metadata

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens) -> str:
        return self.vocab.detokenize(tokens)

    def token_eog(self, token: int) -> bool:
        return self.vocab.token_eog(token)

    def token_bos(self) -> int:
        return self.vocab.token_bos()

    def token_eos(self) -> int:
        return self.vocab.token_eos()

    def token_text(self, token: int) -> str:
        return self.vocab.token_text(token)

    def open_batch(self, n_seq: int, n_ctx_seq: int) -> RemoteBatch:
        if (n_seq, n_ctx_seq) != (self._n_seq, self._n_ctx_seq):
            raise EdgeMoteError(f"the cluster session holds {self._n_seq} x {self._n_ctx_seq} tokens, not "
                                f"{n_seq} x {n_ctx_seq}")
        self._batch = RemoteBatch(self, n_seq, n_ctx_seq)
        return self._batch

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Serving: on every worker ("ok") or on those that remain ("partial")."""
        return self.state in ("ok", "partial")

    @property
    def missing(self) -> list[str]:
        return [ep for ep in self.endpoints if ep not in self.in_use]

    def retry_after(self) -> int:
        """Seconds a client should wait before trying again (the next hello, or the time a load takes)."""
        now = time.monotonic()
        if self.state == "reloading":
            return max(1, math.ceil(self._load_seconds or 5.0))
        return max(1, math.ceil(max(self._next_try - now, 0.0) + self._load_seconds))

    def unavailable(self) -> ClusterUnavailable | None:
        """None while serving, else the error to answer new requests with."""
        with self._mu:
            if self.healthy:
                return None
            what = "is being loaded again" if self.state == "reloading" else "waits for it to answer again"
            return ClusterUnavailable(f"the model is unavailable: {self.error} (the server {what})",
                                      self.retry_after())

    def status(self) -> dict:
        """For /health."""
        with self._mu:
            out = {"state": self.state, "workers": list(self.endpoints), "in_use": list(self.in_use),
                   "reloads": self.reloads, "faults": self.lost}
            if self._plan is not None:
                out["plan"] = self.plan_used if self.healthy else None
            if self.state != "ok":
                out.update(error=self.error, since=self.since, retry_after=self.retry_after())
            return out

    # -- calls into the child -------------------------------------------------------------------------------------
    def call(self, fn, *args, with_generation: bool = False):
        """``fn(session, *args)`` in the child; ``ClusterUnavailable`` while degraded, ``ClusterFault`` when a
        worker (or the child) fails during the call. With ``with_generation``: ``(generation, result)``."""
        from ..cluster import WorkerLost

        with self._mu:
            runner, gen = self._runner, self.generation
            if not self.healthy or runner is None:
                raise ClusterUnavailable(f"the model is unavailable: {self.error}", self.retry_after())
        self._last_call = time.monotonic()
        try:
            out = runner.call(fn, *args)
        except WorkerLost as e:
            self._fault(runner, str(e))
            raise ClusterFault(str(e), e.endpoint) from None
        except EdgeMoteError as e:
            if runner.alive:
                raise  # an ordinary error in the child (e.g. a steering it refuses): the session lives on
            self._fault(runner, str(e))
            raise ClusterFault(str(e)) from None
        finally:
            self._last_call = time.monotonic()
        return (gen, out) if with_generation else out

    def _fault(self, runner, message: str) -> None:
        with self._mu:
            if self._runner is not runner:
                return
            self._runner = None
            self.state, self.error, self.since = "degraded", message, time.time()
            self.lost += 1
            self._fault_at = time.monotonic()
            self._backoff = BACKOFF_FIRST
            self._next_try = time.monotonic() + self._backoff
        runner.close()
        self._warn(f"edge-mote serve: {message}; answering 503 until the model is loaded again")

    def _start_runner(self, endpoints: list[str]):
        from ..cluster import Runner

        t0 = time.monotonic()
        kwargs = dict(self._load_kwargs)
        endpoints, split = self._split(list(endpoints), kwargs)
        runner = Runner(endpoints, _open, (self._path, self._profile, self._n_seq, self._n_ctx_seq),
                        kwargs, stall_timeout=self._stall_timeout)
        runner.plan = split
        self._load_seconds = time.monotonic() - t0
        return runner

    def _split(self, endpoints: list[str], kwargs: dict) -> tuple[list[str], dict | None]:
        """Apply the plan to a load over ``endpoints`` (planned again over exactly these workers): the workers in
        llama.cpp's device order and the split, added to ``kwargs``; ``(endpoints, None)`` without a plan."""
        if self._plan is None or not endpoints:
            return endpoints, None
        from ..cluster.isolate import PREFLIGHT_TIMEOUT
        from ..cluster.plan import Plan, apply_plan, plan_cluster
        from ..runtime.rpc_protocol import preflight

        infos = [preflight(ep, PREFLIGHT_TIMEOUT) for ep in endpoints]
        plan = self._plan
        if plan not in ("auto", "even"):
            try:
                named = json.loads(Path(plan).read_text()).get("order", [])
            except (OSError, ValueError, AttributeError):
                named = []  # apply_plan says what is wrong with it
            if named and not set(named) <= {i.endpoint for i in infos}:
                plan = "auto"  # the file places layers on a worker not in use now: plan over those that are
        if plan == "auto":
            plan, _ = plan_cluster(self._path, [i.endpoint for i in infos], n_ctx=self._n_seq * self._n_ctx_seq,
                                   n_batch=kwargs.get("n_batch") or 512, n_threads=kwargs.get("n_threads"))
        ordered, extra = apply_plan(plan, (self._path,), kwargs, infos)
        kwargs.update(extra)
        desc = {"kind": plan.kind if isinstance(plan, Plan) else ("even" if plan == "even" else "file"),
                "order": [i.endpoint for i in ordered], "tensor_split": [float(x) for x in extra["tensor_split"]],
                "n_gpu_layers": int(extra["n_gpu_layers"])}
        if isinstance(plan, Plan):
            desc.update(local_layers=plan.local_layers, predicted_ms=round(plan.predicted_ms, 3))
        return desc["order"], desc

    def _active(self) -> int:
        """Sequences of the current session in use."""
        b = self._batch
        return 0 if b is None else sum(1 for q, g in list(b._gen.items()) if g == self.generation and q in b.busy)

    # -- the supervisor thread ------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._closed.wait(0.25):
            try:
                now = time.monotonic()
                if self.healthy:
                    if now - self._last_call >= PING_EVERY:
                        try:
                            self.call(_ping)
                        except (ClusterFault, ClusterUnavailable):
                            continue
                    if self.state == "partial" and now >= self._next_try:
                        self._rejoin()
                elif self.state == "degraded" and now >= self._next_try:
                    self._reconnect()
            except Exception as e:  # pragma: no cover - never let the supervisor die
                self._warn(f"edge-mote serve: cluster supervisor: {type(e).__name__}: {e}")

    def _later(self, problem: str | None = None) -> None:
        with self._mu:
            if problem is not None:
                self.error = problem
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            self._next_try = time.monotonic() + self._backoff

    def _reconnect(self) -> None:
        """Degraded: every worker answers -> load on all; else, after ``fallback_after``, on those that answer if the
        model fits them (none: this machine)."""
        from ..cluster import health

        results = health(self.endpoints, timeout=2.0)
        problems = [err for _, _, err in results if err]
        if not problems:
            problem = self._load(self.endpoints)
            if problem is None:
                return
        else:
            problem = problems[0]
            if self.fallback_after is not None and time.monotonic() - self._fault_at >= self.fallback_after:
                good = [(ep, info) for ep, (_, info, err) in zip(self.endpoints, results) if not err]
                why_not = self._fits([info for _, info in good])
                if why_not is None:
                    if self._load([ep for ep, _ in good], problem) is None:
                        return
                else:
                    problem = f"{problem}; {why_not}"
        with self._mu:
            self.state = "degraded"
        self._later(problem)

    def _fits(self, infos) -> str | None:
        """None when the model should fit the free memory of these workers (none: this machine), else why not."""
        from ..cluster.plan import _local_free

        need = int(self.info.file_bytes * 1.1)
        if infos:
            have, where = sum(i.free for i in infos), "the workers that answer offer"
        else:
            have, where = int(_local_free() * 0.8), "without workers, this machine has"
        if have >= need:
            return None
        return f"{where} {have / 2**30:.1f} GiB, too little for the model ({need / 2**30:.1f} GiB)"

    def _rejoin(self) -> None:
        """Partial: once every missing worker answers and no request runs, load on all workers again."""
        from ..cluster import health

        problems = [err for _, _, err in health(self.missing, timeout=2.0) if err]
        if problems:
            self._later(problems[0])
            return
        with self._mu:
            if self._active() or self.state != "partial":
                self._next_try = time.monotonic() + 0.5  # wait for the requests in flight to end
                return
            old, self._runner = self._runner, None
            self.state = "reloading"
        old.close()
        problem = self._load(self.endpoints)
        if problem is not None:  # back to the workers that remain, at once
            with self._mu:
                self.state, self.error, self.since = "degraded", problem, time.time()
                self._fault_at = time.monotonic() - (self.fallback_after or 0.0)
                self._next_try = time.monotonic()

    def _load(self, endpoints: list[str], why: str | None = None) -> str | None:
        """A new session over ``endpoints``; None when it serves, else the one-line problem."""
        with self._mu:
            self.state = "reloading"
        try:
            runner = self._start_runner(endpoints)
            info = runner.call(_describe)[0]
            if (info.n_vocab, info.moe_layers) != (self.info.n_vocab, self.info.moe_layers):
                runner.close()
                raise EdgeMoteError(f"{self._path} changed on disk; restart the server")
        except EdgeMoteError as e:
            return str(e)
        if self._closed.is_set():
            runner.close()
            return None
        full = len(endpoints) == len(self.endpoints)
        with self._mu:
            self._runner = runner
            self.generation += 1
            self.reloads += 1
            self.in_use = list(endpoints)
            self.plan_used = runner.plan
            self.state = "ok" if full else "partial"
            self.error, self.since = (None, None) if full else (why, time.time())
            self._backoff = BACKOFF_FIRST
            self._next_try = time.monotonic() + self._backoff
        self._last_call = time.monotonic()
        if runner.plan is not None:
            self._warn(f"edge-mote serve: {describe_split(runner.plan)}")
        if full:
            self._warn(f"edge-mote serve: every RPC worker answers again; the model was loaded anew in "
                       f"{self._load_seconds:.1f} s, serving")
        else:
            on = ", ".join(endpoints) if endpoints else "this machine alone"
            self._warn(f"edge-mote serve: serving on {on} without {', '.join(self.missing)} (the model was loaded "
                       f"anew in {self._load_seconds:.1f} s); back on every worker once it answers again")
        return None

    def close(self) -> None:
        self._closed.set()
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._thread.join(60)
        with self._mu:
            runner, self._runner = self._runner, None
            self.state = "closed"
        if runner is not None:
            runner.close()
        self.vocab.close()
