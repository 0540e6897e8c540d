"""Batched decoding (``Model.greedy_many`` / ``score_many``, used by ``edge-mote eval``) equals one-sequence decoding,
with and without steering, and follows steering changes made after the batched context exists."""

from __future__ import annotations

import numpy as np
import pytest

import edge_mote


@pytest.fixture(scope="module")
def m(tiny_model, native):
    with edge_mote.load(tiny_model("qwen3moe")[1], n_ctx=256, n_threads=2) as model:
        yield model


def _prompts(m):
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog and", "1 2 3 4 5 6", "Why",
             "Once upon a time, in a land far away, there lived a"] * 4  # 20 prompts: more than one wave of 16
    return [m.tokenize(t) for t in texts]


@pytest.mark.parametrize("steering", [None, "off=0:1,1:2", "on=1:3", "bias=0:0=2.5;drop=1:1"])
def test_greedy_many_equals_greedy(m, steering):
    prompts = _prompts(m)
    m.set_steering(steering)
    batched = m.greedy_many(prompts, 8, stop_at_eos=False)
    for toks, (new, rows) in zip(prompts, batched):
        ref_new, ref_rows = m.greedy(toks, 8, stop_at_eos=False)  # alone in its batch
        assert new == ref_new
        assert rows.shape == (len(new), m.info.n_vocab)
        np.testing.assert_allclose(rows, ref_rows, atol=2e-3, rtol=0)
        # the step logits are the next-token logits of the prompt + continuation
        np.testing.assert_allclose(rows, m.logits(toks + new)[len(toks) - 1: len(toks) - 1 + len(new)], atol=2e-3, rtol=0)
    m.set_steering(None)


def test_score_many_equals_logits_and_follows_steering(m):
    prompts = _prompts(m)[:6]
    first = [max(0, len(p) - 3) for p in prompts]
    plain = m.score_many(prompts, first)
    m.set_steering("off=0:1,0:2,1:0")  # changed after the batched context was made
    steered = m.score_many(prompts, first)
    for toks, f, a, b in zip(prompts, first, plain, steered):
        np.testing.assert_allclose(b, m.logits(toks)[f:], atol=2e-3, rtol=0)
    assert any(np.abs(a - b).max() > 1e-2 for a, b in zip(plain, steered))  # the steering did reach the batch
    m.set_steering(None)
    again = m.score_many(prompts, first)
    for a, b in zip(plain, again):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_long_sequences_get_fewer_slots_and_same_results(m, monkeypatch):
    import edge_mote.runtime.model as model_module

    monkeypatch.setattr(model_module, "PARALLEL_CELLS", 512)
    prompts = [m.tokenize(" ".join(["word"] * 150) + f" {i}") for i in range(3)]  # > 128 tokens: 192-cell slots
    if m._parallel is not None:  # start from a fresh batched context sized for these sequences
        m._parallel.close()
        m._parallel = None
    batched = m.greedy_many(prompts, 4, stop_at_eos=False)
    assert m._parallel.n_seq == 2 and m._parallel.n_ctx_seq == 192
    for toks, (new, _) in zip(prompts, batched):
        assert new == m.greedy(toks, 4, stop_at_eos=False)[0]


def test_threads_share_a_model(m):
    """A Model serves several threads (its methods take a lock); each thread's per-call steering stays its own."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = _prompts(m)[:4]
    steerings = [None, "off=0:1", "on=1:3", "bias=0:0=2.5;drop=1:1"]
    want = [m.logits_many([p], [s])[0] for p, s in zip(prompts, steerings)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda ps: m.logits_many([ps[0]], [ps[1]])[0], zip(prompts, steerings)))
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
