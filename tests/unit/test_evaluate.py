"""Detectors, metrics and the protocol's expert draws (no model needed)."""

import json

import numpy as np
import pytest

from edge_mote import UserError
from edge_mote.evaluate.detectors import REFUSAL, is_coherent, load_detector
from edge_mote.evaluate.metrics import answer_nll, kl_divergence, log_softmax, perplexity
from edge_mote.evaluate.protocol import draw_random, top_experts


@pytest.mark.parametrize("text, decision, phrase", [
    (" I can't help with that.", True, True),
    ("Sorry, I won't do that.", True, True),
    ("I\u2019m not able to assist.", True, True),
    (" Sure! Here is how to bake a cake: mix flour.", False, False),
    (" To bake a cake, first... but that would be illegal", False, True),
    (" I take take take take", False, False),
])
def test_refusal_detector_levels(text, decision, phrase):
    assert REFUSAL.decision(text) is decision
    assert REFUSAL.phrase(text) is phrase


def test_coherence():
    assert is_coherent("Sure, here is how to bake a cake with flour and eggs.")
    assert not is_coherent("take take take take take")
    assert not is_coherent("ok")
    assert not is_coherent("a b a b a b a b a b a b")


def test_custom_detector_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"name": "chinese", "openers": ["\u55ef"], "patterns": ["[\u4e00-\u9fff]"]}))
    d = load_detector(p)
    assert d.name == "chinese" and d.phrase("hello \u4f60\u597d") and not d.phrase("hello")
    p.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        load_detector(p)
    p.write_text(json.dumps({"patterns": ["("]}))
    with pytest.raises(UserError, match="bad pattern"):
        load_detector(p)


def test_kl_and_perplexity():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lp = log_softmax(logits)
    assert np.allclose(kl_divergence(lp, logits), 0)
    assert (kl_divergence(lp, logits[::-1]) > 0).all()
    nll, n = answer_nll(np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1, 1, 1]])), 1, [0, 2])
    assert n == 2 and nll == pytest.approx(-np.log(0.5) - np.log(0.8))
    assert perplexity(nll, n) == pytest.approx(np.exp(nll / 2))


def test_random_draws_are_reproducible_valid_and_exclude_the_top():
    k = {1: 2, 2: 2}
    top = {(1, 0), (1, 1)}
    a = draw_random(3, "off", top, [1, 2], 4, k, np.random.default_rng(3))
    b = draw_random(3, "off", top, [1, 2], 4, k, np.random.default_rng(3))
    assert a == b and not set(a) & top
    for layer in (1, 2):
        assert sum(l == layer for l, _ in a) <= 4 - 2
    with pytest.raises(UserError, match="within the layers' limits"):
        draw_random(5, "on", set(), [1, 2], 4, k, np.random.default_rng(0))


def test_top_experts_skips_what_a_layer_cannot_take():
    k = {1: 2, 2: 2}
    ranking = [(1, 0), (1, 1), (1, 2), (2, 0)]
    assert top_experts(ranking, 3, "off", 4, k) == [(1, 0), (1, 1), (2, 0)]
    assert top_experts(ranking, 3, "drop", 4, k) == [(1, 0), (1, 1), (1, 2)]
    with pytest.raises(UserError, match="ranks only 3"):
        top_experts(ranking, 4, "off", 4, k)
