"""The continuous-batching scheduler (edge_mote/runtime/scheduler.py) over a fake model whose next token is a known
function of the last token and the sequence's steering: what goes into each decode, joining, cancelling, queueing,
stop strings. (The real model is exercised through the server in tests/e2e/test_serve*.py.)"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from edge_mote.errors import UserError
from edge_mote.runtime.scheduler import Finished, Request, Sampling, Scheduler, TokenEvent
from edge_mote.steering import Steering

V = 26          # tokens 0..25 read as letters a..z; token 25 ('z') ends generation
EOG = 25


class FakeBatch:
    def __init__(self, n_seq, n_ctx_seq, delay=0.0):
        self.n_seq, self.n_ctx_seq, self.n_batch, self.n_vocab = n_seq, n_ctx_seq, 64, V
        self.steer = {}
        self.kept = []        # (sequence, positions kept) of every keep_prefix / clear_sequence
        self.loaded = []      # (sequence, state) of every load_sequence
        self.decodes = []     # entries of every decode
        self.delay = delay
        self._rows = None
        self.closed = False
        self.lock = threading.Lock()

    def set_sequence_steering(self, seq, steering):
        self.steer[seq] = steering

    def clear_sequence(self, seq):
        self.steer.pop(seq, None)
        self.kept.append((seq, 0))

    def release_sequence(self, seq):
        pass

    def save_sequence(self, seq):
        return ("state", seq, len(self.kept)).__repr__().encode()

    def load_sequence(self, seq, data):
        self.loaded.append((seq, data))
        return True

    def keep_prefix(self, seq, n):
        self.kept.append((seq, n))
        return True

    def set_capture(self, on):
        pass

    def capture(self):
        return {}

    def decode(self, entries):
        assert self.lock.acquire(blocking=False), "decode from two threads at once"
        try:
            assert len(entries) <= self.n_batch
            self.decodes.append(list(entries))
            rows = []
            for tok, pos, seq, out in entries:
                if out:
                    step = 2 if self.steer.get(seq) else 1    # steered sequences skip a letter
                    row = np.zeros(V, np.float32)
                    row[(tok + step) % V] = 1.0
                    rows.append(row)
            self._rows = np.array(rows, np.float32).reshape(len(rows), V)
            time.sleep(self.delay)
        finally:
            self.lock.release()

    def logits(self, n):
        assert n == len(self._rows)
        return self._rows

    def close(self):
        self.closed = True


class FakeModel:
    steering = None

    def __init__(self, delay=0.0):
        self.info = SimpleNamespace(moe_layers=(0, 1))
        self.delay = delay
        self.pc = None

    def open_batch(self, n_seq, n_ctx_seq):
        self.pc = FakeBatch(n_seq, n_ctx_seq, self.delay)
        return self.pc

    def token_eog(self, t):
        return t == EOG

    def detokenize(self, tokens):
        return "".join(chr(ord("a") + t) for t in tokens)

    def tokenize(self, text, add_bos=True, special=False):
        return [ord(c) - ord("a") for c in text]


def collect(sched, req):
    q = queue.Queue()
    h = sched.submit(req, q.put)
    return h, q


def drain(q, timeout=10):
    events = []
    while True:
        ev = q.get(timeout=timeout)
        events.append(ev)
        if isinstance(ev, Finished):
            return events


def text_of(events):
    return "".join(e.text for e in events)


@pytest.fixture
def sched():
    model = FakeModel(delay=0.002)
    s = Scheduler(model, n_seq=3, n_ctx_seq=64).start()
    yield s
    s.close()
    assert model.pc.closed


def test_greedy_until_eog_and_length(sched):
    _, q = collect(sched, Request([ord("u") - 97], max_tokens=10))
    ev = drain(q)
    assert text_of(ev) == "vwxy" and ev[-1].reason == "stop" and ev[-1].n_generated == 4
    _, q = collect(sched, Request([0, 1], max_tokens=3))
    ev = drain(q)
    assert text_of(ev) == "cde" and ev[-1].reason == "length" and ev[-1].n_prompt == 2


def test_a_prompt_reuses_the_cells_of_an_earlier_one_with_the_same_prefix_and_steering(sched):
    pc = sched.model.pc
    prompt = [0, 1, 2, 3, 4, 5]
    first = drain(collect(sched, Request(prompt, max_tokens=4))[1])
    n = len(pc.decodes)
    # the conversation goes on: the earlier prompt + its answer + a new turn; only the new part is decoded
    follow = prompt + [6, 7, 8, 9] + [0, 1]
    second = drain(collect(sched, Request(follow, max_tokens=3))[1])
    fed = [e for d in pc.decodes[n:] for e in d]
    assert text_of(first) == "ghij" and text_of(second) == "cde"
    # kept: the prompt + the 3 answer tokens that were fed back (the 4th never was): decoding resumes at position 9
    assert [(t, p) for t, p, _, _ in fed][:3] == [(9, 9), (0, 10), (1, 11)]
    assert sched.stats.reused_tokens == 9
    # an identical prompt: its last token is decoded again, for its logits
    n = len(pc.decodes)
    again = drain(collect(sched, Request(follow, max_tokens=3))[1])
    assert text_of(again) == "cde" and [e[:2] for d in pc.decodes[n:] for e in d][0] == (1, 11)
    # another steering computes other cells: nothing is reused
    n, before = len(pc.decodes), sched.stats.reused_tokens
    drain(collect(sched, Request(follow, max_tokens=2, steering=Steering.parse("off=0:1")))[1])
    assert [e[:2] for d in pc.decodes[n:] for e in d][0] == (0, 0) and sched.stats.reused_tokens == before


def test_kept_cells_are_bounded_by_one_sequence_context_oldest_dropped_first(sched):
    pc = sched.model.pc                                     # n_ctx_seq = 64
    sched.prompts.host_bytes = 0                            # no copies in host memory (next test)
    for first in (0, 1, 2):
        drain(collect(sched, Request([first] + [3] * 29, max_tokens=2))[1])   # 30 prompt tokens + 1 fed back
    dropped = [q for q, n in pc.kept if n == 0]
    assert len(dropped) == 1                                # 3 x 31 > 64: the oldest request's cells went
    n = len(pc.decodes)
    drain(collect(sched, Request([0] + [3] * 29, max_tokens=1))[1])          # so the first prompt is decoded again
    assert pc.decodes[n][0][:2] == (0, 0)


def test_a_prompt_sharing_only_its_opening_takes_an_empty_slot_and_leaves_kept_cells_alone(sched):
    pc = sched.model.pc
    a, b = [7, 0, 1, 2, 3, 4], [7, 5, 6, 8, 9, 10]         # the same first token (a BOS), nothing else
    for p in (a, b, a, b):
        drain(collect(sched, Request(p, max_tokens=2))[1])
    assert sched.stats.reused_tokens == 2 * 5               # the repeats found their own cells (less the last token)
    assert not [q for q, n in pc.kept if n == 0]            # nothing was dropped


def test_dropped_cells_go_to_host_memory_and_come_back_for_a_matching_prompt(sched):
    pc = sched.model.pc                                     # 3 slots, 64 cells each, kept cells bounded by 64
    prompts = [[i] + [3] * 29 for i in range(4)]            # 4 prompts of 30 tokens, each its own first token
    for p in prompts:
        drain(collect(sched, Request(p, max_tokens=2))[1])
    assert not pc.loaded                                    # the first one's cells were saved, then dropped
    n = len(pc.decodes)
    drain(collect(sched, Request(prompts[0] + [4, 5], max_tokens=1))[1])
    assert len(pc.loaded) == 1                              # ... and put back
    # the kept cells: the prompt and the first answer token (4) fed back, the new prompt continues with 4, 5
    assert [e[:2] for d in pc.decodes[n:] for e in d][0] == (5, 31)
    assert sched.stats.reused_tokens == 31


def test_each_sequence_uses_its_own_steering_in_one_decode(sched):
    qs = [collect(sched, Request([0], max_tokens=6, steering=Steering.parse("off=0:1") if i % 2 else None))[1]
          for i in range(3)]
    texts = [text_of(drain(q)) for q in qs]
    assert texts == ["bcdefg", "cegikm", "bcdefg"]
    multi = [d for d in sched.model.pc.decodes if len({e[2] for e in d}) == 3]
    assert multi, "the three requests never shared a decode"


def test_requests_beyond_the_slots_queue_and_a_new_one_joins_at_the_next_step(sched):
    pc = sched.model.pc
    handles = [collect(sched, Request([0], max_tokens=20)) for _ in range(5)]
    texts = [text_of(drain(q)) for _, q in handles]
    assert all(t == "bcdefghijklmnopqrstuvwxy"[:20] for t in texts)
    assert max(len({e[2] for e in d}) for d in pc.decodes) == 3     # never more sequences than slots
    assert sched.stats.max_seqs_in_step == 3
    # a request submitted while others decode is in the very next decode with its whole prompt
    _, q1 = collect(sched, Request([0], max_tokens=20))
    q1.get(timeout=5)
    n_before = len(pc.decodes)
    _, q2 = collect(sched, Request([3, 4, 5], max_tokens=2))
    drain(q2)
    joined = next(i for i, d in enumerate(pc.decodes) if (3, 0) in {(e[0], e[1]) for e in d})
    assert joined <= n_before + 2                                 # not after the running request ends
    assert len({e[2] for e in pc.decodes[joined]}) == 2           # the prompt rides along with the other's token
    drain(q1)


def test_cancel_frees_the_slot(sched):
    pc = sched.model.pc
    hs = [collect(sched, Request([0], max_tokens=1000 // 20)) for _ in range(3)]
    hs[0][1].get(timeout=5)
    hs[0][0].cancel()
    ev = drain(hs[0][1])
    assert ev[-1].reason == "cancelled"
    # a fourth request gets the freed slot while the other two still run
    _, q4 = collect(sched, Request([0], max_tokens=2))
    assert text_of(drain(q4)) == "bc"
    for h, q in hs[1:]:
        h.cancel()
        drain(q)
    assert sched.busy == 0 and not any(pc.steer.values())


def test_stop_strings_are_cut_and_held_back(sched):
    _, q = collect(sched, Request([0], max_tokens=20, stop=("efg", "xyz")))
    ev = drain(q)
    assert text_of(ev) == "bcd" and ev[-1].reason == "stop"
    assert all("e" not in e.text for e in ev)
    _, q = collect(sched, Request([0], max_tokens=4, stop=("def",)))   # 'de' held back, then released at length
    ev = drain(q)
    assert text_of(ev) == "bcde" and ev[-1].reason == "length"


def test_sampling_is_reproducible_and_logprobs_reported(sched):
    def run(seed):
        _, q = collect(sched, Request([0], max_tokens=5, sampling=Sampling(temperature=5.0, seed=seed, logprobs=2)))
        return drain(q)

    a, b = run(7), run(7)
    assert [e.token for e in a[:-1]] == [e.token for e in b[:-1]]
    tok = a[0]
    assert isinstance(tok, TokenEvent) and tok.logprob <= 0 and len(tok.top_logprobs) == 2


def test_calls_run_on_the_scheduler_thread_and_bad_requests_are_refused(sched):
    assert sched.call(lambda m: m.tokenize("abc")).result(5) == [0, 1, 2]
    assert sched.call(lambda m: threading.current_thread().name).result(5) == "edge-mote-scheduler"
    with pytest.raises(UserError, match="max_tokens"):
        sched.submit(Request([0], max_tokens=0), print)
    with pytest.raises(UserError, match="a sequence holds 64"):
        sched.submit(Request([0] * 64, max_tokens=1), print)
    with pytest.raises(UserError, match="top_p"):
        Sampling(top_p=0)


def test_a_failing_step_fails_its_requests_and_the_scheduler_keeps_serving(sched):
    _, q = collect(sched, Request([0], max_tokens=3, trace=True))   # the fake has no capture: the step raises
    ev = drain(q)
    assert ev[-1].reason == "error" and "KeyError" in ev[-1].error
    _, q = collect(sched, Request([0], max_tokens=3))
    assert text_of(drain(q)) == "bcd"
