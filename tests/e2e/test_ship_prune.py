"""``prune`` against its oracle: a pruned file computes what the unpruned file computes with the same experts OFF.

On the tiny models of the six architectures, for F32, Q8_0 and Q4_K expert tensors (a wider variant of each tiny
model, hidden and expert widths 256, so that K-quants are not replaced by llama.cpp's fallbacks; the test asserts
the types the expert tensors actually got). The experts removed are the most used ones, so that the logits move
clearly (a no-op prune cannot pass). Plus the CLI: --keep-ratio with --calib and --protect-profile, refusals.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import edge_mote
from edge_mote import Steering
from edge_mote.gguf_meta.profiles import Profile, read_profiles, write_profiles
from edge_mote.ship.prune import moe_shape, prune_model
from edge_mote.ship.quantize import quantize_model
from edge_mote.tiny import TINY_ARCHS

PROMPT = "The quick brown fox jumps over the lazy dog. In 1887, the committee met in Paris to"
ATOL = 1e-3          # measured agreement is ~1e-5 (F32) and exact-kernel equal for quantized files
MIN_EFFECT = 1e-2
WIDE = {"hidden_size": 256}
WIDE_FF = {"qwen3moe": "moe_intermediate_size", "qwen2moe": "moe_intermediate_size", "deepseekv3": "moe_intermediate_size",
           "olmoe": "intermediate_size", "mixtral": "intermediate_size", "gptoss": "intermediate_size"}


@pytest.fixture(scope="session")
def wide_model(models_dir, vendor_dir):
    """A tiny model of ``arch`` with hidden and expert widths 256 (K-quant blocks fit), F32, cached."""
    import shutil

    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.tiny import make_tiny_hf_model

    def make(arch):
        d = models_dir / f"wide-{arch}"
        hf, gguf = d / "hf", d / "model-f32.gguf"
        if not gguf.exists():
            if hf.exists():
                shutil.rmtree(hf)
            make_tiny_hf_model(arch, hf, vendor_dir / "models" / "ggml-vocab-gpt-2.gguf", seed=0,
                               **WIDE, **{WIDE_FF[arch]: 256})
            convert_hf_to_gguf(hf, gguf, vendor_dir, outtype="f32")
        return gguf

    return make


def expert_types(path):
    from gguf import GGUFReader

    return {t.name.split(".", 2)[2]: t.tensor_type.name for t in GGUFReader(path).tensors if "_exps.weight" in t.name}


def model_file(kind, arch, tiny_model, wide_model, tmp_path):
    if kind == "F32":
        return tiny_model(arch)[1]
    if kind == "Q8_0":
        q = tmp_path / "q8.gguf"
        quantize_model(tiny_model(arch)[1], q, "Q8_0")
        assert set(expert_types(q).values()) == {"Q8_0"}
        return q
    q = tmp_path / "q4k.gguf"
    quantize_model(wide_model(arch), q, "Q4_K_M")
    types = expert_types(q)
    assert types["ffn_gate_exps.weight"] == "Q4_K" and types["ffn_up_exps.weight"] == "Q4_K", types
    return q


def most_used(m, tokens):
    """Experts to remove: the most used of each MoE layer (one per group for DeepSeek's groups), 2 per layer."""
    shape = moe_shape(__import__("gguf").GGUFReader(m.info.path))
    trace = m.routing(tokens)
    drop = []
    for l in m.info.moe_layers:
        counts = np.bincount(trace.ids[l].ravel(), minlength=m.info.n_expert)
        if shape.n_groups > 1:
            per = shape.per_group
            drop += [(l, g * per + int(np.argmax(counts[g * per:(g + 1) * per]))) for g in range(shape.n_groups)]
        else:
            drop += [(l, int(e)) for e in np.argsort(-counts, kind="stable")[:2]]
    return drop


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pruned_file_equals_experts_off(arch, kind, tiny_model, wide_model, native, tmp_path):
    src = model_file(kind, arch, tiny_model, wide_model, tmp_path)
    with edge_mote.load(src, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        tokens = m.tokenize(PROMPT, add_bos=False)
        drop = most_used(m, tokens)
        plain = m.logits(tokens)
        m.set_steering(Steering(off=drop))
        off = m.logits(tokens)
        n_expert = m.info.n_expert
    out = tmp_path / "pruned.gguf"
    r = prune_model(src, out, drop=drop)
    assert r.n_expert_after == n_expert - len(drop) // len(r.dropped)
    with edge_mote.load(out, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        assert m.info.n_expert == r.n_expert_after
        pruned = m.logits(tokens)
    assert np.abs(off - plain).max() > MIN_EFFECT, "removing the most used experts must change the logits"
    assert np.abs(pruned - off).max() < ATOL
    if kind != "F32":
        assert expert_types(out) == expert_types(src)
    assert out.stat().st_size < src.stat().st_size


@pytest.fixture(scope="module")
def with_profile(tiny_model, native, tmp_path_factory):
    src = tiny_model("qwen3moe")[1]
    d = tmp_path_factory.mktemp("prune-cli")
    prof = Steering(off=[(1, 7)], bias={(2, 6): -1.5})
    path = write_profiles(src, d / "with-profile.gguf", {"keep-me": Profile("keep-me", prof, "test")},
                          default="keep-me")
    calib = d / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [
        "The quick brown fox jumps over the lazy dog.", "In 1887, the committee met in Paris to discuss",
        "Water boils at a hundred degrees", "She opened the door and saw", "Numbers: one two three four five"]))
    return path, calib, prof


def run_cli(exe, *args):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_cli_keep_ratio_protects_and_renumbers_profile(with_profile, edge_mote_exe, tmp_path):
    path, calib, prof = with_profile
    out = tmp_path / "half.gguf"
    res = run_cli(edge_mote_exe, "prune", path, out, "--keep-ratio", "0.5", "--calib", calib,
                  "--protect-profile", "keep-me", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["n_expert_after"] == 4 and doc["saliency"] == "reap"
    assert 7 not in doc["dropped"]["1"] and 6 not in doc["dropped"]["2"]
    profiles, default = read_profiles(out)
    kept1 = [e for e in range(8) if e not in doc["dropped"]["1"]]
    kept2 = [e for e in range(8) if e not in doc["dropped"]["2"]]
    assert default == "keep-me"
    assert profiles["keep-me"].steering == Steering(off=[(1, kept1.index(7))], bias={(2, kept2.index(6)): -1.5})
    with edge_mote.load(out, n_ctx=128, n_threads=2) as m:  # the default profile applies to the pruned file
        assert m.steering == profiles["keep-me"].steering
    info = json.loads(run_cli(edge_mote_exe, "info", out, "--tensors", "--json").stdout)
    assert info["experts"]["n_expert"] == 4 and info["default_profile"] == "keep-me"


def test_cli_refusals_are_one_line_and_leave_no_file(with_profile, edge_mote_exe, tmp_path):
    path, calib, _ = with_profile
    out = tmp_path / "x.gguf"
    for args, msg in [(["--drop", "0:1,1:7,2:0"], "profile 'keep-me' steers expert 1:7"),
                      (["--drop", "1:0,1:1,2:0"], "same number of experts"),
                      (["--drop", ",".join(f"{l}:{e}" for l in (0, 1, 2) for e in range(7))], "routed to 2"),
                      (["--keep-ratio", "0.5", "--calib", calib], "profile 'keep-me' steers expert")]:
        res = run_cli(edge_mote_exe, "prune", path, out, *args)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: ") and msg in res.stderr.splitlines()[0], res.stderr
        assert "Traceback" not in res.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_deepseek_uneven_groups_refused(tiny_model, edge_mote_exe, tmp_path):
    src = tiny_model("deepseekv3")[1]
    out = tmp_path / "x.gguf"
    res = run_cli(edge_mote_exe, "prune", src, out, "--drop", "1:0,1:1,1:2,1:3,2:0,2:1,2:2,2:3")
    assert res.returncode == 2 and "same number must go from every group" in res.stderr, res.stderr
    assert not out.exists()
