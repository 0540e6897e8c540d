"""The patch's C API returns error codes for bad input (never aborts) and leaves the steering unchanged on error."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edge_mote
from edge_mote.runtime import bindings as B


@pytest.fixture(scope="module")
def m(tiny_model, native):
    with edge_mote.load(tiny_model("deepseekv3")[1], n_ctx=128, n_threads=2) as model:
        yield model


def _set(m, state, bias=None, margin=0.01, shape=None):
    n_layer, n_expert = shape or (m.info.n_layer, m.info.n_expert)
    state = np.ascontiguousarray(state, dtype=np.int8)
    bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    return m._lib.llama_set_expert_steering(m._ctx, B.as_ptr(state, ctypes.c_int8), B.as_ptr(bias, ctypes.c_float),
                                            margin, n_layer, n_expert)


def test_error_codes(m):
    L, E = m.info.n_layer, m.info.n_expert
    moe = m.info.moe_layers[0]
    k = m.info.n_expert_used[moe]
    dense = [l for l in range(L) if l not in m.info.moe_layers][0]  # DeepSeek-V3's first layer is dense
    ok = np.zeros((L, E), np.int8)
    assert _set(m, ok) == 0
    before = m._read_native_steering()

    too_few = ok.copy(); too_few[moe, : E - k + 1] = B.LLAMA_EXPERT_STATE_OFF
    too_many_on = ok.copy(); too_many_on[moe, : k + 1] = B.LLAMA_EXPERT_STATE_ON
    bad_state = ok.copy(); bad_state[moe, 0] = 7
    on_dense = ok.copy(); on_dense[dense, 0] = B.LLAMA_EXPERT_STATE_OFF
    nan_bias = np.zeros((L, E), np.float32); nan_bias[moe, 0] = np.nan
    assert _set(m, too_few) == -5
    assert _set(m, too_many_on) == -6
    assert _set(m, bad_state) == -3
    assert _set(m, on_dense) == -7
    assert _set(m, ok, bias=nan_bias) == -4
    assert _set(m, ok, margin=float("inf")) == -4
    assert _set(m, ok, shape=(L + 1, E)) == -1
    assert _set(m, ok, shape=(L, E - 1)) == -1
    assert m._lib.llama_set_expert_steering(None, None, None, 0.01, L, E) == -1
    # a rejected call changes nothing
    assert m._read_native_steering() == before

    ids, w, n = ctypes.POINTER(ctypes.c_int32)(), ctypes.POINTER(ctypes.c_float)(), ctypes.c_int32()
    assert m._lib.llama_get_expert_capture(m._ctx, L, ctypes.byref(ids), ctypes.byref(w), ctypes.byref(n)) == -9
    assert m._lib.llama_get_expert_capture(m._ctx, -1, ctypes.byref(ids), ctypes.byref(w), ctypes.byref(n)) == -9
    assert m._lib.llama_model_n_expert_used(m._mp, L) == -9
    assert m._lib.llama_model_layer_is_moe(m._mp, dense) == 0
    assert m._lib.llama_model_layer_is_moe(m._mp, moe) == 1


def test_get_returns_what_was_set_and_clear_resets(m):
    s = edge_mote.Steering.parse(f"off={m.info.moe_layers[0]}:1;bias={m.info.moe_layers[-1]}:2=-0.75;margin=0.25")
    m.set_steering(s)
    assert m._read_native_steering() == s
    m.set_steering(None)
    assert not m._read_native_steering()


def test_dense_model_reports_not_moe(dense_gguf):
    with edge_mote.load(dense_gguf, n_ctx=64) as d:
        L = d.info.n_layer
        assert d.info.n_expert == 0 and not d.info.is_moe
        assert d._lib.llama_set_expert_steering(d._ctx, None, None, 0.01, L, 0) == -2
        assert d._lib.llama_set_expert_capture(d._ctx, True) == -2
        with pytest.raises(edge_mote.UserError, match="not a Mixture-of-Experts model"):
            d.routing(d.tokenize("hi"))


def test_rejected_default_profile_is_not_reported_as_applied(tiny_model, native, tmp_path):
    """A GGUF default profile that the C side refuses (here: every expert of a layer OFF) leaves the model unsteered,
    and the Python side says so instead of reporting the profile as applied."""
    from edge_mote.gguf_meta.profiles import Profile, read_profiles, write_profiles

    src = tiny_model("qwen3moe")[1]
    with edge_mote.load(src, n_ctx=64) as m:
        layer, E = m.info.moe_layers[0], m.info.n_expert
    bad = edge_mote.Steering(off=[(layer, e) for e in range(E)])
    out = write_profiles(src, tmp_path / "bad-default.gguf", {"all-off": Profile("all-off", bad)}, default="all-off")
    assert read_profiles(out)[1] == "all-off"  # stored as the default ...
    with edge_mote.load(out, n_ctx=64) as m:  # ... but not applied
        assert m.info.default_profile is None
        assert not m.steering
        assert m.default_profile_error
        assert "all-off" in m.info.profiles
