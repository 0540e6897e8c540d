"""Many sequences per ``llama_decode``, each with its own steering: the one decode surface of a ``Model``.

A ``ParallelContext`` is a llama.cpp context on the model's weights (no second load) with ``n_seq`` sequence slots
and a unified KV cache. Every evaluation of a Model runs here -- ``logits``, ``routing``, greedy decoding,
sampling, scoring, the scan, the evaluation protocol, the server's continuous batching -- so that there is one
end-of-generation rule (any EOG token of the vocabulary) and one place that talks to ``llama_decode``.

Steering: the context follows its Model's steering (``Model`` re-applies it whenever it changes); a sequence may
carry its own (``set_sequence_steering``), which the patched llama.cpp applies per token inside the same decode.
A batch whose tokens all share one steering runs exactly the graph of a context-wide steering.

Batch invariance (``invariant=True``, used by the evaluation protocol): llama.cpp's CPU kernels are not batch
invariant -- a matrix product of one row takes another kernel than one of several (tinyBLAS needs >= 2 rows),
flash attention picks a tiled path for >= 64 query rows and a split-KV path for one, and a sequence's attention
sums its KV cells in cell order, which depends on where the cache put them -- so a sequence's logits differ in the
last bits with the company it is decoded in, and a greedy token can flip. In invariant mode every ``llama_decode``
holds 2..63 tokens and never exactly one output row (a padding token of a reserved sequence, or one more output
row, is added), flash attention is on (its one-query-at-a-time path visits only the sequence's own cells, in order),
and sequences start in waves on an emptied cache and never free cells mid-wave, so each sequence's cells are in
position order. Then each sequence's results are bit-identical whatever it is batched with (tested), and the
evaluation's table does not depend on which configurations share decodes. It costs some throughput (smaller
decodes; idle slots until a wave ends); weights repacked for CPU GEMM kernels (some quantized types) are not covered.

Low-level use (the server's scheduler)::

    pc = model.open_batch(n_seq=8, n_ctx_seq=2048)
    pc.set_sequence_steering(3, Steering.parse("off=1:2"))
    pc.decode([(tok, pos, seq, wants_logits), ...])
    rows = pc.logits(n_flagged)                 # [n_flagged, n_vocab] view, batch order
    pc.close()
"""

from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import numpy as np

from ..errors import EdgeMoteError, UserError
from ..steering import Steering
from . import bindings as B

Entry = tuple[int, int, int, bool]  # (token, position, sequence, wants logits)


class ParallelContext:
    """A ``llama_context`` with ``n_seq`` sequences of up to ``n_ctx_seq`` tokens each, and one reusable batch.

    Made by ``Model.open_batch`` (or internally by the Model); use it from one thread at a time."""

    INVARIANT_UBATCH = 64  # decodes stay below ggml-cpu's flash-attention tile (64 query rows)

    def __init__(self, model, n_seq: int, n_ctx_seq: int, n_batch: int, invariant: bool = False):
        import llama_cpp

        self._ll = llama_cpp
        self._model = model
        self.n_seq, self.n_ctx_seq, self.n_batch = int(n_seq), int(n_ctx_seq), int(n_batch)
        if self.n_seq < 1 or self.n_ctx_seq < 1 or self.n_batch < 1:
            raise UserError("a batched context needs n_seq, n_ctx_seq and n_batch >= 1")
        params = llama_cpp.llama_context_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(model.native_context_params()), ctypes.sizeof(params))
        self.invariant = bool(invariant)
        self.pad_seq = self.n_seq            # invariant mode: the sequence of padding tokens
        n_seq_ids = self.n_seq + (1 if self.invariant else 0)
        if self.invariant:
            self.n_batch = self.INVARIANT_UBATCH
            params.flash_attn_type = 1       # LLAMA_FLASH_ATTN_TYPE_ENABLED (see the module docstring)
        params.n_seq_max = n_seq_ids
        params.kv_unified = True             # the sequences share one KV buffer of n_seq * n_ctx_seq cells
        params.n_ctx = n_seq_ids * self.n_ctx_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.embeddings = False
        self.ctx = llama_cpp.llama_init_from_model(model.native_model(), params)
        if not self.ctx:
            raise EdgeMoteError("llama.cpp could not create a batched context",
                                hint="try a smaller context (--ctx) or fewer parallel sequences")
        self._lib = B.lib()
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = model.info.n_vocab
        self._seq_steering: dict[int, Steering] = {}
        self._capture = False
        self._steered = False   # whether any steering is in effect (then the skipped-layer check runs)
        self._pad_pos = 0       # next position of the padding sequence (invariant mode)
        self._scratch_rows: np.ndarray | None = None  # invariant mode: logits rows copied out of several decodes
        self.apply_model_steering()

    def close(self) -> None:
        if self.ctx:
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "ParallelContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live(self):
        if not self.ctx:
            raise EdgeMoteError("this batched context is closed")
        return self.ctx

    # -- steering --------------------------------------------------------------------------------------------
    def apply_model_steering(self) -> None:
        """(Re)apply the owning Model's steering as this context's (called by the Model when it changes)."""
        self._model.apply_steering_to(self._live())
        self._steered = bool(self._model.steering) or bool(self._seq_steering)

    def set_sequence_steering(self, seq: int, steering: Steering | None) -> None:
        """Tokens of sequence ``seq`` use ``steering`` from the next decode on (None: the Model's steering)."""
        if not 0 <= seq < self.n_seq:
            raise UserError(f"sequence {seq} is out of range (0-{self.n_seq - 1})")
        if steering is None:
            if self._seq_steering.pop(seq, None) is not None:
                B.check(self._lib.llama_clear_expert_steering_seq(self._live(), seq), "clearing a sequence's steering")
        elif self._seq_steering.get(seq) != steering:
            info = self._model.info
            if not info.is_moe:
                raise UserError(f"{info.path} is not a Mixture-of-Experts model: it cannot be steered")
            self._model.require_steerable()  # refused on architectures where steering cannot be verified
            state, bias = steering.to_arrays(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)
            rc = self._lib.llama_set_expert_steering_seq(self._live(), seq, B.as_ptr(state, ctypes.c_int8),
                                                         B.as_ptr(bias, ctypes.c_float), steering.margin,
                                                         info.n_layer, info.n_expert)
            if rc < 0:
                raise UserError(f"cannot apply steering '{steering}' to sequence {seq}: {B.STEER_ERRORS.get(rc, rc)}")
            self._seq_steering[seq] = steering
        self._steered = bool(self._model.steering) or bool(self._seq_steering)

    def clear_sequence(self, seq: int) -> None:
        """Remove the KV cells of sequence ``seq`` and its own steering."""
        self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self.set_sequence_steering(seq, None)

    def keep_prefix(self, seq: int, n: int) -> bool:
        """Keep the KV cells of sequence ``seq``'s first ``n`` positions and drop the rest (``n`` = 0: all of them).
        False when this memory cannot drop part of a sequence (then all of it is dropped)."""
        if n > 0 and self._ll.llama_memory_seq_rm(self._mem, seq, n, -1):
            return True
        self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return n <= 0

    def save_sequence(self, seq: int) -> bytes | None:
        """Sequence ``seq``'s KV cells as bytes (``llama_state_seq_get_data``), to be put back with
        ``load_sequence``; None if llama.cpp cannot."""
        size = self._ll.llama_state_seq_get_size(self._live(), seq)
        if not size:
            return None
        buf = (ctypes.c_ubyte * size)()
        n = self._ll.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return bytes(buf[:n]) if n else None

    def load_sequence(self, seq: int, data: bytes) -> bool:
        """Replace sequence ``seq``'s cells with ``data`` from ``save_sequence`` (of this model and context kind);
        False when they do not fit (then the sequence is empty)."""
        buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        if self._ll.llama_state_seq_set_data(self._live(), buf, len(data), seq):
            return True
        self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return False

    def release_sequence(self, seq: int) -> None:
        """The request in sequence ``seq`` ended; its cells stay for reuse (``keep_prefix``). Nothing to do here; a
        remote context (``serve --rpc``) stops counting the sequence as in use."""

    def clear_all(self) -> None:
        """Empty the KV cache (every sequence); steerings stay."""
        self._ll.llama_memory_clear(self._mem, True)
        self._pad_pos = 0

    # -- decode ----------------------------------------------------------------------------------------------
    def decode(self, entries: Sequence[Entry]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants_logits) entries."""
        if not entries:
            return
        if len(entries) > self.n_batch:
            raise EdgeMoteError(f"a batch of {len(entries)} tokens exceeds n_batch={self.n_batch}")
        b = self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        rc = self._ll.llama_decode(self._live(), b)
        if rc != 0:
            why = B.last_native_error()
            raise EdgeMoteError(f"llama_decode failed in a batch of {len(entries)} tokens (code {rc})"
                                + (f": {why}" if why else ""))
        if self._steered:
            self._check_skipped()

    def _check_skipped(self) -> None:
        layers = (ctypes.c_int32 * 64)()
        n = self._lib.llama_get_expert_steering_skipped(self.ctx, layers, 64)
        if n > 0:
            names = ",".join(str(layers[i]) for i in range(min(n, 64)))
            raise UserError(f"the steering of MoE layer(s) {names} cannot be applied: this architecture bypasses "
                            f"the router or routes a different number of experts there",
                            hint="steer only the other layers (see the README's architecture table)")

    def logits(self, n: int) -> np.ndarray:
        """The logits of the last decode as a view [n, n_vocab] (rows in the batch order of the flagged tokens),
        valid until the next decode."""
        ptr = self._ll.llama_get_logits(self._live())
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def set_capture(self, enable: bool) -> None:
        """Turn routing capture on or off (on costs a little per decode)."""
        if bool(enable) != self._capture:
            B.check(self._lib.llama_set_expert_capture(self._live(), bool(enable)), "routing capture")
            self._capture = bool(enable)

    def capture(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The routing of the last decode: {layer: (ids [n_rows, k] int32, weights [n_rows, k] float32)}, rows in
        batch order (the last MoE layer of some architectures computes only the rows that produce logits)."""
        if not self._capture:
            raise EdgeMoteError("routing capture is off: call set_capture(True) before the decode")
        ids_p = ctypes.POINTER(ctypes.c_int32)()
        w_p = ctypes.POINTER(ctypes.c_float)()
        k = ctypes.c_int32(0)
        out = {}
        for il in self._model.info.moe_layers:
            rows = B.check(self._lib.llama_get_expert_capture(self.ctx, il, ctypes.byref(ids_p), ctypes.byref(w_p),
                                                              ctypes.byref(k)), "reading the routing capture")
            n = rows * k.value
            if n == 0:
                out[il] = (np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32))
                continue
            out[il] = (np.ctypeslib.as_array(ids_p, shape=(n,)).reshape(rows, k.value).copy(),
                       np.ctypeslib.as_array(w_p, shape=(n,)).reshape(rows, k.value).copy())
        return out

    # -- waves of whole sequences (used by the Model's batched methods) ---------------------------------------
    def waves(self, lengths: Sequence[int], extra: int) -> list[list[int]]:
        """Group sequence indices so that each group fits the slots, the batch (a longer sequence goes alone and is
        decoded in chunks) and the per-sequence context (``extra``: tokens generated after the prompt)."""
        waves: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for i, n in enumerate(lengths):
            if n + extra > self.n_ctx_seq:
                raise UserError(f"a sequence of {n} tokens" + (f" + {extra} new" if extra else "")
                                + f" does not fit the context of {self.n_ctx_seq}", hint="load with a larger --ctx")
            if cur and (len(cur) == self.n_seq or (used + n > self.n_batch and not self.invariant)):
                waves.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            waves.append(cur)
        return waves

    def run(self, entries: Sequence[Entry], capture: bool = False):
        """Decode ``entries`` in chunks of ``n_batch``: (logits of the flagged entries [n, n_vocab] -- a view of the
        native buffer when one decode sufficed, else a copy (in invariant mode a reused scratch buffer): valid until the
        next ``run`` --, the routing of the flagged entries, concatenated over the chunks, or None). Capture must be
        on when ``capture`` is asked for."""
        if self.invariant:
            return self._run_invariant(entries, capture)
        chunks = [entries[i: i + self.n_batch] for i in range(0, len(entries), self.n_batch)]
        rows, caps = [], []
        for chunk in chunks:
            self.decode(chunk)
            flagged = [j for j, e in enumerate(chunk) if e[3]]
            n = len(flagged)
            if len(chunks) == 1:
                rows.append(self.logits(n) if n else np.zeros((0, self.n_vocab), np.float32))
            elif n:
                rows.append(self.logits(n).copy())
            if capture:
                # layers computed for every token give len(chunk) rows, the last layer of most architectures only
                # the flagged ones: keep the flagged rows of each
                caps.append({il: (ids[flagged], w[flagged]) if len(ids) == len(chunk) and n != len(chunk) else (ids, w)
                             for il, (ids, w) in self.capture().items()})
        logits = rows[0] if len(rows) == 1 else (np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), np.float32))
        cap = None
        if capture:
            cap = {il: (np.concatenate([c[il][0] for c in caps]), np.concatenate([c[il][1] for c in caps]))
                   for il in caps[0]}
        return logits, cap

    def _run_invariant(self, entries: Sequence[Entry], capture: bool):
        """``run`` in invariant mode: decodes of 2..INVARIANT_UBATCH tokens, none with exactly one output row (module
        docstring). The logits are a view of llama.cpp's buffer when one decode sufficed, else rows copied into a
        scratch buffer of this context: either way valid until the next decode."""
        n = len(entries)
        n_pieces = -(-n // (self.n_batch - 1)) if n else 0
        bounds = [round(i * n / n_pieces) for i in range(n_pieces + 1)] if n_pieces else [0]  # balanced: >= 2 each if n >= 2
        n_rows = sum(1 for e in entries if e[3])
        logits = None
        at, caps = 0, []
        for a, b in zip(bounds, bounds[1:]):
            piece = list(entries[a:b])
            real = [j for j, e in enumerate(piece) if e[3]]   # flagged rows the caller asked for
            if len(piece) == 1:                                # pad: a second token in the padding sequence
                if self._pad_pos >= self.n_ctx_seq:
                    raise EdgeMoteError("the padding sequence of the batch-invariant context is full")
                piece.append((piece[0][0], self._pad_pos, self.pad_seq, True))
                self._pad_pos += 1
            elif sum(e[3] for e in piece) == 1:                # one more output row (dropped below)
                j = next(j for j, e in enumerate(piece) if not e[3])
                piece[j] = (*piece[j][:3], True)
            self.decode(piece)
            flagged = [j for j, e in enumerate(piece) if e[3]]
            keep = [flagged.index(j) for j in real]
            if keep:
                src = self.logits(len(flagged))
                lo, hi = keep[0], keep[-1] + 1
                if n_pieces == 1 and hi - lo == len(keep):     # one decode: a view, no copy
                    logits = src[lo:hi]
                else:
                    if logits is None:
                        logits = self._scratch(n_rows)
                    if hi - lo == len(keep):                   # contiguous (the usual case): one block copy
                        logits[at: at + len(keep)] = src[lo:hi]
                    else:
                        logits[at: at + len(keep)] = src[keep]
                at += len(keep)
            if capture:
                caps.append({il: (ids[real], w[real]) if len(ids) == len(piece) else (ids[keep], w[keep])
                             for il, (ids, w) in self.capture().items()})
        if logits is None:
            logits = np.zeros((0, self.n_vocab), np.float32)
        cap = None
        if capture:
            cap = {il: (np.concatenate([c[il][0] for c in caps]), np.concatenate([c[il][1] for c in caps]))
                   for il in caps[0]}
        return logits, cap

    SCRATCH_BYTES = 256 << 20  # largest scratch kept between runs (larger ones are allocated per run)

    def _scratch(self, n_rows: int) -> np.ndarray:
        """[n_rows, n_vocab] float32 rows, reused from run to run when small enough (a fresh array per run costs
        page faults that take longer than the copy)."""
        if n_rows * self.n_vocab * 4 > self.SCRATCH_BYTES:
            return np.empty((n_rows, self.n_vocab), np.float32)
        if self._scratch_rows is None or len(self._scratch_rows) < n_rows:
            self._scratch_rows = np.empty((n_rows, self.n_vocab), np.float32)
        return self._scratch_rows[:n_rows]

    def start_wave(self, wave: Sequence[int], steerings: Sequence[Steering | None] | None) -> None:
        """Empty the cache and give slot ``s`` the steering of sequence ``wave[s]``."""
        self.clear_all()
        for s, i in enumerate(wave):
            self.set_sequence_steering(s, self._own(steerings[i] if steerings is not None else None))
        for s in range(len(wave), self.n_seq):
            self.set_sequence_steering(s, None)

    def _own(self, steering: Steering | None) -> Steering | None:
        """None when a sequence's steering is the Model's (then a uniform batch keeps the context-wide graph)."""
        return None if steering is None or steering == self._model.steering else steering

    def greedy(self, prompts: Sequence[Sequence[int]], max_new: int, is_eog: Callable[[int], bool],
               keep: int | None = None, tick: Callable[[int], None] | None = None,
               steerings: Sequence[Steering | None] | None = None,
               sampler: Callable[[int, np.ndarray], int] | None = None, routing: bool = False,
               on_row: Callable[[int, list[int], np.ndarray], None] | None = None) -> list[tuple]:
        """Continue every prompt (greedy, or ``sampler(i, row)`` choosing prompt i's next token) until an
        end-of-generation token or ``max_new`` tokens: (new tokens, the logits each step chose from
        [len(new) + (1 if stopped at EOG), n_vocab], only the first ``keep`` rows when ``keep`` is given) -- plus,
        with ``routing``, {layer: (ids, weights)} of the tokens whose logits those were (the last prompt token and
        the generated tokens that were decoded), read from the same decodes. ``on_row(i, new, row)`` sees every row
        before prompt i's next token is chosen from it (``new``: its tokens so far; ``row`` valid during the call).

        Continuous batching: one decode per step holds the next token of every running sequence plus the prompts
        of sequences admitted into slots that finished, so the batch stays full until the queue runs dry (in
        invariant mode: waves, see the module docstring)."""
        from collections import deque

        keep = max_new + 1 if keep is None else max(0, min(int(keep), max_new + 1))
        for n in (len(p) for p in prompts):
            if n + max_new > self.n_ctx_seq:
                raise UserError(f"a sequence of {n} tokens + {max_new} new does not fit the context of "
                                f"{self.n_ctx_seq}", hint="load with a larger --ctx")
        out: list[tuple[list[int], np.ndarray]] = [([], np.zeros((0, self.n_vocab), np.float32))] * len(prompts)
        queue = deque(range(len(prompts)))
        free = list(range(self.n_seq - 1, -1, -1))
        was = self._capture
        if routing:
            self.set_capture(True)
        run: dict[int, dict] = {}  # slot -> state of the sequence it holds
        self.clear_all()
        while queue or run:
            entries: list[Entry] = []
            flagged: list[int] = []
            for slot, st in run.items():  # the last chosen token of each running sequence, at its position
                entries.append((st["new"][-1], len(prompts[st["i"]]) + len(st["new"]) - 1, slot, True))
                flagged.append(slot)
            wave_start = self.invariant and not run
            if wave_start and queue:
                self.clear_all()  # a new wave on an empty cache: no cells are freed until it ends
            while queue and free and (wave_start if self.invariant
                                      else not entries or len(entries) + len(prompts[queue[0]]) <= self.n_batch):
                i, slot = queue.popleft(), free.pop()
                if not self.invariant:
                    self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
                self.set_sequence_steering(slot, self._own(steerings[i] if steerings is not None else None))
                toks = prompts[i]
                entries.extend((int(t), j, slot, j == len(toks) - 1) for j, t in enumerate(toks))
                flagged.append(slot)
                run[slot] = {"i": i, "new": [], "rows": np.empty((keep, self.n_vocab), np.float32), "n_rows": 0,
                             "route": []}
            logits, cap = self.run(entries, capture=routing)
            for k, slot in enumerate(flagged):
                st = run[slot]
                row = logits[k]
                if on_row is not None:
                    on_row(st["i"], st["new"], row)
                if routing:
                    st["route"].append({il: (ids[k], w[k]) for il, (ids, w) in cap.items()})
                if st["n_rows"] < keep:
                    st["rows"][st["n_rows"]] = row
                    st["n_rows"] += 1
                nxt = int(np.argmax(row)) if sampler is None else sampler(st["i"], row)
                done = is_eog(nxt)
                if not done:
                    st["new"].append(nxt)
                    done = len(st["new"]) >= max_new
                if done:
                    rows = st["rows"] if st["n_rows"] == keep else st["rows"][: st["n_rows"]].copy()
                    if routing:
                        route = {il: (np.stack([r[il][0] for r in st["route"]]), np.stack([r[il][1] for r in st["route"]]))
                                 for il in st["route"][0]}
                        out[st["i"]] = (st["new"], rows, route)
                    else:
                        out[st["i"]] = (st["new"], rows)
                    del run[slot]
                    free.append(slot)
                    if tick:
                        tick(1)
        if routing:
            self.set_capture(was)
        return out

    def score(self, seqs: Sequence[Sequence[int]], first: Sequence[int],
              reduce: Callable[[int, np.ndarray], object] | None = None,
              tick: Callable[[int], None] | None = None,
              steerings: Sequence[Steering | None] | None = None) -> list:
        """For each sequence, the next-token logits at positions ``first[i]`` .. ``len(seqs[i]) - 1``
        ([len - first, n_vocab]; row r predicts token ``first + r + 1``), or ``reduce(i, logits)`` computed on a
        view of the native buffer (no copy; the view is only valid during the call)."""
        empty = np.zeros((0, self.n_vocab), np.float32)
        out: list = [empty] * len(seqs)
        for wave in self.waves([len(s) for s in seqs], 0):
            self.start_wave(wave, steerings)
            entries, spans, n_out = [], {}, 0
            for s, i in enumerate(wave):
                lo = min(max(0, int(first[i])), len(seqs[i]))
                spans[i] = (n_out, n_out + len(seqs[i]) - lo)
                n_out = spans[i][1]
                entries.extend((int(t), j, s, j >= lo) for j, t in enumerate(seqs[i]))
            logits, _ = self.run(entries)
            for i in wave:
                rows = logits[spans[i][0]: spans[i][1]]
                out[i] = rows.copy() if reduce is None else reduce(i, rows)
            if tick:
                tick(len(wave))
        return out

    def routing(self, seqs: Sequence[Sequence[int]], steerings: Sequence[Steering | None] | None = None,
                tick: Callable[[int], None] | None = None) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
        """The experts every token of every sequence selected: per sequence {layer: (ids [n, k], weights [n, k])}.
        All rows are requested as outputs, so the last MoE layer is computed for every token too."""
        was = self._capture
        self.set_capture(True)
        out: list = [None] * len(seqs)
        try:
            for wave in self.waves([len(s) for s in seqs], 0):
                self.start_wave(wave, steerings)
                entries, spans, n = [], {}, 0
                for s, i in enumerate(wave):
                    spans[i] = (n, n + len(seqs[i]))
                    n += len(seqs[i])
                    entries.extend((int(t), j, s, True) for j, t in enumerate(seqs[i]))
                _, cap = self.run(entries, capture=True)
                for i in wave:
                    a, b = spans[i]
                    out[i] = {il: (ids[a:b], w[a:b]) for il, (ids, w) in cap.items()}
                if tick:
                    tick(len(wave))
        finally:
            self.set_capture(was)
        return out
