"""Saliency for ``prune --keep-ratio``: the expert-output probe against transformers (REAP needs each selected
expert's output norm, which llama.cpp's routing capture does not give), and the frequency saliency against the
routing capture."""

from __future__ import annotations

import numpy as np
import torch

import edge_mote
from edge_mote.runtime.probe import ExpertOutputProbe
from edge_mote.ship.saliency import routing_stats

PROMPT = "The quick brown fox jumps over the lazy dog. In 1887, the committee met in Paris to"


def reference_expert_norms(hf, tokens):
    """Per MoE layer: (ids, weights, ||expert output||) of every (token, slot), from the transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    seen = {}

    def hook(layer):
        def pre(module, args):
            x, idx, w = args[0], args[1], args[2]
            gate, up = torch.einsum("th,tkfh->tkf", x, module.gate_up_proj[idx]).chunk(2, dim=-1)
            out = torch.einsum("tkf,tkhf->tkh", module.act_fn(gate) * up, module.down_proj[idx])
            seen[layer] = (idx.numpy(), w.numpy(), out.norm(dim=-1).numpy())
        return pre

    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_pre_hook(hook(i))
    with torch.no_grad():
        model(torch.tensor([tokens]))
    return seen


def test_probe_matches_transformers_and_capture(tiny_model, native):
    hf, gguf = tiny_model("qwen3moe")
    with edge_mote.load(gguf, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        tokens = m.tokenize(PROMPT, add_bos=False)
        trace = m.routing(tokens)
        stats = routing_stats(m, [tokens])
        n_expert = m.info.n_expert
    ref = reference_expert_norms(hf, tokens)
    with ExpertOutputProbe(gguf, n_ctx=256, n_threads=2, type_k=0, type_v=0) as probe:
        got = probe.outputs(tokens)
    assert sorted(got) == sorted(ref) == sorted(trace.ids)
    for l, (ids, w, norms) in got.items():
        r_ids, r_w, r_norms = ref[l]
        order, r_order = np.argsort(ids, 1), np.argsort(r_ids, 1)
        assert np.array_equal(np.take_along_axis(ids, order, 1), np.take_along_axis(r_ids, r_order, 1))
        assert np.allclose(np.take_along_axis(w, order, 1), np.take_along_axis(r_w, r_order, 1), atol=1e-4)
        rn = np.take_along_axis(r_norms, r_order, 1)
        assert np.allclose(np.take_along_axis(norms, order, 1), rn, rtol=1e-3, atol=1e-4)
        assert rn.min() > 1e-3  # the outputs are not trivially zero
        # frequency saliency: counts and gate sums are the capture's
        assert np.array_equal(stats.count[l], np.bincount(trace.ids[l].ravel(), minlength=n_expert))
        gate = np.zeros(n_expert)
        np.add.at(gate, trace.ids[l].ravel(), trace.weights[l].ravel())
        assert np.allclose(stats.gate_sum[l], gate, atol=1e-5)
