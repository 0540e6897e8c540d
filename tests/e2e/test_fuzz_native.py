"""A deterministic sample of the native fuzzing (bench/fuzz_parsers.py --native runs more): a tiny model carrying
damaged edge-mote metadata, loaded by the patched llama.cpp through edge_mote.load in a child process, never crashes
or aborts; edge-mote loads it or says why in one line; what llama.cpp applies is what edge-mote read."""

from __future__ import annotations

from tests.fuzz.native import run_native


def test_damaged_edge_mote_metadata_never_crashes_llama_cpp(tiny_model, native, tmp_path):
    rep = run_native(tiny_model("qwen3moe")[1], 12, seed=11, workdir=tmp_path)
    assert rep.crashes == [], rep.crashes
    assert rep.failures == [], rep.failures
    assert rep.n == 12 == rep.loaded + rep.rejected and rep.rejected > 0
