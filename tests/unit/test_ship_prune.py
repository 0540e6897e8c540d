"""Pruning without native code: plans and refusals, and bit-exact slicing of quantized tensors in synthetic GGUFs
written with gguf-py (random bytes in Q4_K / Q8_0 / F16 / F32 blocks: slicing must not care what they hold)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mote.errors import UserError
from edge_mote.gguf_meta.profiles import Profile, read_profiles, write_profiles
from edge_mote.ship.prune import MoeShape, moe_shape, plan_prune, prune_model, select_by_saliency
from edge_mote.steering import Steering

N_EXPERT, N_EMBD, N_FF = 8, 256, 256


def write_synthetic(path, arch="qwen3moe", n_expert=N_EXPERT, k=2, groups=0, group_used=0, types=None, seed=0):
    """A 3-layer MoE GGUF (layer 0 dense) with expert tensors of the given types, random contents."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    types = types or {"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q8_0, "ffn_down_exps": Q.F16}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(3)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(k)
    if groups:
        w.add_uint32(f"{arch}.expert_group_count", groups)
        w.add_uint32(f"{arch}.expert_group_used_count", group_used)
    w.add_string("general.name", "synthetic")

    def add(name, qtype, shape):  # shape: numpy order (outermost first), last = row length in elements
        if qtype in (Q.F32, Q.F16):
            dt = np.float32 if qtype == Q.F32 else np.float16
            w.add_tensor(name, rng.standard_normal(shape).astype(dt))
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block * nbytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)

    add("token_embd.weight", Q.F32, (16, N_EMBD))
    add("blk.0.ffn_up.weight", Q.Q8_0, (N_FF, N_EMBD))
    for l in (1, 2):
        add(f"blk.{l}.attn_q.weight", Q.Q8_0, (N_EMBD, N_EMBD))
        add(f"blk.{l}.ffn_gate_inp.weight", Q.F32, (n_expert, N_EMBD))
        add(f"blk.{l}.exp_probs_b.bias", Q.F32, (n_expert,))
        add(f"blk.{l}.ffn_gate_exps.weight", types["ffn_gate_exps"], (n_expert, N_FF, N_EMBD))
        add(f"blk.{l}.ffn_up_exps.weight", types["ffn_up_exps"], (n_expert, N_FF, N_EMBD))
        add(f"blk.{l}.ffn_down_exps.weight", types["ffn_down_exps"], (n_expert, N_EMBD, N_FF))
        add(f"blk.{l}.ffn_up_shexp.weight", Q.F32, (N_FF, N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensors(path):
    from gguf import GGUFReader

    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(path).tensors}


SHAPE = MoeShape("qwen3moe", 3, 8, 2, (1, 2))
DS = MoeShape("deepseek2", 3, 16, 4, (1, 2), n_groups=4, n_group_used=2)


def test_plan_refuses_invalid_requests():
    with pytest.raises(UserError, match="same number of experts"):
        plan_prune(SHAPE, [(1, 0), (1, 1), (2, 0)])
    with pytest.raises(UserError, match="dense layer"):
        plan_prune(SHAPE, [(0, 0)])
    with pytest.raises(UserError, match="out of range"):
        plan_prune(SHAPE, [(1, 8), (2, 0)])
    with pytest.raises(UserError, match="routed to 2"):
        plan_prune(SHAPE, [(l, e) for l in (1, 2) for e in range(7)])
    plan = plan_prune(SHAPE, [(l, e) for l in (1, 2) for e in range(6)])  # exactly k left: allowed
    assert plan.n_expert_after == 2 and plan.keep[1] == (6, 7)


def test_plan_deepseek_groups():
    even = [(l, g * 4) for l in (1, 2) for g in range(4)]
    assert plan_prune(DS, even).n_expert_after == 12
    with pytest.raises(UserError, match="same number must go from every group"):
        plan_prune(DS, [(l, e) for l in (1, 2) for e in (0, 1, 4, 8)])
    with pytest.raises(UserError, match="at least 2 must stay"):
        plan_prune(DS, [(l, g * 4 + i) for l in (1, 2) for g in range(4) for i in range(3)])
    tight = MoeShape("deepseek2", 3, 16, 6, (1, 2), n_groups=4, n_group_used=2)
    with pytest.raises(UserError, match="fewer than the 6"):
        plan_prune(tight, [(l, g * 4 + i) for l in (1, 2) for g in range(4) for i in range(2)])


def test_renumber_and_profile_hits():
    plan = plan_prune(SHAPE, [(1, 0), (2, 5)])
    s = plan.renumber(Steering(off=[(1, 3)], on=[(2, 7)], bias={(2, 4): -1.0}))
    assert s == Steering(off=[(1, 2)], on=[(2, 6)], bias={(2, 4): -1.0})
    with pytest.raises(UserError, match="profile 'p' steers expert 2:5"):
        plan.renumber(Steering(off=[(2, 5)]), "p")


def test_select_by_saliency_lowest_protected_and_grouped():
    scores = {1: np.arange(8.0)[::-1], 2: np.arange(8.0)}
    drop = select_by_saliency(SHAPE, scores, 0.5)
    assert sorted(drop) == [(1, 4), (1, 5), (1, 6), (1, 7), (2, 0), (2, 1), (2, 2), (2, 3)]
    drop = select_by_saliency(SHAPE, scores, 0.5, protected={(2, 0)})
    assert (2, 0) not in drop and (2, 4) in drop
    ds_scores = {l: np.arange(16.0) for l in (1, 2)}
    drop = select_by_saliency(DS, ds_scores, 0.75)
    assert sorted(e for l, e in drop if l == 1) == [0, 4, 8, 12]  # one per group, the lowest of each
    with pytest.raises(UserError, match="nothing to prune"):
        select_by_saliency(SHAPE, scores, 0.99)


def test_prune_slices_quantized_tensors_bit_exact(tmp_path):
    src = write_synthetic(tmp_path / "m.gguf")
    withp = write_profiles(src, tmp_path / "p.gguf", {
        "a": Profile("a", Steering(off=[(1, 5)], bias={(2, 7): 0.5}), "kept"),
    }, default="a")
    out = tmp_path / "pruned.gguf"
    r = prune_model(withp, out, drop=[(1, 0), (1, 2), (2, 1), (2, 3)])
    assert (r.n_expert_before, r.n_expert_after) == (8, 6)
    before, after = tensors(withp), tensors(out)
    assert set(before) == set(after)
    keep = {1: [1, 3, 4, 5, 6, 7], 2: [0, 2, 4, 5, 6, 7]}
    sliced = 0
    for name, (qt, data) in before.items():
        qt2, data2 = after[name]
        assert qt2 == qt
        parts = name.split(".")
        if parts[0] == "blk" and int(parts[1]) in keep and ("_exps" in name or "gate_inp" in name or "probs_b" in name):
            assert np.array_equal(data2, data[keep[int(parts[1])]])
            sliced += 1
        else:
            assert np.array_equal(data2, data)
    assert sliced == 10
    assert {t.name for t in [qt for qt, _ in before.values()]} >= {"Q4_K", "Q8_0", "F16", "F32"}
    from gguf import GGUFReader

    rd = GGUFReader(out)
    assert moe_shape(rd).n_expert == 6 and moe_shape(rd).moe_layers == (1, 2)
    assert rd.fields["general.name"].contents() == "synthetic"
    profiles, default = read_profiles(out)
    assert default == "a" and profiles["a"].steering == Steering(off=[(1, 3)], bias={(2, 5): 0.5})
    assert profiles["a"].description == "kept"
    assert r.expert_bytes_after * 8 == r.expert_bytes_before * 6


def test_refused_cases_leave_no_file(tmp_path):
    src = write_synthetic(tmp_path / "m.gguf")
    withp = write_profiles(src, tmp_path / "p.gguf", {"a": Profile("a", Steering(off=[(1, 5)]))})
    out = tmp_path / "out.gguf"
    cases = [
        ({"drop": [(1, 5), (2, 0)]}, "profile 'a' steers expert 1:5"),
        ({"drop": [(1, 0)]}, "same number"),
        ({"drop": [(1, 0), (2, 0)], "protect": ["nope"]}, "no such profile"),
        ({"drop": [(1, 5), (2, 0)], "protect": ["a"]}, "protected profile 'a'"),
        ({"keep_ratio": 0.5}, "--calib"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(UserError, match=msg):
            prune_model(withp, out, **kwargs)
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "p.gguf"]
    with pytest.raises(UserError, match="input file"):
        prune_model(withp, withp, drop=[(1, 0), (2, 0)])


def test_truncated_input_is_one_line_error(tmp_path):
    src = write_synthetic(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size - 5000])
    with pytest.raises(UserError, match="truncated") as e:
        prune_model(cut, tmp_path / "o.gguf", drop=[(1, 0), (2, 0)])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o.gguf").exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(UserError, match="not a valid GGUF"):
        prune_model(junk, tmp_path / "o.gguf", drop=[(1, 0), (2, 0)])
