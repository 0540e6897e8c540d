"""Expert outputs through llama.cpp's eval callback: what REAP saliency needs and the routing capture lacks.

``ExpertOutputProbe(path).outputs(tokens)`` evaluates one sequence, unsteered (the file's default profile is
cleared), on its own llama.cpp context whose ``cb_eval`` reads, per MoE layer, the selected experts
(``ffn_moe_topk-<il>``) and their outputs before gating (``ffn_moe_down-<il>``, or ``ffn_moe_down_biased-<il>``
where experts have a down bias), and takes the final gate weights from the patch's routing capture. It returns,
per layer, ids [n_tokens, k], gate weights [n_tokens, k] and the L2 norm of each selected expert's output
[n_tokens, k].

The callback reads ``struct ggml_tensor`` fields through a ctypes mirror checked against ggml's own size
(``ggml_tensor_overhead``). A separate context (and model load) keeps the Model's context free of a callback that
would split its graphs.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EdgeMoteError
from . import bindings as B

_TOPK = b"ffn_moe_topk-"
_DOWN = b"ffn_moe_down-"
_DOWN_BIASED = b"ffn_moe_down_biased-"
_GGML_TYPE_F32, _GGML_TYPE_I32 = 0, 26


class _GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (ggml/include/ggml.h of the vendored llama.cpp)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_base():
    """ggml's tensor functions through the handle llama_cpp holds (dlsym searches libllama's dependencies, so this
    is the libggml-base already loaded, never a second copy)."""
    h = B.lib()
    get = h.ggml_backend_tensor_get
    get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    get.restype = None
    overhead = h.ggml_tensor_overhead
    overhead.restype = ctypes.c_size_t
    if overhead() != 32 + ctypes.sizeof(_GgmlTensor):  # GGML_OBJECT_SIZE + sizeof(struct ggml_tensor)
        raise EdgeMoteError("the ctypes mirror of struct ggml_tensor does not match this ggml build")
    return h


def _read(ggml, t: int, dtype) -> np.ndarray:
    """A 2-D or 3-D (possibly strided) F32/I32 tensor as a numpy array in ggml order reversed ([ne2, ne1, ne0])."""
    g = _GgmlTensor.from_address(t)
    ne = [int(g.ne[i]) for i in range(3)]
    nb = [int(g.nb[i]) for i in range(3)]
    nbytes = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
    buf = np.empty((nbytes + 3) // 4, dtype=dtype)
    ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
    return np.lib.stride_tricks.as_strided(buf, (ne[2], ne[1], ne[0]), (nb[2], nb[1], nb[0])).copy()


class ExpertOutputProbe:
    """A second llama.cpp context on the same file that reads expert outputs (see the module doc)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_batch: int = 512, n_threads: int | None = None,
                 type_k: int | None = None, type_v: int | None = None):
        import llama_cpp

        self._lib = B.lib()
        self._ggml = _ggml_base()
        self._llama = llama_cpp
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(Path(path)).encode(), mp)
        if not self._model:
            raise EdgeMoteError(f"llama.cpp could not load {path}")
        self._topk: dict[int, list[np.ndarray]] = {}
        self._down: dict[int, list[np.ndarray]] = {}
        self._biased: dict[int, list[np.ndarray]] = {}
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)  # kept alive with the context
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = max(16, n_ctx)
        cp.n_batch = cp.n_ubatch = min(n_batch, cp.n_ctx)
        if n_threads:
            cp.n_threads = cp.n_threads_batch = n_threads
        if type_k is not None:  # KV cache types (ggml_type; 0 = F32), as llama_cpp.Llama's type_k / type_v
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        # as llama_cpp.Llama's default (flash_attn=False): the CPU flash-attention path computes in F16
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.cb_eval, cp.cb_eval_user_data = self._cb, None
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EdgeMoteError("llama.cpp could not create the probe context")
        self.n_batch = int(cp.n_batch)
        self.n_ctx = int(cp.n_ctx)
        n_layer = self._lib.llama_model_n_layer_all(self._model)
        self.moe_layers = tuple(il for il in range(n_layer) if self._lib.llama_model_layer_is_moe(self._model, il) == 1)
        B.check(self._lib.llama_clear_expert_steering(self._ctx), "clearing the default profile")
        B.check(self._lib.llama_set_expert_capture(self._ctx, True), "routing capture")

    def _on_tensor(self, t, ask, _user) -> bool:
        name = bytes(_GgmlTensor.from_address(t).name)
        for prefix, store, dtype in ((_TOPK, self._topk, np.int32), (_DOWN, self._down, np.float32),
                                     (_DOWN_BIASED, self._biased, np.float32)):
            if name.startswith(prefix):
                if ask:
                    return True
                il = int(name[len(prefix):].split(b"\0", 1)[0])
                store.setdefault(il, []).append(_read(self._ggml, t, dtype))
                return True
        return bool(ask) is False

    def outputs(self, tokens: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{layer: (ids [n, k], gate weights [n, k], expert output norms [n, k])} for one sequence."""
        llama_cpp = self._llama
        tokens = [int(t) for t in tokens]
        if not tokens or len(tokens) > self.n_ctx:
            raise EdgeMoteError(f"{len(tokens)} tokens do not fit the probe's context of {self.n_ctx}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._topk.clear(), self._down.clear(), self._biased.clear()
        weights: dict[int, list[np.ndarray]] = {il: [] for il in self.moe_layers}
        cap_ids: dict[int, list[np.ndarray]] = {il: [] for il in self.moe_layers}
        ids_p, w_p, k = ctypes.POINTER(ctypes.c_int32)(), ctypes.POINTER(ctypes.c_float)(), ctypes.c_int32(0)
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start: start + self.n_batch]
                for i, tok in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1  # all rows: llama.cpp computes only output rows in the last layer
                batch.n_tokens = len(chunk)
                if llama_cpp.llama_decode(self._ctx, batch) != 0:
                    raise EdgeMoteError("llama_decode failed in the expert-output probe")
                for il in self.moe_layers:
                    rows = B.check(self._lib.llama_get_expert_capture(self._ctx, il, ctypes.byref(ids_p),
                                                                      ctypes.byref(w_p), ctypes.byref(k)), "capture")
                    n = rows * k.value
                    cap_ids[il].append(np.ctypeslib.as_array(ids_p, shape=(n,)).reshape(rows, k.value).copy())
                    weights[il].append(np.ctypeslib.as_array(w_p, shape=(n,)).reshape(rows, k.value).copy())
        finally:
            llama_cpp.llama_batch_free(batch)
        out = {}
        for il in self.moe_layers:
            if il not in self._topk or il not in self._down:
                raise EdgeMoteError(f"the probe saw no expert tensors for layer {il}")
            ids = np.concatenate([a.reshape(-1, a.shape[-1]) for a in self._topk[il]])       # [n, k]
            down = self._biased.get(il) or self._down[il]
            norms = np.concatenate([np.linalg.norm(a, axis=-1) for a in down])              # [n, k]
            cids, w = np.concatenate(cap_ids[il]), np.concatenate(weights[il])
            if ids.shape != norms.shape or ids.shape != cids.shape:
                raise EdgeMoteError(f"layer {il}: probe shapes disagree ({ids.shape}, {norms.shape}, {cids.shape})")
            # gate weights in the probe's slot order (the capture's order may differ)
            order = np.argsort(cids, axis=1, kind="stable")
            pos = np.argsort(ids, axis=1, kind="stable")
            if not np.array_equal(np.take_along_axis(cids, order, 1), np.take_along_axis(ids, pos, 1)):
                raise EdgeMoteError(f"layer {il}: the captured routing and the probed experts differ")
            aligned = np.empty_like(w)
            np.put_along_axis(aligned, pos, np.take_along_axis(w, order, 1), 1)
            out[il] = (ids, aligned, norms.astype(np.float32))
        return out

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._llama.llama_free(ctx)
        model, self._model = getattr(self, "_model", None), None
        if model:
            self._llama.llama_model_free(model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
