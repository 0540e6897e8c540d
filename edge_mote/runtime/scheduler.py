"""Continuous batching: many generation requests over one ``Model``, each sequence with its own steering.

One thread owns the model's batched context (``Model.open_batch``) and loops: admit queued requests into free
sequence slots, build ONE batch with the next token of every decoding sequence plus prompt chunks of newly admitted
ones, ``decode`` it, sample every sequence's next token from its own logits row, hand the results to the requests'
sinks. A request that arrives while others are decoding joins at the next step; a cancelled request (client gone,
stop string found) frees its slot at the next step; requests beyond the slots wait in FIFO order.

Prompt reuse (``runtime/prompt_cache.py``, as llama-server's prompt cache): a finished sequence keeps its KV cells
for a later request that starts the same way, in its slot or (``prompt_cache_bytes``) in host memory.

Other threads talk to it only through :meth:`Scheduler.submit` (a request and a sink called with its events from
the scheduler thread) and :meth:`Scheduler.call` (run a function on the model between steps, e.g. tokenization,
since a Model is used by one thread at a time).

    sched = Scheduler(model, n_seq=8, n_ctx_seq=2048).start()
    handle = sched.submit(Request(tokens, max_tokens=32), sink=events.put)   # TokenEvent ..., then Finished
    sched.close()
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import EdgeMoteError, UserError
from ..steering import Steering
from .prompt_cache import PromptCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature == 0`` (argmax, as ``edge-mote run``), else sampled
    from softmax(logits / temperature) restricted to the top-p nucleus, reproducibly for a given ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None      # None: none; n >= 0: the chosen token's log-probability and the n most likely

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise UserError(f"the number of top log-probabilities must be 0..20, got {self.logprobs}")


@dataclass(frozen=True)
class Request:
    """One generation: prompt tokens, at most ``max_tokens`` new ones, stopping at any end-of-generation token or
    at the first of the ``stop`` strings (not included in the text)."""

    tokens: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    steering: Steering | None = None  # None: the Model's steering
    stop: tuple[str, ...] = ()
    trace: bool = False               # report the experts chosen at the position that produced each token


@dataclass(frozen=True)
class TokenEvent:
    """A generated token. ``text`` is the text released with it: '' while an incomplete UTF-8 character or a
    possible start of a stop string is held back (released later, or dropped if the stop string completes)."""

    token: int
    text: str
    piece: str | None = None                                # the token's own text (with logprobs)
    logprob: float | None = None
    top_logprobs: tuple[tuple[str, int, float], ...] | None = None   # (piece, token, logprob), most likely first
    route: tuple[tuple[int, ...], ...] | None = None        # expert ids per MoE layer (layers: Scheduler.layers)


@dataclass(frozen=True)
class Finished:
    """The last event of a request. ``reason``: "stop" (end-of-generation token or stop string), "length"
    (max_tokens or the sequence's context), "cancelled", or "error" (``error`` says why; ``status``: the HTTP
    status the failure asks for, e.g. 502/503 when an RPC worker of ``serve --rpc`` failed, None: an internal error)."""

    reason: str
    text: str                 # held-back text released at the end
    n_prompt: int
    n_generated: int
    error: str | None = None
    status: int | None = None


Sink = Callable[[object], None]


class Handle:
    """A submitted request: ``cancel()`` frees its slot at the next step (safe from any thread)."""

    def __init__(self, request: Request, sink: Sink, wake: Callable[[], None]):
        self.request, self.sink = request, sink
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


@dataclass
class _Slot:
    seq: int
    handle: Handle
    tokens: list[int]
    fed: int = 0                                            # prompt tokens decoded so far
    kv: list[int] = field(default_factory=list)             # the tokens whose KV cells the sequence holds
    generated: list[int] = field(default_factory=list)
    sent: int = 0                                           # characters of the generated text released
    rng: np.random.Generator | None = None

    @property
    def prefilled(self) -> bool:
        return self.fed >= len(self.tokens)


@dataclass
class Stats:
    """Counters for /health and the tests: decode steps, tokens decoded, the most sequences in one step."""

    steps: int = 0
    decoded_tokens: int = 0
    generated_tokens: int = 0
    max_seqs_in_step: int = 0
    requests_done: int = 0
    reused_tokens: int = 0       # prompt tokens whose KV cells a previous request left in its slot


class Scheduler:
    """Continuous batching over one ``Model`` (see the module docstring). Owns the batched context's thread."""

    def __init__(self, model, n_seq: int = 4, n_ctx_seq: int = 2048, prompt_cache_bytes: int = 1 << 30):
        if n_seq < 1:
            raise UserError(f"the number of parallel sequences must be >= 1, got {n_seq}")
        self.model, self.n_seq, self.n_ctx_seq = model, int(n_seq), int(n_ctx_seq)
        self.stats = Stats()
        self.layers: tuple[int, ...] = tuple(model.info.moe_layers)
        self._cond = threading.Condition()
        self._pending: deque[Handle] = deque()
        self._jobs: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self._slots: dict[int, _Slot] = {}
        self._stop = False
        self._capture = False
        self._reason: dict[int, str] = {}                  # why a slot finished in this step
        self.prompt_cache_bytes = max(0, int(prompt_cache_bytes))
        self.prompts: PromptCache | None = None           # what free slots hold (made with the batched context)
        self._pc = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="edge-mote-scheduler", daemon=True)

    # -- public (any thread) ---------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        return self

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, request: Request, sink: Sink) -> Handle:
        """Queue a request; ``sink`` receives its TokenEvents and, last, one Finished (from the scheduler thread)."""
        if request.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not request.tokens:
            raise UserError("the prompt is empty")
        if len(request.tokens) >= self.n_ctx_seq:
            raise UserError(f"the prompt has {len(request.tokens)} tokens; a sequence holds {self.n_ctx_seq}",
                            hint="shorten the prompt or start the server with a larger --ctx")
        handle = Handle(request, sink, self._wake)
        with self._cond:
            if self._stop:
                raise EdgeMoteError("the scheduler is closed (the server is shutting down)")
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[object], object]) -> concurrent.futures.Future:
        """Run ``fn(model)`` on the scheduler thread between two steps; returns a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stop:
                raise EdgeMoteError("the scheduler is closed")
            self._jobs.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def busy(self) -> int:
        return len(self._slots)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the scheduler thread --------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _main(self) -> None:
        try:
            self._pc = self.model.open_batch(n_seq=self.n_seq, n_ctx_seq=self.n_ctx_seq)
            self.prompts = PromptCache(self._pc, self.n_seq, self.n_ctx_seq, self.prompt_cache_bytes)
        except BaseException as e:  # reported to start()
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            with self._cond:
                self._stop = True
            for slot in list(self._slots.values()):
                self._finish(slot, "cancelled")
            while self._pending:
                h = self._pending.popleft()
                h.sink(Finished("error", "", len(h.request.tokens), 0, "the server is shutting down"))
            while self._jobs:
                self._jobs.popleft()[1].set_exception(EdgeMoteError("the scheduler is closed"))
            self._pc.close()

    def _loop(self) -> None:
        free = list(range(self.n_seq))
        while True:
            with self._cond:
                while not (self._stop or self._jobs or self._slots or (self._pending and free)):
                    self._cond.wait()
                if self._stop:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                admitted = []
                while self._pending and free:
                    handle = self._pending.popleft()
                    seq = self.prompts.pick(free, handle.request.tokens, self._steering_of(handle.request))
                    free.remove(seq)
                    admitted.append((seq, handle))
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.model))
                    except BaseException as e:
                        fut.set_exception(e)
            for seq, handle in admitted:
                self._admit(seq, handle, free)
            for slot in [s for s in self._slots.values() if s.handle.cancelled]:
                self._finish(slot, "cancelled")
                free.append(slot.seq)
            if self._slots:
                try:
                    done = self._step()
                except Exception as e:  # a bug, a native or a cluster failure: fail this step's requests, keep serving
                    done = list(self._slots.values())
                    status = getattr(e, "http_status", None)   # serve --rpc: a worker failed (serve/cluster.py)
                    for slot in done:
                        self._finish(slot, "error", str(e) if status else f"{type(e).__name__}: {e}", status)
                for slot in done:
                    free.append(slot.seq)
                free.sort()

    def _steering_of(self, request: Request) -> Steering | None:
        """The steering a request's tokens are computed with (its own, else the Model's at this moment)."""
        return request.steering if request.steering is not None else self.model.steering

    def _admit(self, seq: int, handle: Handle, free: list[int]) -> None:
        req = handle.request
        if handle.cancelled:
            handle.sink(Finished("cancelled", "", len(req.tokens), 0))
            free.append(seq)
            return
        try:
            keep = self.prompts.take(seq, req.tokens, self._steering_of(req))
            self._pc.set_sequence_steering(seq, req.steering)
        except Exception as e:
            try:
                self._pc.clear_sequence(seq)
            except Exception:  # pragma: no cover - the context is gone; the next step reports it
                pass
            handle.sink(Finished("error", "", len(req.tokens), 0, str(e), getattr(e, "http_status", None)))
            free.append(seq)
            return
        rng = np.random.default_rng(req.sampling.seed) if req.sampling.temperature > 0 else None
        tokens = [int(t) for t in req.tokens]
        self._slots[seq] = _Slot(seq, handle, tokens, fed=keep, kv=tokens[:keep], rng=rng)
        self.stats.reused_tokens += keep

    def _step(self) -> list[_Slot]:
        """One decode of every active sequence; returns the slots that finished (their cells kept for reuse)."""
        pc = self._pc
        entries: list[tuple[int, int, int, bool]] = []
        flagged: list[tuple[_Slot, int]] = []         # (slot, index of its entry in the batch)
        budget = pc.n_batch
        slots = sorted(self._slots.values(), key=lambda s: (not s.prefilled, s.seq))  # decoding ones first
        for slot in slots:
            if budget == 0:
                break
            if slot.prefilled:
                pos = len(slot.tokens) + len(slot.generated) - 1
                flagged.append((slot, len(entries)))
                entries.append((slot.generated[-1], pos, slot.seq, True))
                slot.kv.append(slot.generated[-1])
                budget -= 1
            else:
                n = min(budget, len(slot.tokens) - slot.fed)
                for j in range(slot.fed, slot.fed + n):
                    last = j == len(slot.tokens) - 1
                    if last:
                        flagged.append((slot, len(entries)))
                    entries.append((slot.tokens[j], j, slot.seq, last))
                slot.kv.extend(slot.tokens[slot.fed: slot.fed + n])
                slot.fed += n
                budget -= n
        want_trace = any(s.handle.request.trace for s, _ in flagged)
        if want_trace != self._capture:
            pc.set_capture(want_trace)
            self._capture = want_trace
        pc.decode(entries)
        st = self.stats
        st.steps += 1
        st.decoded_tokens += len(entries)
        st.max_seqs_in_step = max(st.max_seqs_in_step, len({e[2] for e in entries}))
        logits = pc.logits(len(flagged)) if flagged else None
        capture = pc.capture() if want_trace else None
        done = []
        for k, (slot, row) in enumerate(flagged):
            if self._advance(slot, logits[k], capture, row, k, len(entries)):
                done.append(slot)
        for slot in done:
            self._finish(slot, self._reason.pop(slot.seq))
        return done

    def _advance(self, slot: _Slot, row: np.ndarray, capture, batch_row: int, out_row: int, n_rows: int) -> bool:
        """Choose the slot's next token from ``row``; emit it; True when the request is finished."""
        req = slot.handle.request
        if slot.handle.cancelled:
            self._reason[slot.seq] = "cancelled"
            return True
        tok = self._sample(row, req.sampling, slot.rng)
        m = self.model
        if m.token_eog(tok):
            self._reason[slot.seq] = "stop"
            return True
        slot.generated.append(tok)
        self.stats.generated_tokens += 1
        text, stopped = self._release(slot)
        event = TokenEvent(tok, text)
        if req.sampling.logprobs is not None:
            lp = _log_softmax(row)
            top = np.argsort(-lp, kind="stable")[: req.sampling.logprobs]
            event = TokenEvent(tok, text, m.detokenize([tok]), float(lp[tok]),
                               tuple((m.detokenize([int(t)]), int(t), float(lp[t])) for t in top))
        if capture is not None and req.trace:
            # a layer's capture has a row per batch token, or (the last layer of some graphs) per logits row
            event = TokenEvent(event.token, event.text, event.piece, event.logprob, event.top_logprobs,
                               tuple(tuple(int(x) for x in capture[il][0][batch_row if len(capture[il][0]) == n_rows
                                                                           else out_row]) for il in self.layers))
        slot.handle.sink(event)
        if stopped:
            self._reason[slot.seq] = "stop"
            return True
        n_ctx_used = len(slot.tokens) + len(slot.generated)
        if len(slot.generated) >= req.max_tokens or n_ctx_used >= self.n_ctx_seq:
            self._reason[slot.seq] = "length"
            return True
        return False

    def _release(self, slot: _Slot) -> tuple[str, bool]:
        """The text newly safe to send, and whether a stop string completed (the text before it is released)."""
        full = self.model.detokenize(slot.generated)
        stops = slot.handle.request.stop
        if stops:
            hits = [i for i in (full.find(s, slot.sent) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                text, slot.sent = full[slot.sent: cut], cut
                return text, True
        end = len(full)
        while end > slot.sent and full[end - 1] == "\ufffd":   # an incomplete UTF-8 character: wait for the rest
            end -= 1
        for s in stops:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, end - slot.sent), 0, -1):
                if full[end - k: end] == s[:k]:
                    end -= k
                    break
        text, slot.sent = full[slot.sent: end], max(slot.sent, end)
        return text, False

    def _finish(self, slot: _Slot, reason: str, error: str | None = None, status: int | None = None) -> None:
        self._slots.pop(slot.seq, None)
        rest = ""
        if reason in ("length", "stop") and slot.generated and error is None:
            full = self.model.detokenize(slot.generated)
            stops = slot.handle.request.stop
            if not any(full.find(s, slot.sent) >= 0 for s in stops):
                rest = full[slot.sent:]
        try:
            if reason == "error":
                self._pc.clear_sequence(slot.seq)   # what its cells hold is unknown
            else:                                   # kept for a later request with the same prefix (module docstring)
                self.prompts.finished(slot.seq, slot.kv, self._steering_of(slot.handle.request))
        except Exception as e:  # pragma: no cover - a broken context: report it on this request
            reason, error = "error", error or str(e)
        self.stats.requests_done += 1
        slot.handle.sink(Finished(reason, rest, len(slot.tokens), len(slot.generated), error, status))

    @staticmethod
    def _sample(row: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
        if sampling.temperature <= 0 or rng is None:
            return int(np.argmax(row))
        z = row.astype(np.float64) / sampling.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if sampling.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, sampling.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(rng.choice(len(p), p=p))


def _log_softmax(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())
