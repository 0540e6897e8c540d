"""With no steering set, the patched build computes the very same graph as stock llama.cpp (node for node); a batch
whose tokens all share one steering computes the graph of that steering set context-wide, even when other
sequences carry their own (issue #11); only a batch mixing steerings gathers per-token rows.

A child process creates a context (2 sequences, unified KV cache) with llama.cpp's eval callback, which is asked about
every graph node, and lists the nodes' names and ops during one decode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, sys
import llama_cpp
from llama_cpp import llama_cpp as C
gguf, steer = sys.argv[1], sys.argv[2]
lib = C._lib
lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
lib.ggml_op_desc.argtypes, lib.ggml_op_desc.restype = [ctypes.c_void_p], ctypes.c_char_p
nodes = []
@C.ggml_backend_sched_eval_callback
def cb(t, ask, ud):
    if ask:
        nodes.append(lib.ggml_get_name(t).decode() + "|" + lib.ggml_op_desc(t).decode())
    return False
C.llama_backend_init()
mp = C.llama_model_default_params()
model = C.llama_model_load_from_file(gguf.encode(), mp)
cp = C.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 128, 64, 64, 1, 1
cp.n_seq_max, cp.kv_unified = 2, True
cp.cb_eval = cb
ctx = C.llama_init_from_model(model, cp)
seqs = [0] * 8
if steer != "none":
    from edge_mote.runtime import bindings as B
    lib = B.lib()  # declares the patch's functions
    L, E = lib.llama_model_n_layer_all(model), lib.llama_model_n_expert(model)
    state = (ctypes.c_int8 * (L * E))()
    state[E + 1] = 1   # layer 1, expert 1 OFF
    if steer == "off":                      # context-wide
        assert lib.llama_set_expert_steering(ctx, state, None, 0.01, L, E) == 0
    else:                                   # sequence 1 only
        assert lib.llama_set_expert_steering_seq(ctx, 1, state, None, 0.01, L, E) == 0
        seqs = {"seq-uniform": [1] * 8, "seq-unsteered": [0] * 8, "seq-mixed": [0, 1] * 4}[steer]
toks = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]
batch = C.llama_batch_init(8, 0, 1)
pos = {0: 0, 1: 0}
for i, (t, s) in enumerate(zip(toks, seqs)):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos[s], 1, i == 7
    batch.seq_id[i][0] = s
    pos[s] += 1
batch.n_tokens = 8
nodes.clear()
assert C.llama_decode(ctx, batch) == 0
print(json.dumps({"patched": hasattr(lib, "llama_set_expert_steering"), "nodes": nodes}))
"""


def graph(gguf, env_lib=None, steer="none"):
    env = dict(os.environ)
    if env_lib:
        env["LLAMA_CPP_LIB_PATH"] = str(env_lib)
    res = subprocess.run([sys.executable, "-c", CHILD, str(gguf), steer], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseekv3", "gptoss"])
def test_unsteered_graph_is_the_stock_graph(arch, tiny_model, stock_lib_dir):
    stock_dir = stock_lib_dir
    gguf = tiny_model(arch)[1]
    stock, plain, steered = graph(gguf, stock_dir), graph(gguf), graph(gguf, steer="off")
    assert not stock["patched"] and plain["patched"]
    assert len(stock["nodes"]) > 50
    assert plain["nodes"] == stock["nodes"]
    extra = [n for n in steered["nodes"] if "steered" in n or "moe_steer" in n]
    assert extra and len(steered["nodes"]) > len(plain["nodes"])


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseekv3", "gptoss"])
def test_uniform_batches_keep_the_context_wide_graph(arch, tiny_model, stock_lib_dir):
    gguf = tiny_model(arch)[1]
    stock, context_wide = graph(gguf, stock_lib_dir), graph(gguf, steer="off")
    # sequence 1 steered, the batch only holds sequence 1: exactly the graph of that steering set context-wide
    assert graph(gguf, steer="seq-uniform")["nodes"] == context_wide["nodes"]
    # sequence 1 steered, the batch only holds the unsteered sequence 0: exactly the stock graph
    assert graph(gguf, steer="seq-unsteered")["nodes"] == stock["nodes"]
    # both sequences in one batch: per-token rows are gathered by a slot index
    mixed = graph(gguf, steer="seq-mixed")["nodes"]
    get_rows = lambda ns: sum(n.endswith("|GET_ROWS") for n in ns)
    assert get_rows(mixed) > get_rows(context_wide["nodes"])
    # the steering rows are in the graph (a hook's own name such as "ffn_moe_logits_steered" can be overwritten by
    # llama.cpp's next name for the same tensor: gpt-oss's softmax-weight gating names the steered logits "ffn_moe_probs")
    assert any(n.startswith("moe_steer") for n in mixed)
