"""``convert``: transformers folder -> GGUF with llama.cpp's converter, plus profiles; a Hub repo from a local
Hugging Face cache (HF_HUB_OFFLINE, a pinned revision; never the network); ``info`` / ``info --tensors`` show it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import edge_mote
from edge_mote import Steering

PROMPT = "The quick brown fox jumps over the lazy dog. In 1887, the committee met in Paris to"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(exe, *args, env=None):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def transformers_logits(hf, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_convert_folder_with_profile_matches_transformers(tiny_model, native, edge_mote_exe, tmp_path):
    hf = tiny_model("qwen3moe")[0]
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"name": "quiet", "steering": "off=1:2,2:3", "description": "from JSON"}))
    out = tmp_path / "model.gguf"
    res = run_cli(edge_mote_exe, "convert", hf, "-o", out, "--outtype", "f32", "--profile-from", prof,
                  "--default-profile", "quiet", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["profiles"] == ["quiet"]
    info = json.loads(run_cli(edge_mote_exe, "info", out, "--json").stdout)
    assert info["profiles"] == ["quiet"] and info["default_profile"] == "quiet"
    text = run_cli(edge_mote_exe, "info", out, "--tensors").stdout
    assert "profile      quiet  (default): off=1:2,2:3" in text and "router       F32" in text
    with edge_mote.load(out, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        assert m.steering == Steering(off=[(1, 2), (2, 3)])
        tokens = m.tokenize(PROMPT, add_bos=False)
        steered = m.logits(tokens)
        m.use_profile("none")
        plain = m.logits(tokens)
    ref = transformers_logits(hf, tokens)
    assert np.abs(plain - ref).max() < 1e-3
    assert np.abs(steered - plain).max() > 1e-2


def test_convert_from_local_hub_cache_offline(tiny_model, native, edge_mote_exe, tmp_path):
    hf = tiny_model("qwen3moe")[0]
    cache = tmp_path / "hub"
    snap = cache / "models--edge-mote--tiny-qwen3moe" / "snapshots" / COMMIT
    shutil.copytree(hf, snap)
    (cache / "models--edge-mote--tiny-qwen3moe" / "refs").mkdir()
    (cache / "models--edge-mote--tiny-qwen3moe" / "refs" / "main").write_text(COMMIT)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.gguf"
    res = run_cli(edge_mote_exe, "convert", "edge-mote/tiny-qwen3moe", "-o", out, "--outtype", "f16", "--json",
                  env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["folder"].endswith(COMMIT) and out.is_file()
    res = run_cli(edge_mote_exe, "convert", "edge-mote/tiny-qwen3moe", "-o", tmp_path / "pinned.gguf",
                  "--revision", COMMIT, "--outtype", "f16", env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pinned.gguf").read_bytes() == out.read_bytes()
    for args in (["edge-mote/not-cached"], ["edge-mote/tiny-qwen3moe", "--revision", "f" * 40]):
        res = run_cli(edge_mote_exe, "convert", *args, "-o", tmp_path / "x.gguf", env=env)
        assert res.returncode == 2 and res.stderr.startswith("error: cannot get "), res.stderr
        assert "offline" in res.stderr.splitlines()[0] and not (tmp_path / "x.gguf").exists()


def test_convert_refusals(tiny_model, native, edge_mote_exe, tmp_path):
    hf = tiny_model("qwen3moe")[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "too-far", "steering": "off=9:0"}))
    out = tmp_path / "x.gguf"
    res = run_cli(edge_mote_exe, "convert", hf, "-o", out, "--outtype", "f32", "--profile-from", bad)
    assert res.returncode == 2 and "profile 'too-far' does not fit" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]
    res = run_cli(edge_mote_exe, "convert", tmp_path / "missing", "-o", out)
    assert res.returncode == 2 and "not found" in res.stderr
