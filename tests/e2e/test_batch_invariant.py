"""Batch-invariant decoding (``invariant=True``): each sequence's greedy tokens, logits and scores are bit-identical
whatever it is decoded with -- alone, among other prompts, among other steerings -- on all six architectures.

Without it llama.cpp's CPU kernels round differently with the batch's composition (see
``edge_mote.runtime.parallel``), which is why the evaluation protocol, whose table must not depend on which
configurations share decodes, decodes this way.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_mote import Steering

TEXTS = ["Hello world, how are you today", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6 7 8",
         "Why is the sky blue?", "Once upon a time"]
NEW = 6


@pytest.fixture(scope="module")
def m(tiny_loaded):
    return tiny_loaded


def _steerings(m) -> list[Steering | None]:
    L = m.info.moe_layers
    return [None, Steering(off=[(L[0], 0), (L[-1], 1)]), Steering(on=[(L[0], 2)]),
            Steering(drop=[(L[-1], 3)], bias={(L[0], 4): -2.5}), Steering(off=[(L[-1], 0)], on=[(L[0], 1)])]


def _same(a, b) -> None:
    assert a[0] == b[0], "greedy tokens differ"
    assert a[1].shape == b[1].shape and np.array_equal(a[1], b[1]), \
        f"logits differ by up to {np.abs(a[1] - b[1]).max() if a[1].shape == b[1].shape else 'shape'}"


def test_greedy_is_bit_identical_alone_and_in_any_batch(m):
    toks = [m.tokenize(t) for t in TEXTS]
    ss = _steerings(m)
    alone = [m.greedy_many([t], NEW, keep_logits=NEW + 1, steerings=[s], invariant=True)[0] for t, s in zip(toks, ss)]
    # every prompt under every steering in one call (3 waves' worth of company), and a reversed order
    pairs = [(t, s) for s in ss for t in toks]
    mixed = m.greedy_many([t for t, _ in pairs], NEW, keep_logits=NEW + 1, steerings=[s for _, s in pairs],
                          invariant=True)
    rev = m.greedy_many([t for t, _ in pairs][::-1], NEW, keep_logits=NEW + 1, steerings=[s for _, s in pairs][::-1],
                        invariant=True)[::-1]
    for i, (t, s) in enumerate(zip(toks, ss)):
        j = ss.index(s) * len(toks) + i
        _same(mixed[j], alone[i])
        _same(rev[j], alone[i])
    # the plain (not invariant) surface agrees to rounding
    plain = m.greedy_many([toks[0]], NEW, keep_logits=1, steerings=[ss[0]])[0]
    scale = max(float(np.abs(alone[0][1][0]).max()), 1.0)
    assert float(np.abs(plain[1][0] - alone[0][1][0]).max()) <= 1e-3 * scale


def test_scores_are_bit_identical_alone_and_in_any_batch(m):
    toks = [m.tokenize(t) for t in TEXTS]
    ss = _steerings(m)
    first = [max(0, len(t) - 4) for t in toks]
    batched = m.score_many(toks * len(ss), first * len(ss), steerings=[s for s in ss for _ in toks], invariant=True)
    for k, s in enumerate(ss):
        for i, t in enumerate(toks):
            alone = m.score_many([t], [first[i]], steerings=[s], invariant=True)[0]
            assert np.array_equal(batched[k * len(toks) + i], alone)
