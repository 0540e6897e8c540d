"""The placement planner on synthetic nodes (no native code): memory, speed and links decide the split."""

from __future__ import annotations

import math

import pytest

from edge_mote import UserError
from edge_mote.cluster.plan import ModelProfile, NodeProfile, even_plan, make_plan, predict_split

MIB = 1 << 20


def model(n_layer=24, layer_mib=100, out_mib=300, n_vocab=150_000, n_embd=2048):
    return ModelProfile("m.gguf", n_layer, n_embd, n_vocab, (layer_mib * MIB,) * n_layer, (layer_mib * MIB // 4,) * n_layer,
                        (40,) * n_layer, 8 * MIB, out_mib * MIB, out_mib * MIB, 12, 2048)


def node(name, free_gib, gbps, rtt_ms=0.0, mbit=1000.0, token_ms=0.0):
    rate = mbit * 1e6 / 8
    return NodeProfile(name, int(free_gib * (1 << 30)), gbps * 1e9, 2e-6, rtt_ms / 1e3,
                       rate if name != "local" else math.inf, rate if name != "local" else math.inf, token_ms / 1e3)


def layers_of(plan):
    return {a.node: a.layers for a in plan.assignments}


def test_split_maps_to_llama_tensor_split():
    m = model()
    local = node("local", 0.5, 10)
    a, b = node("a:1", 2, 10, 1), node("b:1", 2, 10, 1)
    p = make_plan(m, local, [a, b])
    # llama.cpp: n_gpu_layers slots = the layers on the workers + the output slot, split in device order
    assert p.n_gpu_layers == m.n_layer - p.local_layers + 1
    assert sum(p.tensor_split) == p.n_gpu_layers
    assert p.tensor_split[-1] == layers_of(p)[p.order[-1]] + 1
    assert sum(layers_of(p).values()) == m.n_layer
    assert [a.output for a in p.assignments].count(True) == 1


def test_memory_caps_are_respected_and_a_too_big_model_is_refused():
    m = model()
    local = node("local", 1.0, 10)
    a, b = node("a:1", 1.2, 10, 1), node("b:1", 3, 10, 1)
    p = make_plan(m, local, [a, b])
    for asg in p.assignments:
        free = {"local": local, "a:1": a, "b:1": b}[asg.node].free
        assert asg.memory <= free * 0.9 + 1
    with pytest.raises(UserError, match="does not fit"):
        make_plan(m, local, [node("a:1", 0.5, 10, 1)])


def test_faster_node_gets_more_layers_and_beats_even_split():
    m = model()
    local = node("local", 0.2, 5)
    fast, slow = node("fast:1", 8, 20, 1), node("slow:1", 8, 5, 1)
    p = make_plan(m, local, [slow, fast])
    e = even_plan(m, local, [slow, fast])
    assert layers_of(p)["fast:1"] > layers_of(p).get("slow:1", 0)
    assert p.predicted_ms < e.predicted_ms


def test_output_layer_goes_where_the_logits_are_cheap():
    # the logits (600 KB/token here) cross the link of the node holding the output layer: prefer the fast link
    m = model(n_layer=8, layer_mib=50)
    local = node("local", 0.2, 10)
    wifi, wired = node("wifi:1", 4, 10, 7, 50), node("wired:1", 4, 10, 1, 1000)
    p = make_plan(m, local, [wired, wifi])
    assert p.order[-1] == "wired:1"


def test_a_slow_link_worker_is_left_out_when_others_suffice():
    m = model(n_layer=8, layer_mib=50)
    local = node("local", 0.2, 10)
    near, far = node("near:1", 4, 10, 0.1), node("far:1", 4, 10, 40)
    p = make_plan(m, local, [far, near])
    assert p.order == ("near:1",)


def test_prediction_adds_compute_rtt_fixed_cost_and_logits():
    m = model(n_layer=2, layer_mib=10, out_mib=10, n_vocab=1000, n_embd=16)
    local = node("local", 1, 10)
    w = node("w:1", 1, 10, 5, 80, token_ms=2)
    t, parts = predict_split(m, local, [w], [2], 0)
    layer = (10 * MIB // 4) / 10e9 + 40 * 2e-6
    out = 10 * MIB / 10e9 + 4 * 2e-6
    # one RTT, the worker's fixed per-token cost (measured by a short decode through it), the hidden state each
    # way and the logits over the link
    net = 5e-3 + 2e-3 + 2 * 64 / 10e6 + 4000 / 10e6
    assert t == pytest.approx(2 * layer + out + net)
    assert parts[1].output and parts[1].layers == 2
    assert parts[1].network_ms == pytest.approx(net * 1e3)


def test_each_remote_worker_on_the_token_path_adds_its_fixed_cost():
    m = model(n_layer=8, layer_mib=50)
    local = node("local", 0.2, 10)
    a, b = node("a:1", 4, 10, 0.1, token_ms=3), node("b:1", 4, 10, 0.1, token_ms=3)
    one, _ = predict_split(m, local, [a], [8], 0)
    two, _ = predict_split(m, local, [a, b], [4, 4], 0)
    no_fixed = [node("a:1", 4, 10, 0.1), node("b:1", 4, 10, 0.1)]
    two0, _ = predict_split(m, local, no_fixed, [4, 4], 0)
    assert two - two0 == pytest.approx(6e-3)
    assert two - one == pytest.approx(3e-3 + 0.1e-3 + 2 * 4 * 2048 / 125e6)
    # a worker that costs more per token than its layers save is left out when the others hold the model
    costly = node("costly:1", 4, 10, 0.1, token_ms=50)
    assert make_plan(m, local, [costly, a]).order == ("a:1",)


def test_never_predicted_slower_than_the_even_split():
    import random

    rng = random.Random(0)
    for _ in range(200):
        m = model(n_layer=rng.randint(2, 40), layer_mib=rng.randint(10, 200))
        local = node("local", rng.uniform(0.5, 8), rng.uniform(2, 40))
        ws = [node(f"w{i}:1", 64, rng.uniform(2, 40), rng.uniform(0.05, 30), rng.uniform(20, 1000))
              for i in range(rng.randint(1, 4))]
        assert make_plan(m, local, ws).predicted_ms <= even_plan(m, local, ws).predicted_ms + 1e-9
