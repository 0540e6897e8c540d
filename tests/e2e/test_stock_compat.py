"""Files carrying edge-mote metadata load in stock (unpatched) llama.cpp, and the patch changes nothing unsteered.

The stock libllama is built from the same sdist without the patch when a test first needs it (`native/build.py --stock-only`)
and loaded in a subprocess through llama-cpp-python's LLAMA_CPP_LIB_PATH.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import edge_mote
from edge_mote import Steering
from edge_mote.gguf_meta.profiles import Profile, write_profiles

PROMPT = "The quick brown fox jumps over the lazy dog."

STOCK_SCRIPT = r"""
import sys, numpy as np, llama_cpp
lib = llama_cpp.llama_cpp._lib
print("patched" if hasattr(lib, "llama_set_expert_steering") else "stock")
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
toks = [int(t) for t in sys.argv[3].split(",")]
llm.eval(toks)
np.save(sys.argv[2], np.array(llm.scores[: len(toks)], dtype=np.float32))
"""


@pytest.fixture(scope="module")
def stock_dir(stock_lib_dir):
    return stock_lib_dir  # built on first use (tests/conftest.py)


def run_stock(stock_dir, gguf, tokens, tmp_path):
    out = tmp_path / "stock_logits.npy"
    res = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, str(gguf), str(out), ",".join(map(str, tokens))],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LLAMA_CPP_LIB_PATH": str(stock_dir)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == "stock", "the comparison library is not the unpatched one"
    return np.load(out)


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseekv3"])
def test_stock_llama_cpp_loads_edge_mote_files_and_matches_unsteered(arch, tiny_model, stock_dir, tmp_path):
    gguf = tiny_model(arch)[1]
    with edge_mote.load(gguf, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        tokens = m.tokenize(PROMPT, add_bos=False)
        layer = m.info.moe_layers[0]
        trace = m.routing(tokens)
        top = np.argsort(-np.bincount(trace.ids[layer].ravel(), minlength=m.info.n_expert))[:2]
        profile = Steering(off=[(layer, int(e)) for e in top], bias={(m.info.moe_layers[-1], 0): 0.5})
        plain = m.logits(tokens)
    steered_file = write_profiles(gguf, tmp_path / "with-profile.gguf", {"p": Profile("p", profile)}, default="p")

    # stock llama.cpp: loads the file, ignores the metadata, and computes exactly what the patched build
    # computes with no steering (same graph, same kernels)
    stock = run_stock(stock_dir, steered_file, tokens, tmp_path)
    assert np.array_equal(stock, plain)

    # the patched build applies the default profile at load; --profile none gives the plain model back
    with edge_mote.load(steered_file, n_ctx=256, n_threads=2, type_k=0, type_v=0) as m:
        assert m.steering == profile and m.info.default_profile == "p"
        with_default = m.logits(tokens)
        m.use_profile("none")
        assert np.array_equal(m.logits(tokens), plain)
        m.set_steering(profile)
        assert np.array_equal(m.logits(tokens), with_default)
    assert np.abs(with_default - plain).max() > 1e-2
