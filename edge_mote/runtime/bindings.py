"""Raw ctypes bindings to edge-mote's additions to llama.cpp (native/patches/0001-expert-steering.patch).

Every function is bound through the library handle llama-cpp-python already holds (``llama_cpp.llama_cpp._lib``):
loading libllama again by path would bring in a second, independent copy of ggml. The C declaration is
given above each binding. This is the only module of edge-mote that touches ctypes signatures.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int8, c_int32, c_void_p

from ..errors import EdgeMoteError

LLAMA_EXPERT_STATE_DEFAULT = 0
LLAMA_EXPERT_STATE_OFF = 1
LLAMA_EXPERT_STATE_ON = 2
LLAMA_EXPERT_STATE_DROP = 3

# return codes (llama.h: LLAMA_EXPERT_STEER_ERR_*)
STEER_ERRORS = {
    -1: "array sizes do not match the model",
    -2: "the model has no routed experts (not a Mixture-of-Experts model)",
    -3: "invalid expert state",
    -4: "a bias or the margin is not a finite number",
    -5: "a layer would have fewer selectable experts than it routes each token to",
    -6: "a layer forces more experts ON than it routes each token to",
    -7: "steering set on a layer that has no router (a dense layer)",
    -8: "the steering tensors could not be allocated",
    -9: "layer index out of range",
    -10: "sequence id out of range, or more distinct sequence steerings than the context has sequences",
}

_lib = None


def lib():
    """The patched libllama, as loaded by llama_cpp; checks that the edge-mote patch is present."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        import llama_cpp.llama_cpp as _llama_cpp
    except (ImportError, OSError) as e:  # pragma: no cover - depends on the installation
        raise EdgeMoteError(f"cannot load llama_cpp: {e}", hint="run the set-up command from the README") from e
    handle = _llama_cpp._lib
    if not hasattr(handle, "llama_set_expert_steering_seq"):
        raise EdgeMoteError(
            "the installed llama_cpp library is not patched for expert steering",
            hint="run `python native/build.py` (the README's set-up command) in this environment",
        )
    _declare(handle)
    _lib = handle
    return handle


_log = {"verbose": False, "last_error": "", "callback": None}


def set_native_logging(verbose: bool) -> None:
    """Route llama.cpp/ggml logs: printed only when verbose; the last error line is kept for error messages.

    (llama-cpp-python maps ggml's log levels off by one and prints warnings as errors even when not verbose.)
    """
    import sys

    import llama_cpp

    _log["verbose"] = bool(verbose)
    if _log["callback"] is None:
        # typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
        @llama_cpp.llama_log_callback
        def _callback(level, text, user_data):
            msg = text.decode("utf-8", errors="replace")
            if level == 4 and msg.strip():  # GGML_LOG_LEVEL_ERROR
                _log["last_error"] = msg.strip()
            if _log["verbose"]:
                sys.stderr.write(msg)

        _log["callback"] = _callback  # keep alive: llama.cpp holds the pointer
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def last_native_error() -> str:
    return _log["last_error"]


def _fn(handle, name, argtypes, restype):
    f = getattr(handle, name)
    f.argtypes = argtypes
    f.restype = restype
    return f


def _declare(h) -> None:
    # LLAMA_API int32_t llama_model_n_layer_all(const struct llama_model * model);
    _fn(h, "llama_model_n_layer_all", [c_void_p], c_int32)
    # LLAMA_API int32_t llama_model_n_expert(const struct llama_model * model);
    # upstream's, declared in its C++ staging header src/llama-ext.h (so exported with C++ name mangling)
    if not hasattr(h, "llama_model_n_expert"):
        setattr(h, "llama_model_n_expert", getattr(h, "_Z20llama_model_n_expertPK11llama_model"))
    _fn(h, "llama_model_n_expert", [c_void_p], c_int32)
    # LLAMA_API int32_t llama_model_n_expert_used(const struct llama_model * model, int32_t il);
    _fn(h, "llama_model_n_expert_used", [c_void_p, c_int32], c_int32)
    # LLAMA_API int32_t llama_model_layer_is_moe(const struct llama_model * model, int32_t il);
    _fn(h, "llama_model_layer_is_moe", [c_void_p, c_int32], c_int32)
    # LLAMA_API const char * llama_model_expert_steering_default(const struct llama_model * model);
    _fn(h, "llama_model_expert_steering_default", [c_void_p], c_char_p)
    # LLAMA_API int32_t llama_set_expert_steering(struct llama_context * ctx, const int8_t * state,
    #                                             const float * bias, float margin, int32_t n_layer, int32_t n_expert);
    _fn(h, "llama_set_expert_steering",
        [c_void_p, POINTER(c_int8), POINTER(c_float), c_float, c_int32, c_int32], c_int32)
    # LLAMA_API int32_t llama_get_expert_steering(struct llama_context * ctx, int8_t * state, float * bias,
    #                                             float * margin, int32_t n_layer, int32_t n_expert);
    _fn(h, "llama_get_expert_steering",
        [c_void_p, POINTER(c_int8), POINTER(c_float), POINTER(c_float), c_int32, c_int32], c_int32)
    # LLAMA_API int32_t llama_clear_expert_steering(struct llama_context * ctx);
    _fn(h, "llama_clear_expert_steering", [c_void_p], c_int32)
    # LLAMA_API int32_t llama_set_expert_steering_seq(struct llama_context * ctx, llama_seq_id seq_id,
    #                                                 const int8_t * state, const float * bias, float margin,
    #                                                 int32_t n_layer, int32_t n_expert);
    _fn(h, "llama_set_expert_steering_seq",
        [c_void_p, c_int32, POINTER(c_int8), POINTER(c_float), c_float, c_int32, c_int32], c_int32)
    # LLAMA_API int32_t llama_clear_expert_steering_seq(struct llama_context * ctx, llama_seq_id seq_id);
    _fn(h, "llama_clear_expert_steering_seq", [c_void_p, c_int32], c_int32)
    # LLAMA_API int32_t llama_get_expert_steering_skipped(struct llama_context * ctx, int32_t * layers, int32_t n_max);
    _fn(h, "llama_get_expert_steering_skipped", [c_void_p, POINTER(c_int32), c_int32], c_int32)
    # LLAMA_API int32_t llama_set_expert_capture(struct llama_context * ctx, bool enable);
    _fn(h, "llama_set_expert_capture", [c_void_p, c_bool], c_int32)
    # LLAMA_API int32_t llama_get_expert_capture(struct llama_context * ctx, int32_t il, const int32_t ** ids,
    #                                            const float ** weights, int32_t * n_used);
    _fn(h, "llama_get_expert_capture",
        [c_void_p, c_int32, POINTER(POINTER(c_int32)), POINTER(POINTER(c_float)), POINTER(c_int32)], c_int32)


_rpc_registered: set[str] = set()


def add_rpc_server(endpoint: str) -> None:
    """Register an RPC worker (``host:port``) as a ggml device, once per process.

    ggml's ``ggml_backend_rpc_add_server`` aborts the process when it cannot connect, so the caller checks that
    the worker answers first (see ``runtime.rpc.check_reachable``).
    """
    if endpoint in _rpc_registered:
        return
    h = lib()
    # GGML_BACKEND_API ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
    f = _fn(h, "ggml_backend_rpc_add_server", [c_char_p], c_void_p)
    # GGML_API void ggml_backend_register(ggml_backend_reg_t reg);
    reg_fn = _fn(h, "ggml_backend_register", [c_void_p], None)
    reg = f(endpoint.encode())
    if not reg:
        raise EdgeMoteError(f"could not add RPC worker {endpoint}")
    reg_fn(reg)
    _rpc_registered.add(endpoint)


def check(rc: int, what: str) -> int:
    """Raise EdgeMoteError for a negative return code of a steering function."""
    if rc < 0:
        raise EdgeMoteError(f"{what} failed: {STEER_ERRORS.get(rc, f'error {rc}')}")
    return rc


def as_ptr(array, ctype):
    """A ctypes pointer to a contiguous numpy array (or NULL for None)."""
    if array is None:
        return None
    return array.ctypes.data_as(POINTER(ctype))


__all__ = [
    "lib", "check", "as_ptr", "STEER_ERRORS",
    "LLAMA_EXPERT_STATE_DEFAULT", "LLAMA_EXPERT_STATE_OFF", "LLAMA_EXPERT_STATE_ON", "LLAMA_EXPERT_STATE_DROP",
    "ctypes",
]
