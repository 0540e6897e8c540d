"""Steering per sequence in one ``llama_decode`` (issue #11), on the tiny models of all six architectures.

The reference for each sequence is the same sequence run alone with that steering as the context-wide steering,
which the oracle tests prove equal to transformers with the router masked the same way. So a batch mixing
none / OFF / ON / bias+DROP must give each sequence exactly those logits and that routing; a sequence's KV cache must
not depend on its neighbours' steering; changing a sequence's steering between decodes must equal a fresh context.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edge_mote
from edge_mote import Steering
from edge_mote.runtime import bindings as B

RTOL = 1e-4  # relative to the largest logit magnitude, F32 models
# one-token decode steps of 5 sequences vs 1 use other matmul kernels (gemm vs gemv): rounding differs a little more
STEP_RTOL = 1e-3

TEXTS = ["Hello world, how are you today", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6 7 8",
         "Why is the sky blue?", "Once upon a time"]


@pytest.fixture(scope="module")
def m(tiny_loaded):
    return tiny_loaded


def _steerings(m) -> list[Steering | None]:
    L = m.info.moe_layers
    k = m.info.n_expert_used[L[0]]
    return [None,
            Steering(off=[(L[0], 0), (L[-1], 1)]),
            Steering(on=[(L[0], e) for e in range(2, 2 + min(k, 2))]),
            Steering(drop=[(L[-1], 3)], bias={(L[0], 4): -2.5, (L[-1], 5): 1.5}),
            Steering(off=[(L[-1], 0)], on=[(L[0], 1)])]


def _close(a: np.ndarray, b: np.ndarray, rtol: float = RTOL) -> None:
    scale = max(float(np.abs(b).max()), 1.0)
    assert float(np.abs(a - b).max()) <= rtol * scale, f"max diff {np.abs(a - b).max()} (scale {scale})"


def _alone(m, fn, steering):
    with m.steer(steering):
        return fn()


def test_mixed_batch_equals_each_sequence_alone(m):
    toks = [m.tokenize(t) for t in TEXTS]
    steerings = _steerings(m)
    mixed = m.logits_many(toks, steerings)
    traces = m.routing_many(toks, steerings)
    for t, s, got, tr in zip(toks, steerings, mixed, traces):
        _close(got, _alone(m, lambda: m.logits(t), s))
        ref = _alone(m, lambda: m.routing(t), s)
        for il in m.info.moe_layers:
            assert np.array_equal(np.sort(tr.ids[il], axis=1), np.sort(ref.ids[il], axis=1)), (s, il)
            np.testing.assert_allclose(np.sort(tr.weights[il], axis=1), np.sort(ref.weights[il], axis=1), atol=1e-5)
    # the steerings did something: every steered sequence differs from its unsteered logits
    plain = m.logits_many(toks)
    for s, a, b in zip(steerings[1:], mixed[1:], plain[1:]):
        assert np.abs(a - b).max() > 1e-3, f"{s} had no effect"


def test_greedy_with_mixed_steering_equals_alone(m):
    toks = [m.tokenize(t) for t in TEXTS]
    steerings = _steerings(m)
    batched = m.greedy_many(toks, 6, stop_at_eos=False, steerings=steerings)
    for t, s, (new, rows) in zip(toks, steerings, batched):
        ref_new, ref_rows = _alone(m, lambda: m.greedy(t, 6, stop_at_eos=False), s)
        assert new == ref_new, s
        _close(rows, ref_rows, STEP_RTOL)


def test_kv_cache_unaffected_by_neighbours_and_steering_changes(m):
    """Decode step by step in one context: sequence 0 unsteered next to sequence 1 whose steering changes between
    decodes. Sequence 0's logits equal an unsteered run; sequence 1's last step equals a fresh context prefilled
    with the tokens it saw under each steering, i.e. its cache holds what its own steering computed."""
    s_a, s_b = _steerings(m)[1], _steerings(m)[2]
    t0, t1 = m.tokenize(TEXTS[1]), m.tokenize(TEXTS[2])
    n = min(len(t0), len(t1))
    with m.open_batch(n_seq=2, n_ctx_seq=64) as pc:
        got0, got1 = [], []
        for i in range(n):
            s1 = s_a if i < n // 2 else s_b           # steering of sequence 1 changes half way
            pc.set_sequence_steering(1, s1)
            pc.decode([(t0[i], i, 0, True), (t1[i], i, 1, True)])
            rows = pc.logits(2)
            got0.append(rows[0].copy())
            got1.append(rows[1].copy())
    _close(np.stack(got0), m.logits(t0[:n]), STEP_RTOL)
    # reference for sequence 1: its first half under s_a, second half under s_b, one token at a time, alone
    with m.open_batch(n_seq=1, n_ctx_seq=64) as ref:
        want = []
        for i in range(n):
            ref.set_sequence_steering(0, s_a if i < n // 2 else s_b)
            ref.decode([(t1[i], i, 0, True)])
            want.append(ref.logits(1)[0].copy())
    _close(np.stack(got1), np.stack(want), STEP_RTOL)


def test_per_sequence_error_codes(m):
    info = m.info
    L, E = info.n_layer, info.n_expert
    state = np.zeros((L, E), np.int8)
    state[info.moe_layers[0], 0] = B.LLAMA_EXPERT_STATE_OFF
    with m.open_batch(n_seq=2, n_ctx_seq=32) as pc:
        lib, ctx = B.lib(), pc.ctx
        set_seq = lambda seq, st: lib.llama_set_expert_steering_seq(ctx, seq, B.as_ptr(st, ctypes.c_int8), None,
                                                                    0.01, L, E)
        assert set_seq(-1, state) == -10
        assert set_seq(100000, state) == -10
        assert set_seq(0, state) == 0
        other = state.copy()
        other[info.moe_layers[0], 1] = B.LLAMA_EXPERT_STATE_OFF
        assert set_seq(1, other) == 0
        third = state.copy()
        third[info.moe_layers[0], 2] = B.LLAMA_EXPERT_STATE_OFF
        assert set_seq(5, third) == -10           # a third distinct steering: only n_seq_max slots
        assert set_seq(5, state) == 0             # the same steering as sequence 0 shares its slot
        assert lib.llama_clear_expert_steering_seq(ctx, -3) == -10
        # a token shared by two sequences of different steering: llama_decode refuses it, the process lives on
        import llama_cpp

        batch = llama_cpp.llama_batch_init(4, 0, 2)
        try:
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 5, 0, 2, True
            batch.seq_id[0][0], batch.seq_id[0][1] = 0, 1
            batch.n_tokens = 1
            assert llama_cpp.llama_decode(ctx, batch) == -1
            assert set_seq(1, state) == 0         # now sequences 0 and 1 share one steering: fine
            assert llama_cpp.llama_decode(ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
    with m.open_batch(n_seq=2, n_ctx_seq=32) as pc, pytest.raises(edge_mote.UserError, match="out of range"):
        pc.set_sequence_steering(2, Steering(off=[(info.moe_layers[0], 0)]))
