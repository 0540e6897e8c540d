"""``Model``: a llama.cpp model + context (through llama-cpp-python) whose MoE routing can be steered and read.

    import edge_mote
    with edge_mote.load("model.gguf") as m:
        print(m.info.moe_layers)
        with m.steer("off=1:3,2:5"):
            print(m.generate("Hello", max_tokens=16))
        trace = m.routing(m.tokenize("Hello world"))

A Model owns its native handles: close it (or use it as a context manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import EdgeMoteError, UserError
from . import bindings as B
from ..steering import Steering, coerce


@dataclass(frozen=True)
class ModelInfo:
    """What edge-mote knows about a loaded model."""

    path: str
    arch: str
    name: str | None
    n_layer: int                      # all blocks, including MTP/nextn layers (steering arrays use this)
    moe_layers: tuple[int, ...]       # layers with a router
    n_expert: int                     # routed experts per MoE layer (0: not an MoE model)
    n_expert_used: dict[int, int]     # top-k per MoE layer
    n_vocab: int
    n_ctx_train: int
    profiles: tuple[str, ...]
    default_profile: str | None
    file_bytes: int

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.moe_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["n_expert_used"] = {str(k): v for k, v in self.n_expert_used.items()}
        d["profiles"] = list(self.profiles)
        return d


@dataclass(frozen=True)
class RoutingTrace:
    """Which experts each token selected in each MoE layer, and their final gate weights.

    ``ids[layer]`` and ``weights[layer]`` are [n_tokens, k] arrays (k = top-k of that layer), rows in token order.
    """

    tokens: np.ndarray
    ids: dict[int, np.ndarray] = field(repr=False)
    weights: dict[int, np.ndarray] = field(repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.ids))

    def counts(self, n_expert: int, rows: Sequence[int] | slice | None = None) -> np.ndarray:
        """[n_layers_moe, n_expert] how often each expert was selected (over ``rows`` if given)."""
        out = np.zeros((len(self.ids), n_expert), dtype=np.int64)
        for i, layer in enumerate(self.layers):
            sel = self.ids[layer] if rows is None else self.ids[layer][rows]
            out[i] = np.bincount(sel.reshape(-1), minlength=n_expert)[:n_expert]
        return out


@dataclass(frozen=True)
class Completion:
    text: str
    n_prompt_tokens: int
    n_tokens: int
    seconds: float


PARALLEL_SEQS = 16     # sequences per llama_decode in greedy_many / score_many ...
PARALLEL_CELLS = 8192  # ... at most as many as keep the batched KV cache within this many cells


class Model:
    """A loaded GGUF model with steerable MoE routing. Use ``edge_mote.load`` to make one."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, rpc_servers: Sequence[str] | None = None, seed: int = 0,
                 verbose: bool = False, **llama_kwargs):
        from ..gguf_meta import keys as K
        from ..gguf_meta.profiles import check_gguf_header, read_profiles_cached
        from .resolve import resolve_model

        path = resolve_model(path)  # a local path, or hf://owner/repo[:file.gguf][@revision] (never implicit)
        check_gguf_header(path)  # one-line error for missing, empty or non-GGUF files, before llama.cpp sees them

        lib = B.lib()
        import llama_cpp

        B.set_native_logging(verbose or os.environ.get("EDGE_MOTE_DEBUG") == "1")
        from .rpc import check_registered, connect

        # ggml aborts the process when a registered RPC worker cannot be reached: check every one first
        check_registered()
        if rpc_servers:
            connect(rpc_servers)  # one-line error if a worker is unreachable
        if n_gpu_layers is None:
            n_gpu_layers = -1 if rpc_servers else 0  # with RPC workers, offload every layer to the devices
        kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512), logits_all=True, verbose=verbose,
                      n_gpu_layers=n_gpu_layers, seed=seed)
        if n_threads is not None:
            kwargs["n_threads"] = n_threads
            kwargs["n_threads_batch"] = n_threads
        kwargs.update(llama_kwargs)
        try:
            self._llm = llama_cpp.Llama(model_path=str(path), **kwargs)
        except ValueError:
            why = B.last_native_error() or "the file is truncated, corrupt or of an unsupported architecture"
            raise UserError(f"llama.cpp could not load {path}: {why}",
                            hint="check the download (size, sha256); EDGE_MOTE_DEBUG=1 shows llama.cpp's log") from None
        meta = self._llm.metadata  # scalar keys only (llama.cpp keeps no arrays here)
        arch = meta.get(K.ARCHITECTURE, "unknown")
        # profiles are arrays: read with gguf-py, only for files that carry edge-mote metadata (cached by file identity)
        self._profiles, default = read_profiles_cached(path) if K.VERSION in meta else ({}, None)
        self._lib = lib
        self._mp = self._llm._model.model
        self._ctx = self._llm._ctx.ctx
        self._capture = False
        self._parallel = None  # ParallelContext for greedy_many / score_many, made on first use

        n_layer = lib.llama_model_n_layer_all(self._mp)
        n_expert = lib.llama_model_n_expert(self._mp)
        moe = tuple(il for il in range(n_layer) if n_expert > 0 and lib.llama_model_layer_is_moe(self._mp, il) == 1)
        self.info = ModelInfo(
            path=str(path), arch=str(arch), name=meta.get(K.NAME),
            n_layer=n_layer, moe_layers=moe, n_expert=n_expert,
            n_expert_used={il: lib.llama_model_n_expert_used(self._mp, il) for il in moe},
            n_vocab=self._llm.n_vocab(), n_ctx_train=self._llm._model.n_ctx_train(),
            profiles=tuple(self._profiles), default_profile=default, file_bytes=path.stat().st_size,
        )
        self._steering = self._read_native_steering()

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        par, self._parallel = getattr(self, "_parallel", None), None
        if par is not None:
            par.close()
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live(self):
        if self._llm is None:
            raise EdgeMoteError("this Model is closed")
        return self._llm

    # -- steering --------------------------------------------------------------------------------------------
    @property
    def steering(self) -> Steering:
        """The steering in effect (initially the GGUF's default profile, if it has one)."""
        return self._steering

    @property
    def profiles(self) -> dict:
        return dict(self._profiles)

    def _require_moe(self) -> None:
        if not self.info.is_moe:
            raise UserError(f"{Path(self.info.path).name} is not a Mixture-of-Experts model "
                            f"(architecture '{self.info.arch}' has no routed experts)")

    def _read_native_steering(self) -> Steering:
        if not self.info.is_moe:
            return Steering()
        n = self.info.n_layer * self.info.n_expert
        state = np.zeros(n, dtype=np.int8)
        bias = np.zeros(n, dtype=np.float32)
        margin = ctypes.c_float(0.0)
        B.check(self._lib.llama_get_expert_steering(self._ctx, B.as_ptr(state, ctypes.c_int8), B.as_ptr(bias, ctypes.c_float),
                                                    ctypes.byref(margin), self.info.n_layer, self.info.n_expert),
                "reading the steering")
        shape = (self.info.n_layer, self.info.n_expert)
        return Steering.from_arrays(state.reshape(shape), bias.reshape(shape), float(margin.value))

    def _apply_native(self, ctx, steering: Steering) -> None:
        """Apply ``steering`` to one native context (the main one or the batched one)."""
        if steering:
            info = self.info
            state, bias = steering.to_arrays(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)
            rc = self._lib.llama_set_expert_steering(ctx, B.as_ptr(state, ctypes.c_int8), B.as_ptr(bias, ctypes.c_float),
                                                     steering.margin, info.n_layer, info.n_expert)
            if rc < 0:
                raise UserError(f"cannot apply steering '{steering}': {B.STEER_ERRORS.get(rc, rc)}")
        elif self.info.is_moe:
            B.check(self._lib.llama_clear_expert_steering(ctx), "clearing the steering")

    def set_steering(self, steering: "Steering | str | dict | None") -> Steering:
        """Apply a steering (None: none at all). Takes effect at the next evaluation; no reload."""
        steering = coerce(steering)
        llm = self._live()
        if steering:
            self._require_moe()
        self._apply_native(self._ctx, steering)
        if self._parallel is not None:
            self._apply_native(self._parallel.ctx, steering)
        self._steering = steering
        llm.reset()  # cached tokens were computed with the old routing
        return steering

    def use_profile(self, name: str | None) -> Steering:
        """Apply a profile stored in the GGUF by name (``None`` or ``"none"``: no steering)."""
        if name is None or name == "none":
            return self.set_steering(None)
        if name not in self._profiles:
            known = ", ".join(self._profiles) or "none stored"
            raise UserError(f"unknown profile '{name}' in {Path(self.info.path).name}", hint=f"profiles: {known}")
        return self.set_steering(self._profiles[name].steering)

    @contextlib.contextmanager
    def steer(self, steering: "Steering | str | dict | None") -> Iterator["Model"]:
        """Apply a steering inside a ``with`` block, then restore the previous one."""
        previous = self._steering
        self.set_steering(steering)
        try:
            yield self
        finally:
            if self._llm is not None:
                self.set_steering(previous)

    # -- evaluation ------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._live().tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._live().detokenize(list(tokens)).decode("utf-8", errors="replace")

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise UserError("no tokens to evaluate")
        llm = self._live()
        if len(tokens) > llm.n_ctx():
            raise UserError(f"{len(tokens)} tokens do not fit the context of {llm.n_ctx()}", hint="load with a larger n_ctx")
        bad = [t for t in tokens if not 0 <= t < self.info.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is out of range (vocabulary of {self.info.n_vocab})")
        return tokens

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits after every token: float32 [n_tokens, n_vocab], from an empty context."""
        tokens = self._check_tokens(tokens)
        llm = self._live()
        llm.reset()
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
        llm.reset()
        return out

    def set_capture(self, enable: bool) -> None:
        """Turn routing capture on or off (on costs a little per decode; ``routing`` turns it on)."""
        self._require_moe()
        B.check(self._lib.llama_set_expert_capture(self._ctx, bool(enable)), "routing capture")
        self._capture = bool(enable)

    def routing(self, tokens: Sequence[int]) -> RoutingTrace:
        """Evaluate ``tokens`` from an empty context and return the experts every token selected per MoE layer."""
        self._require_moe()
        tokens = self._check_tokens(tokens)
        llm = self._live()
        if not self._capture:
            self.set_capture(True)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        parts_ids: dict[int, list[np.ndarray]] = {il: [] for il in self.info.moe_layers}
        parts_w: dict[int, list[np.ndarray]] = {il: [] for il in self.info.moe_layers}
        ids_p = ctypes.POINTER(ctypes.c_int32)()
        w_p = ctypes.POINTER(ctypes.c_float)()
        k = ctypes.c_int32(0)
        for start in range(0, len(tokens), llm.n_batch):
            chunk = tokens[start: start + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            for il in self.info.moe_layers:
                rows = B.check(self._lib.llama_get_expert_capture(self._ctx, il, ctypes.byref(ids_p), ctypes.byref(w_p),
                                                                  ctypes.byref(k)), "reading the routing capture")
                if rows != len(chunk):
                    raise EdgeMoteError(f"routing capture of layer {il} has {rows} rows for {len(chunk)} tokens")
                n = rows * k.value
                parts_ids[il].append(np.ctypeslib.as_array(ids_p, shape=(n,)).reshape(rows, k.value).copy())
                parts_w[il].append(np.ctypeslib.as_array(w_p, shape=(n,)).reshape(rows, k.value).copy())
        llm.reset()
        return RoutingTrace(
            tokens=np.asarray(tokens, dtype=np.int32),
            ids={il: np.concatenate(v) for il, v in parts_ids.items()},
            weights={il: np.concatenate(v) for il, v in parts_w.items()},
        )

    def greedy(self, tokens: Sequence[int], max_new: int, stop_at_eos: bool = True) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of ``tokens`` (from an empty context): the new token ids, and the next-token logits
        at every position of the prompt and the continuation ([len(tokens) + len(new), n_vocab], float32)."""
        tokens = self._check_tokens(tokens)
        llm = self._live()
        if len(tokens) + max_new > llm.n_ctx():
            raise UserError(f"{len(tokens)} prompt + {max_new} new tokens do not fit the context of {llm.n_ctx()}")
        eos = llm.token_eos() if stop_at_eos else -1
        llm.reset()
        llm.eval(tokens)
        new: list[int] = []
        while len(new) < max_new:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == eos:
                break
            new.append(nxt)
            if len(new) < max_new:
                llm.eval([nxt])
        logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32, copy=True)
        llm.reset()
        return new, logits

    def _batched(self, n_ctx_seq: int):
        """The batched context, (re)made when a longer sequence than it holds is needed."""
        from .parallel import ParallelContext

        par = self._parallel
        if par is None or par.n_ctx_seq < n_ctx_seq:
            if par is not None:
                par.close()
                self._parallel = None
            size = max(128, -(-n_ctx_seq // 64) * 64)
            n_batch = max(512, size)
            n_seq = max(1, min(PARALLEL_SEQS, PARALLEL_CELLS // size))  # bound the KV cache of long sequences
            self._parallel = ParallelContext(self._live(), n_seq, size, n_batch,
                                             lambda ctx: self._apply_native(ctx, self._steering))
        return self._parallel

    def greedy_many(self, prompts: Sequence[Sequence[int]], max_new: int, stop_at_eos: bool = True,
                    keep_logits: int | None = None, tick=None) -> list[tuple[list[int], np.ndarray]]:
        """``greedy`` for many prompts, decoded together (up to 16 sequences per ``llama_decode``).

        Returns, per prompt, the new tokens and the logits each step chose from ([len(new) (+1 when it stopped at
        EOS), n_vocab]: the rows ``n_prompt - 1 ...`` of ``greedy``'s logits; only the first ``keep_logits`` rows
        when given, which saves memory). ``tick(n)`` reports progress.
        """
        prompts = [self._check_tokens(p) for p in prompts]
        if not prompts:
            return []
        longest = max(len(p) for p in prompts) + max_new
        if longest > self._live().n_ctx():
            raise UserError(f"{longest - max_new} prompt + {max_new} new tokens do not fit the context of "
                            f"{self._live().n_ctx()}")
        eos = self._live().token_eos() if stop_at_eos else -1
        return self._batched(longest).greedy(prompts, max_new, eos, keep_logits, tick)

    def score_many(self, seqs: Sequence[Sequence[int]], first: Sequence[int], reduce=None, tick=None) -> list:
        """Next-token logits of many sequences evaluated together: for sequence i the rows ``first[i]`` to
        ``len - 1`` of ``logits(seqs[i])`` -- or ``reduce(i, rows)`` of them, computed without copying the rows
        out of llama.cpp's buffer (``rows`` is valid only during the call)."""
        seqs = [self._check_tokens(s) for s in seqs]
        if not seqs:
            return []
        longest = max(len(s) for s in seqs)
        if longest > self._live().n_ctx():
            raise UserError(f"{longest} tokens do not fit the context of {self._live().n_ctx()}")
        return self._batched(longest).score(seqs, first, reduce, tick)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                 stop: Sequence[str] | None = None) -> Completion:
        """Complete ``prompt`` (greedy at temperature 0; reproducible for a fixed seed)."""
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        llm = self._live()
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    top_k=0 if temperature == 0 else 40, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                    stop=list(stop) if stop else None)
        dt = time.perf_counter() - t0
        llm.reset()
        usage = out.get("usage", {})
        return Completion(text=out["choices"][0]["text"], n_prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          n_tokens=int(usage.get("completion_tokens", 0)), seconds=dt)


def load(path_or_repo: str | os.PathLike, **llama_kwargs) -> Model:
    """Load a GGUF model (local path or ``hf://owner/repo[:file.gguf][@revision]`` on the Hugging Face Hub).

    Keyword arguments go to ``llama_cpp.Llama`` (``n_ctx``, ``n_gpu_layers``, ``type_k``, ...). The GGUF's
    default steering profile, if any, is in effect after loading (``Model.steering``).
    """
    return Model(path_or_repo, **llama_kwargs)
