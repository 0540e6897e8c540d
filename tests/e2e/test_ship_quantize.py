"""``quantize``: llama.cpp's quantizer through edge-mote. All metadata (profiles included) byte-equal before and
after, stock llama.cpp still loads the output, the moe recipe's types land where it says, --calib computes a
routing-aware importance matrix, bad input is a one-line error that leaves no file."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import edge_mote
from edge_mote import Steering
from edge_mote.gguf_meta.profiles import Profile, read_profiles, write_profiles
from edge_mote.ship.gguf_copy import field_bytes, open_gguf

from .test_ship_prune import wide_model  # noqa: F401  (fixture)
from .test_stock_compat import run_stock, stock_dir  # noqa: F401  (fixture)

PROMPT = "The quick brown fox jumps over the lazy dog."
QUANTIZER_KEYS = ("general.file_type", "general.quantization_version")


@pytest.fixture(scope="module")
def src(tiny_model, native, tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    prof = {"no-x": Profile("no-x", Steering(off=[(1, 3), (2, 5)]), "two experts off"),
            "biased": Profile("biased", Steering(bias={(0, 1): -2.0}), "")}
    path = write_profiles(tiny_model("qwen3moe")[1], d / "with-profiles.gguf", prof, default="no-x")
    calib = d / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"Item {i}: the quick brown fox number {i} jumps over the "
                                                   f"lazy dog while the committee met in Paris in {1800 + i}."}) + "\n"
                             for i in range(40)))
    return path, calib


def assert_metadata_byte_equal(a, b):
    ra, rb = open_gguf(a), open_gguf(b)
    keys = [k for k in ra.fields if not k.startswith("GGUF.") and k not in QUANTIZER_KEYS]
    assert any(k.startswith("edge_mote.profile.") for k in keys)
    for k in keys:
        assert field_bytes(rb, k) == field_bytes(ra, k), k
    extra = [k for k in rb.fields if k not in ra.fields and not k.startswith(("GGUF.", "quantize.imatrix."))
             and k not in QUANTIZER_KEYS]
    assert extra == []


def run_cli(exe, *args):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("qtype,recipe", [("Q8_0", "uniform"), ("Q4_K_M", "moe")])
def test_quantize_keeps_metadata_and_stock_loads(src, qtype, recipe, edge_mote_exe, stock_dir, tmp_path):  # noqa: F811
    path, _ = src
    out = tmp_path / f"{qtype}.gguf"
    res = run_cli(edge_mote_exe, "quantize", path, out, "--type", qtype, "--recipe", recipe, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["bytes_after"] < doc["bytes_before"] and (doc["overrides"] > 0) == (recipe == "moe")
    assert_metadata_byte_equal(path, out)
    profiles, default = read_profiles(out)
    assert default == "no-x" and profiles == read_profiles(path)[0]
    assert (out.stat().st_mode & 0o777) == (path.stat().st_mode & 0o777)
    with edge_mote.load(out, n_ctx=128, n_threads=2, type_k=0, type_v=0) as m:
        tokens = m.tokenize(PROMPT, add_bos=False)
        assert m.steering == profiles["no-x"].steering   # the patched build applies the default profile
        m.use_profile("none")
        plain = m.logits(tokens)
    stock = run_stock(stock_dir, out, tokens, tmp_path)  # stock llama.cpp: loads it, ignores the profiles
    assert np.array_equal(stock, plain)


def test_moe_recipe_types_on_wide_model(wide_model, tmp_path):
    """On widths K-quants fit (256), the recipe's per-tensor types are the ones in the file."""
    from edge_mote.ship.quantize import quantize_model

    out = tmp_path / "q3-moe.gguf"
    r = quantize_model(wide_model("qwen3moe"), out, "Q3_K_M", recipe="moe")
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q6_K"      # first MoE layer
    for l in (1, 2):
        assert types[f"blk.{l}.ffn_down_exps.weight"] == "Q3_K"
    for l in (0, 1, 2):
        assert types[f"blk.{l}.ffn_gate_exps.weight"] == types[f"blk.{l}.ffn_up_exps.weight"] == "Q3_K"
        assert types[f"blk.{l}.attn_q.weight"] == "Q6_K"       # attention higher
        assert types[f"blk.{l}.ffn_gate_inp.weight"] == "F32"  # the router is never quantized
    assert r.types["Q3_K"] >= 6 and r.overrides > 0


def test_calib_imatrix_and_errors(src, edge_mote_exe, tmp_path):
    path, calib = src
    out = tmp_path / "q4.gguf"
    res = run_cli(edge_mote_exe, "quantize", path, out, "--type", "Q4_K_M", "--recipe", "moe", "--calib", calib,
                  "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    im = doc["imatrix"]
    assert im["computed"] and im["expert_entries"] > 0 and 0 <= im["unseen_experts"] <= im["rare_experts"]
    assert_metadata_byte_equal(path, out)
    assert "quantize.imatrix.file" in open_gguf(out).fields
    assert not [p for p in tmp_path.iterdir() if p.name != "q4.gguf"]  # no temporary files left

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[:100_000])
    for args, msg in [([bad, tmp_path / "o.gguf", "--type", "Q8_0"], "truncated"),
                      ([path, tmp_path / "o.gguf", "--type", "Q9_X"], "unknown quantization type"),
                      ([path, path, "--type", "Q8_0"], "is the input file"),
                      ([out, tmp_path / "o.gguf", "--type", "Q8_0"], "already quantized")]:
        r = run_cli(edge_mote_exe, "quantize", *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "o.gguf").exists()
