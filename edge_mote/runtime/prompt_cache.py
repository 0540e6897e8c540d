"""Prompt reuse for the continuous-batching scheduler (``runtime/scheduler.py``), like llama-server's prompt cache.

A finished sequence keeps its KV cells in its slot. A new request goes to the free slot whose kept tokens share the
longest prefix with its prompt under the same steering, if that prefix is at least half the prompt
(``REUSE_SHARE``, llama-server's ``--slot-prompt-similarity``), and only the rest of the prompt is decoded (a chat's
next turn re-sends the conversation: only the new turn is computed); otherwise it takes an empty slot, else the one
freed longest ago. Kept cells are bounded by half the slots' contexts, the most recent requests' first: kept cells
widen the span of cells every decode's attention covers in the shared KV buffer. Cells about to be dropped are first
saved to host memory (``host_bytes``, least recently saved out first, as llama-server's ``--cache-ram``) and put
back into a slot for a later request that shares half its prompt with them.
"""

from __future__ import annotations

from typing import Sequence

from ..steering import Steering


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """What the free slots of one batched context (``pc``: ``keep_prefix``, ``clear_sequence``,
    ``release_sequence``, ``save_sequence``, ``load_sequence``) hold, and host-memory copies of dropped ones.
    ``steering`` in the methods: the steering the tokens are computed with (the request's, else the Model's)."""

    STASH_ENTRIES = 1024  # most prompts kept in host memory (each admission compares its prompt with all of them)
    REUSE_SHARE = 0.5     # a slot is chosen for its kept cells when they cover this share of the prompt: a common
    #                       opening (BOS, a system prompt) alone does not evict others

    def __init__(self, pc, n_seq: int, n_ctx_seq: int, host_bytes: int):
        self.pc, self.n_seq, self.n_ctx_seq = pc, n_seq, n_ctx_seq
        self.host_bytes = max(0, int(host_bytes))
        self.kept: dict[int, tuple[list[int], Steering | None, int]] = {}  # free slot -> (tokens, steering, when)
        self._freed = 0
        self._stash: dict[int, tuple[list[int], Steering | None, bytes]] = {}  # id -> (tokens, steering, state)
        self._stash_ids = 0

    def reusable(self, seq: int, tokens: Sequence[int], steering: Steering | None) -> int:
        """How many leading prompt tokens the cells kept in free slot ``seq`` already hold (never the last one: its
        logits are needed, so it is decoded again)."""
        kept = self.kept.get(seq)
        if kept is None or kept[1] != steering:
            return 0
        return min(common_prefix(kept[0], tokens), len(tokens) - 1)

    def pick(self, free: list[int], tokens: Sequence[int], steering: Steering | None) -> int:
        """The free slot for a prompt (see the module docstring)."""
        reuse = {q: self.reusable(q, tokens, steering) for q in free}
        best = max(free, key=lambda q: (reuse[q], -q))
        if reuse[best] >= self.REUSE_SHARE * len(tokens):
            return best
        return min(free, key=lambda q: (q in self.kept, self.kept[q][2] if q in self.kept else 0, q))

    def take(self, seq: int, tokens: Sequence[int], steering: Steering | None) -> int:
        """Slot ``seq`` starts a request: trim its cells to what the prompt reuses (from the slot, else from host
        memory); returns the prompt tokens its cells hold."""
        keep = self.reusable(seq, tokens, steering)
        if seq in self.kept:
            if keep < self.REUSE_SHARE * len(tokens):   # the slot was taken for want of a better one
                self._save(seq)
                self.pc.keep_prefix(seq, 0)
                keep = 0
            else:
                del self.kept[seq]
                if not self.pc.keep_prefix(seq, keep):
                    keep = 0                            # this memory cannot drop part of a sequence: it dropped all
        if keep < self.REUSE_SHARE * len(tokens) and self._stash:
            keep = self._from_stash(seq, tokens, steering, keep)
        return keep

    def finished(self, seq: int, kv: list[int], steering: Steering | None) -> None:
        """The request in slot ``seq`` ended; its cells hold ``kv``."""
        self._freed += 1
        self.kept[seq] = (kv, steering, self._freed)
        self.pc.release_sequence(seq)
        while sum(len(k[0]) for k in self.kept.values()) > self.n_ctx_seq * max(1, self.n_seq // 2):
            oldest = min(self.kept, key=lambda q: self.kept[q][2])
            self._save(oldest)
            self.pc.clear_sequence(oldest)

    def _save(self, seq: int) -> None:
        """Move the cells kept in free slot ``seq`` to host memory (dropping the oldest copies that no longer fit);
        the slot's own record is forgotten either way."""
        toks, steering, _ = self.kept.pop(seq)
        if self.host_bytes <= 0 or len(toks) < 2:
            return
        data = self.pc.save_sequence(seq)
        if data is None or len(data) > self.host_bytes:
            return
        while self._stash and (len(self._stash) >= self.STASH_ENTRIES
                               or sum(len(d) for *_, d in self._stash.values()) + len(data) > self.host_bytes):
            del self._stash[next(iter(self._stash))]
        self._stash_ids += 1
        self._stash[self._stash_ids] = (toks, steering, data)

    def _from_stash(self, seq: int, tokens: Sequence[int], steering: Steering | None, have: int) -> int:
        """Put back into the empty slot ``seq`` the saved cells sharing the longest prefix (>= REUSE_SHARE of the
        prompt, more than ``have``) with the prompt; returns the prompt tokens the slot now holds."""
        best, best_n = None, have
        for sid, (toks, st, _) in self._stash.items():
            if st == steering:
                n = min(common_prefix(toks, tokens), len(tokens) - 1)
                if n > best_n:
                    best, best_n = sid, n
        if best is None or best_n < self.REUSE_SHARE * len(tokens):
            return have
        _, _, data = self._stash.pop(best)
        if not self.pc.load_sequence(seq, data):
            return 0
        return best_n if self.pc.keep_prefix(seq, best_n) else 0
