"""Many sequences per ``llama_decode``: a second llama.cpp context on the same weights, with ``n_seq`` sequence
slots and a unified KV cache, for batched greedy decoding and scoring (``edge-mote eval`` evaluates hundreds of
short prompts under many steerings; one sequence per decode call leaves the CPU idle between tiny matmuls).

The context shares the model's weights (no second load) and mirrors the owning ``Model``'s steering: ``Model``
calls :meth:`ParallelContext.apply_steering` whenever its steering changes. Results equal one-sequence decoding up
to float rounding (the batched matmuls sum in a different order); tests compare both.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import numpy as np

from ..errors import EdgeMoteError

Apply = Callable[[object], None]  # apply the owner's steering to a native context


class ParallelContext:
    """A ``llama_context`` with ``n_seq`` sequences of up to ``n_ctx_seq`` tokens each, and one reusable batch."""

    def __init__(self, llm, n_seq: int, n_ctx_seq: int, n_batch: int, apply_steering: Apply):
        import llama_cpp

        self._ll = llama_cpp
        self.n_seq, self.n_ctx_seq, self.n_batch = int(n_seq), int(n_ctx_seq), int(n_batch)
        params = llama_cpp.llama_context_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(llm.context_params), ctypes.sizeof(params))
        params.n_seq_max = self.n_seq
        params.kv_unified = True             # the sequences share one KV buffer of n_seq * n_ctx_seq cells
        params.n_ctx = self.n_seq * self.n_ctx_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.embeddings = False
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise EdgeMoteError("llama.cpp could not create a batched context")
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = llm.n_vocab()
        apply_steering(self.ctx)

    def close(self) -> None:
        if self.ctx:
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self.ctx)
            self.ctx = None

    # -- batch plumbing ----------------------------------------------------------------------------------------
    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, pos, seq, wants_logits) entries."""
        b = self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgeMoteError(f"llama_decode failed in a batch of {len(entries)} tokens (code {rc})")

    def _outputs(self, n: int) -> np.ndarray:
        """The logits of the last decode as a view [n, n_vocab], rows in the batch order of the flagged tokens."""
        ptr = self._ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def _waves(self, lengths: Sequence[int], extra: int) -> list[list[int]]:
        """Group sequence indices so that each group fits the slots, the batch and the per-sequence context."""
        waves: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for i, n in enumerate(lengths):
            if n + extra > self.n_ctx_seq or n > self.n_batch:
                raise EdgeMoteError(f"a sequence of {n} tokens (+{extra}) does not fit the batched context")
            if cur and (len(cur) == self.n_seq or used + n > self.n_batch):
                waves.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            waves.append(cur)
        return waves

    # -- public ----------------------------------------------------------------------------------------------
    def greedy(self, prompts: Sequence[Sequence[int]], max_new: int, eos: int, keep: int | None = None,
               tick: Callable[[int], None] | None = None) -> list[tuple[list[int], np.ndarray]]:
        """Greedy continuation of every prompt: (new tokens, the logits each step chose from
        [len(new) + (1 if stopped at ``eos``), n_vocab], only the first ``keep`` rows when ``keep`` is given)."""
        keep = max_new + 1 if keep is None else max(0, min(int(keep), max_new + 1))
        out: list[tuple[list[int], np.ndarray]] = [([], np.zeros((0, self.n_vocab), np.float32))] * len(prompts)
        for wave in self._waves([len(p) for p in prompts], max_new):
            self._ll.llama_memory_clear(self._mem, True)
            entries = []
            for s, i in enumerate(wave):
                toks = prompts[i]
                entries.extend((int(t), j, s, j == len(toks) - 1) for j, t in enumerate(toks))
            self._decode(entries)
            n_w = len(wave)
            new: list[list[int]] = [[] for _ in range(n_w)]
            rows = [np.empty((keep, self.n_vocab), np.float32) for _ in range(n_w)]
            n_rows = [0] * n_w
            active = list(range(n_w))
            logits = self._outputs(n_w)  # one flagged token (the last) per sequence, in wave order
            while active:
                step = []
                for k, s in enumerate(active):
                    if n_rows[s] < keep:
                        rows[s][n_rows[s]] = logits[k]
                        n_rows[s] += 1
                    nxt = int(np.argmax(logits[k]))
                    if nxt == eos:
                        continue
                    new[s].append(nxt)
                    if len(new[s]) < max_new:
                        step.append(s)
                active = step
                if active:
                    self._decode([(new[s][-1], len(prompts[wave[s]]) + len(new[s]) - 1, s, True) for s in active])
                    logits = self._outputs(len(active))
            for s, i in enumerate(wave):
                out[i] = (new[s], rows[s] if n_rows[s] == keep else rows[s][: n_rows[s]].copy())
            if tick:
                tick(len(wave))
        return out

    def score(self, seqs: Sequence[Sequence[int]], first: Sequence[int],
              reduce: Callable[[int, np.ndarray], object] | None = None,
              tick: Callable[[int], None] | None = None) -> list:
        """For each sequence, the next-token logits at positions ``first[i]`` .. ``len(seqs[i]) - 1``
        ([len - first, n_vocab]; row r predicts token ``first + r + 1``), or ``reduce(i, logits)`` computed on a
        view of the native buffer (no copy; the view is only valid during the call)."""
        empty = np.zeros((0, self.n_vocab), np.float32)
        out: list = [empty] * len(seqs)
        for wave in self._waves([len(s) for s in seqs], 0):
            self._ll.llama_memory_clear(self._mem, True)
            entries, spans, n_out = [], {}, 0
            for s, i in enumerate(wave):
                lo = min(max(0, int(first[i])), len(seqs[i]))
                spans[i] = (n_out, n_out + len(seqs[i]) - lo)
                n_out = spans[i][1]
                entries.extend((int(t), j, s, j >= lo) for j, t in enumerate(seqs[i]))
            self._decode(entries)
            logits = self._outputs(n_out) if n_out else empty
            for i in wave:
                rows = logits[spans[i][0]: spans[i][1]]
                out[i] = rows.copy() if reduce is None else reduce(i, rows)
            if tick:
                tick(len(wave))
        return out
