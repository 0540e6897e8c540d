"""Oracle test suite: the patched llama.cpp against an independent transformers reference (reference.py).

Not collected by itself: each tests/oracle/test_oracle*.py module star-imports these tests and defines the
module-scoped ``pair`` fixture over its architectures (random tiny weights, converted with llama.cpp's own
converter). Unsteered logits, OFF / DROP / ON / bias logits and the routing capture must match the reference with the
router steered the same way. Every steering is chosen from the unsteered routing (most/least used experts), and each
test also checks that the steering changes the logits clearly, so a no-op patch cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import edge_mote

from .reference import check_default_matches_stock, load_reference_model, reference_forward, router_modules, routing_gaps

__all__ = [
    "PROMPT", "Pair", "steering_for", "test_reference_equals_stock_transformers", "test_routing_is_well_separated",
    "test_unsteered_logits_match_reference", "test_capture_matches_reference_routing",
    "test_steered_logits_and_routing_match_reference", "test_misplaced_mask_gives_different_logits",
    "test_changing_steering_between_decodes_equals_a_fresh_context", "test_corner_cases_match_reference",
]

PROMPT = "The quick brown fox jumps over the lazy dog. In 1887, the committee met in Paris to"
ATOL = 1e-3          # F32 weights, F32 KV cache: measured agreement is ~1e-5
MIN_EFFECT = 1e-2    # a steering must move the logits at least this much


class Pair:
    def __init__(self, arch, hf, gguf):
        self.arch = arch
        self.ref = load_reference_model(hf)
        self.model = edge_mote.load(gguf, n_ctx=256, n_threads=2, type_k=0, type_v=0)
        self.tokens = self.model.tokenize(PROMPT, add_bos=False)
        info = self.model.info
        self.shape = (info.n_layer, info.n_expert)
        self.base = self.model.logits(self.tokens)
        self.trace = self.model.routing(self.tokens)

    def ranked(self, layer):
        """Experts of a layer by how often the unsteered model selected them, most used first."""
        counts = np.bincount(self.trace.ids[layer].ravel(), minlength=self.shape[1])
        return [int(e) for e in np.argsort(-counts, kind="stable")]

    def reference(self, steering):
        state, bias = steering.to_arrays(*self.shape, self.model.info.moe_layers, self.model.info.n_expert_used)
        return reference_forward(self.ref, self.tokens, state, bias, steering.margin)


def steering_for(p: Pair, mode: str) -> edge_mote.Steering:
    layers = p.model.info.moe_layers
    if mode == "off":   # the two most used experts of every MoE layer
        return edge_mote.Steering(off=[(l, e) for l in layers for e in p.ranked(l)[:2]])
    if mode == "drop":  # the most used expert of every MoE layer
        return edge_mote.Steering(drop=[(l, p.ranked(l)[0]) for l in layers])
    if mode == "on":    # the least used expert of every MoE layer
        return edge_mote.Steering(on=[(l, p.ranked(l)[-1]) for l in layers])
    if mode == "bias":
        return edge_mote.Steering(bias={**{(l, p.ranked(l)[0]): -2.0 for l in layers},
                                        **{(l, p.ranked(l)[-1]): 1.5 for l in layers}})
    raise ValueError(mode)


def test_reference_equals_stock_transformers(pair):
    """Unsteered, the re-implemented routers give exactly the stock transformers forward (logits and routing)."""
    check_default_matches_stock(pair.ref, pair.tokens)


def test_routing_is_well_separated(pair):
    gaps = routing_gaps(pair.ref, pair.tokens)
    assert min(gaps.values()) >= 1e-4, f"{pair.arch}: routing too close to call: {gaps}"


def test_unsteered_logits_match_reference(pair):
    ref_logits, _ = reference_forward(pair.ref, pair.tokens, np.zeros(pair.shape, np.int8), np.zeros(pair.shape, np.float32))
    assert np.abs(pair.base - ref_logits).max() < ATOL


def test_capture_matches_reference_routing(pair):
    _, ref_routing = reference_forward(pair.ref, pair.tokens, np.zeros(pair.shape, np.int8), np.zeros(pair.shape, np.float32))
    assert sorted(ref_routing) == list(pair.model.info.moe_layers)
    for layer, (ref_ids, ref_w) in ref_routing.items():
        ids, w = pair.trace.ids[layer], pair.trace.weights[layer]
        order = np.argsort(ids, axis=1, kind="stable")
        assert np.array_equal(np.take_along_axis(ids, order, 1), ref_ids), f"layer {layer}"
        assert np.allclose(np.take_along_axis(w, order, 1), ref_w, atol=1e-4), f"layer {layer}"


@pytest.mark.parametrize("mode", ["off", "drop", "on", "bias"])
def test_steered_logits_and_routing_match_reference(pair, mode):
    steering = steering_for(pair, mode)
    ref_logits, ref_routing = pair.reference(steering)
    with pair.model.steer(steering):
        logits = pair.model.logits(pair.tokens)
        trace = pair.model.routing(pair.tokens)
    assert np.abs(logits - pair.base).max() > MIN_EFFECT, f"{mode} did not change the logits"
    assert np.abs(logits - ref_logits).max() < ATOL
    for layer, (ref_ids, ref_w) in ref_routing.items():
        ids, w = trace.ids[layer], trace.weights[layer]
        order = np.argsort(ids, axis=1, kind="stable")
        assert np.array_equal(np.take_along_axis(ids, order, 1), ref_ids), f"{mode}: layer {layer} selection"
        assert np.allclose(np.take_along_axis(w, order, 1), ref_w, atol=1e-4), f"{mode}: layer {layer} weights"
    if mode == "off":
        for (layer, expert) in steering.off:
            assert not (trace.ids[layer] == expert).any(), "an OFF expert was selected"
    if mode == "on":
        for (layer, expert) in steering.on:
            assert (trace.ids[layer] == expert).any(axis=1).all(), "an ON expert was not selected for every token"
    if mode == "drop":
        first = min(l for l, _ in steering.drop)  # later layers see a changed hidden state
        assert np.array_equal(trace.ids[first], pair.trace.ids[first]), "DROP changed the routing"
        for (layer, expert) in steering.drop:
            assert np.all(trace.weights[layer][trace.ids[layer] == expert] == 0), "a DROPped expert kept weight"


def test_misplaced_mask_gives_different_logits(pair):
    """OFF one layer or one expert away from the target must not give the same result (masks are not vacuous)."""
    layers = pair.model.info.moe_layers
    l, e = layers[-1], pair.ranked(layers[-1])[0]
    with pair.model.steer(edge_mote.Steering(off=[(l, e)])):
        target = pair.model.logits(pair.tokens)
    others = [(layers[0], e), (l, pair.ranked(l)[-1])] if len(layers) > 1 else [(l, pair.ranked(l)[-1])]
    for ol, oe in others:
        with pair.model.steer(edge_mote.Steering(off=[(ol, oe)])):
            assert np.abs(pair.model.logits(pair.tokens) - target).max() > MIN_EFFECT


def test_changing_steering_between_decodes_equals_a_fresh_context(pair):
    sequence = [steering_for(pair, "off"), steering_for(pair, "on"), edge_mote.Steering(), steering_for(pair, "bias")]
    got = []
    for s in sequence:
        pair.model.set_steering(s)
        got.append(pair.model.logits(pair.tokens))
    pair.model.set_steering(None)
    for s, logits in zip(sequence, got):
        with edge_mote.load(pair.model.info.path, n_ctx=256, n_threads=2, type_k=0, type_v=0) as fresh:
            fresh.set_steering(s)
            assert np.array_equal(fresh.logits(pair.tokens), logits), f"steering {s} depends on history"


def _edge_cases(p: Pair):
    """Corner cases found by cross-checking: all of a token's experts dropped, k experts ON, and (DeepSeek groups)
    an ON expert whose group-mates are all OFF."""
    n_layer, n_expert = p.shape
    il = p.model.info.moe_layers[-1]
    k = p.model.info.n_expert_used[il]
    cases = {}
    st = np.zeros(p.shape, np.int8)
    st[il, p.trace.ids[il][0]] = 3  # DROP every expert token 0 selected
    cases["drop-all-of-a-token"] = st
    st = np.zeros(p.shape, np.int8)
    st[il, :k] = 2  # k experts ON
    cases["k-on"] = st
    n_group = int(getattr(router_modules(p.ref)[il], "num_group", 1) or 1)
    if n_group > 1:
        per_group = n_expert // n_group
        st = np.zeros(p.shape, np.int8)
        st[il, 0], st[il, 1:per_group] = 2, 1  # ON expert alone in its group
        cases["on-alone-in-group"] = st
    return il, cases


def test_corner_cases_match_reference(pair):
    il, cases = _edge_cases(pair)
    zero_bias = np.zeros(pair.shape, np.float32)
    for name, state in cases.items():
        ref_logits, ref_routing = reference_forward(pair.ref, pair.tokens, state, zero_bias)
        with pair.model.steer(edge_mote.Steering.from_arrays(state, zero_bias)):
            logits = pair.model.logits(pair.tokens)
            trace = pair.model.routing(pair.tokens)
        ids, w = trace.ids[il], trace.weights[il]
        order = np.argsort(ids, axis=1, kind="stable")
        assert np.array_equal(np.take_along_axis(ids, order, 1), ref_routing[il][0]), name
        assert np.allclose(np.take_along_axis(w, order, 1), ref_routing[il][1], atol=1e-4), name
        assert np.abs(logits - ref_logits).max() < ATOL, name
        if name == "drop-all-of-a-token":
            assert np.all(w[0] == 0), "dropping every selected expert must leave no weight"
