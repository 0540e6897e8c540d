"""``info --tensors`` accounting, the ``moe`` quantization recipe and the routing-aware imatrix shrinkage, without
native code (synthetic GGUFs written with gguf-py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mote.errors import UserError
from edge_mote.ship.inspect import family_of, inspect_tensors
from edge_mote.ship.quantize import moe_recipe, shrink_rare_experts, step_up

from .test_ship_prune import write_synthetic


def test_inspect_accounts_every_byte(tmp_path):
    path = write_synthetic(tmp_path / "m.gguf")
    r = inspect_tensors(path)
    d = r.to_dict()
    total = d["total"]["bytes"]
    assert sum(v["bytes"] for v in d["by_type"].values()) == total
    assert sum(v["bytes"] for v in d["by_family"].values()) == total
    assert r.n_expert == 8 and r.moe_layers == (1, 2)
    assert set(r.expert_tensors) == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert r.expert_tensors["ffn_gate_exps"]["types"] == {"Q4_K": 2}
    # Q4_K: 144 bytes per 256 weights; 256 x 256 weights per expert
    assert r.expert_tensors["ffn_gate_exps"]["bytes_per_expert"] == 256 * 144
    assert r.router_types == {"F32": [1, 2]}
    assert abs(d["by_type"]["Q8_0"]["bits_per_weight"] - 8.5) < 1e-9
    assert family_of("blk.12.ffn_down_exps.weight") == (12, "ffn_down_exps")
    assert family_of("output_norm.weight") == (None, "output_norm")


def test_moe_recipe_types():
    names = [f"blk.{l}.{t}.weight" for l in range(8) for t in
             ("attn_q", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp", "ffn_up_shexp")]
    names += ["blk.0.ffn_down.weight", "token_embd.weight", "output.weight"]
    moe_layers = range(1, 8)  # layer 0 dense
    plan = moe_recipe(names, moe_layers, "Q3_K_M")
    assert plan["blk.1.ffn_down_exps.weight"] == "q6_k"      # first MoE layer
    assert plan["blk.2.ffn_down_exps.weight"] == "q3_k"
    assert plan["blk.4.ffn_down_exps.weight"] == "q4_k"      # every 4th MoE layer: one step up
    assert plan["blk.5.ffn_gate_exps.weight"] == "q3_k"
    assert plan["blk.5.attn_q.weight"] == "q6_k" and plan["blk.5.ffn_up_shexp.weight"] == "q6_k"
    assert plan["blk.0.ffn_down.weight"] == "q6_k"           # dense layer
    for untouched in ("blk.3.ffn_gate_inp.weight", "token_embd.weight", "output.weight"):
        assert untouched not in plan                          # router unquantized; llama.cpp's rule for the rest
    assert moe_recipe(names, moe_layers, "Q6_K")["blk.3.attn_q.weight"] == "q8_0"
    assert step_up("q3_k", 1) == "q4_k" and step_up("q6_k", 5) == "q8_0"
    with pytest.raises(UserError):
        moe_recipe(names, moe_layers, "F16")
    with pytest.raises(UserError, match="unknown quantization type"):
        moe_recipe(names, moe_layers, "Q9_Z")


def test_imatrix_shrinkage_of_rare_experts(tmp_path):
    import gguf

    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(path, "")
    w.add_string("general.type", "imatrix")
    sums = np.array([[100.0, 100.0], [1.0, 9.0], [0.0, 0.0]], dtype=np.float32)  # 3 experts x 2 columns
    counts = np.array([[100.0], [1.0], [0.0]], dtype=np.float32)
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", counts)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([[4.0, 4.0]], dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[2.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = shrink_rare_experts(path, prior_tokens=10)
    assert (info.expert_entries, info.rare_experts, info.unseen_experts) == (3, 2, 1)
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(path).tensors}
    mean = t["blk.0.ffn_down_exps.weight.in_sum2"] / t["blk.0.ffn_down_exps.weight.counts"]
    pooled = np.array([101.0, 109.0]) / 101.0
    assert np.allclose(mean[2], pooled)                                      # unseen: the pooled statistics
    assert np.allclose(mean[1], (np.array([1.0, 9.0]) + 10 * pooled) / 11)  # rare: pulled towards them
    assert np.allclose(mean[0], (np.array([100.0, 100.0]) + 10 * pooled) / 110)
    assert np.array_equal(t["blk.0.attn_q.weight.in_sum2"], [[4.0, 4.0]])     # dense entries untouched
