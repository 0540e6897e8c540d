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


PARALLEL_SEQS = 32     # sequences per llama_decode in the batched methods ...
PARALLEL_CELLS = 8192  # ... at most as many as keep the batched KV cache within this many cells
SAMPLING_TOP_K = 40    # generate() at temperature > 0 samples among the 40 most likely tokens


def _locked(method):
    """Serialise a Model method: llama.cpp contexts are not thread-safe, so a Model takes one call at a time."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Model:
    """A loaded GGUF model with steerable MoE routing. Use ``edge_mote.load`` to make one.

    Every evaluation runs on one decode surface, a batched context (``ParallelContext``) in which each sequence
    may carry its own steering: ``logits``/``logits_many``, ``routing``/``routing_many``, ``greedy``/``greedy_many``,
    ``score_many``, ``generate``; generation stops at any end-of-generation token (``token_eog``). A Model may be
    shared between threads: its methods take a lock (one native call at a time).
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, rpc_servers: Sequence[str] | None = None, seed: int = 0,
                 verbose: bool = False, **llama_kwargs):
        import threading

        from ..gguf_meta import keys as K
        from ..gguf_meta.profiles import check_gguf_header, read_profiles_cached
        from .resolve import resolve_model

        self._lock = threading.RLock()
        self._llm = None
        self._parallel = None  # the batched context of the decode surface, made on first use
        self._parallel_invariant = None  # ... and its batch-invariant twin (``invariant=True``)
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
        # llama-cpp-python's own context only holds the settings and serves tokenization: evaluations run in the
        # batched context, sized on demand up to n_ctx tokens per sequence
        self._n_ctx = int(n_ctx)
        kwargs = dict(n_ctx=min(self._n_ctx, 64), n_batch=64, n_ubatch=64, logits_all=False, verbose=verbose,
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
        self._vocab = self._llm._model.vocab

        n_layer = lib.llama_model_n_layer_all(self._mp)
        n_expert = lib.llama_model_n_expert(self._mp)
        moe = tuple(il for il in range(n_layer) if n_expert > 0 and lib.llama_model_layer_is_moe(self._mp, il) == 1)
        info = dict(
            path=str(path), arch=str(arch), name=meta.get(K.NAME),
            n_layer=n_layer, moe_layers=moe, n_expert=n_expert,
            n_expert_used={il: lib.llama_model_n_expert_used(self._mp, il) for il in moe},
            n_vocab=self._llm.n_vocab(), n_ctx_train=self._llm._model.n_ctx_train(),
            profiles=tuple(self._profiles), default_profile=default, file_bytes=path.stat().st_size,
        )
        self.info = ModelInfo(**info)
        self._steering = self._read_native_steering()
        if self._steering:
            try:  # the patch applied the GGUF's default profile: refused where steering cannot be verified
                self.require_steerable()
            except UserError as e:
                self.close()
                raise UserError(f"{Path(path).name} has default profile '{default}', but {e}",
                                hint=f"write a copy without it: edge-mote profile rm {Path(path).name} {default} "
                                     "-o OUT.gguf") from None
        self.default_profile_error: str | None = None
        if default is not None and not self._steering:
            # the patch validates the default profile when a context is made; it refused this one (logged why)
            self.default_profile_error = B.last_native_error() or f"default profile '{default}' was not applied"
            self.info = ModelInfo(**{**info, "default_profile": None})

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for par in (self._parallel, self._parallel_invariant):
                if par is not None:
                    par.close()
            self._parallel = self._parallel_invariant = None
            llm, self._llm = self._llm, None
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

    # -- native handles, for the batched contexts of this package ---------------------------------------------
    def native_model(self):
        """The ``llama_model *`` (for ``ParallelContext``)."""
        self._live()
        return self._mp

    def native_context_params(self):
        """The ``llama_context_params`` the model was loaded with (threads, offload, ...)."""
        return self._live().context_params

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

    def require_moe(self) -> None:
        """A UserError unless the model has routed experts."""
        self._require_moe()

    def require_steerable(self) -> None:
        """A UserError unless steering may be set on this model: it has routed experts, and its architecture is not
        one where llama.cpp and transformers disagree (``edge_mote.arch_support``; untested ones warn once)."""
        from ..arch_support import check_steerable

        self._require_moe()
        check_steerable(self.info.arch)

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

    def apply_steering_to(self, ctx) -> None:
        """Apply the Model's steering as the context-wide steering of a native context of this model."""
        steering = self._steering
        if steering:
            info = self.info
            state, bias = steering.to_arrays(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)
            rc = self._lib.llama_set_expert_steering(ctx, B.as_ptr(state, ctypes.c_int8), B.as_ptr(bias, ctypes.c_float),
                                                     steering.margin, info.n_layer, info.n_expert)
            if rc < 0:
                raise UserError(f"cannot apply steering '{steering}': {B.STEER_ERRORS.get(rc, rc)}")
        elif self.info.is_moe:
            B.check(self._lib.llama_clear_expert_steering(ctx), "clearing the steering")

    @_locked
    def set_steering(self, steering: "Steering | str | dict | None") -> Steering:
        """Apply a steering (None: none at all). Takes effect at the next evaluation; no reload."""
        steering = coerce(steering)
        self._live()
        if steering:
            self.require_steerable()
            info = self.info
            steering.check(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)
        previous, self._steering = self._steering, steering
        try:
            self.apply_steering_to(self._ctx)
            for par in (self._parallel, self._parallel_invariant):
                if par is not None:
                    par.apply_model_steering()
        except BaseException:
            self._steering = previous
            raise
        return steering

    def use_profile(self, name: str | None) -> Steering:
        """Apply a profile stored in the GGUF by name (``None`` or ``"none"``: no steering)."""
        return self.set_steering(self.profile_steering(name))

    def profile_steering(self, name: str | None) -> Steering:
        """The steering of a stored profile (``None``/``"none"``: no steering); an unknown name is a UserError."""
        if name is None or name == "none":
            return Steering()
        if name not in self._profiles:
            known = ", ".join(self._profiles) or "none stored"
            raise UserError(f"unknown profile '{name}' in {Path(self.info.path).name}", hint=f"profiles: {known}")
        return self._profiles[name].steering

    @contextlib.contextmanager
    def steer(self, steering: "Steering | str | dict | None") -> Iterator["Model"]:
        """Apply a steering inside a ``with`` block, then restore the previous one."""
        with self._lock:
            previous = self._steering
            self.set_steering(steering)
            try:
                yield self
            finally:
                if self._llm is not None:
                    self.set_steering(previous)

    # -- vocabulary and prompts ------------------------------------------------------------------------------
    @_locked
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._live().tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def encode_prompt(self, text: str, templated: bool = False) -> list[int]:
        """The one rule for prompts: special tokens are parsed; BOS is added unless a chat template rendered the
        text (the template writes its own)."""
        return self.tokenize(text, add_bos=not templated, special=True)

    @_locked
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._live().detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, <|im_end|>, ...: any end-of-generation token)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    def token_bos(self) -> int:
        return self._live().token_bos()

    def token_eos(self) -> int:
        return self._live().token_eos()

    def token_text(self, token: int) -> str:
        """The vocabulary text of a token ('' for -1)."""
        return self._live()._model.token_get_text(token) if token != -1 else ""

    @property
    def metadata(self) -> dict:
        """The GGUF's scalar metadata (as llama.cpp reads it)."""
        return dict(self._live().metadata)

    @property
    def n_ctx(self) -> int:
        """Tokens one sequence may hold (prompt + generated)."""
        return self._n_ctx

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise UserError("no tokens to evaluate")
        if len(tokens) > self._n_ctx:
            raise UserError(f"{len(tokens)} tokens do not fit the context of {self._n_ctx}", hint="load with a larger n_ctx (--ctx)")
        bad = [t for t in tokens if not 0 <= t < self.info.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is out of range (vocabulary of {self.info.n_vocab})")
        return tokens

    def _check_steerings(self, steerings, n: int) -> list[Steering | None] | None:
        if steerings is None:
            return None
        steerings = [None if s is None else coerce(s) for s in steerings]
        if len(steerings) != n:
            raise UserError(f"{len(steerings)} steerings for {n} sequences: give one per sequence (None: the Model's)")
        if any(steerings):
            self.require_steerable()
        return steerings

    # -- the batched context ----------------------------------------------------------------------------------
    def _batched(self, n_ctx_seq: int, invariant: bool = False):
        """The batched context (or its batch-invariant twin), (re)made when a longer sequence than it holds is
        needed."""
        from .parallel import ParallelContext

        attr = "_parallel_invariant" if invariant else "_parallel"
        par = getattr(self, attr)
        if par is None or par.n_ctx_seq < n_ctx_seq:
            if par is not None:
                par.close()
                setattr(self, attr, None)
            size = max(128, -(-n_ctx_seq // 64) * 64)
            n_batch = max(512, size)
            n_seq = max(1, min(PARALLEL_SEQS, PARALLEL_CELLS // size))  # bound the KV cache of long sequences
            if invariant:  # a wave's generation step is one decode below the invariant ubatch (room for a pad token);
                # more than 32 sequences per wave measured slower (2026-12-06: 63 vs 32 on the demo's eval)
                n_seq = min(n_seq, ParallelContext.INVARIANT_UBATCH - 1)
            setattr(self, attr, ParallelContext(self, n_seq, size, n_batch, invariant=invariant))
        return getattr(self, attr)

    @_locked
    def open_batch(self, n_seq: int, n_ctx_seq: int, n_batch: int | None = None):
        """A new batched context on this model's weights (``ParallelContext``), owned by the caller (``close()``
        it): ``n_seq`` sequences of up to ``n_ctx_seq`` tokens, each with its own steering if set. For servers."""
        from .parallel import ParallelContext

        if n_ctx_seq > self._n_ctx:
            raise UserError(f"{n_ctx_seq} tokens per sequence exceed the model's context of {self._n_ctx}")
        return ParallelContext(self, n_seq, n_ctx_seq, n_batch or max(512, min(n_seq * n_ctx_seq, 2048)))

    # -- evaluation ------------------------------------------------------------------------------------------
    @_locked
    def logits_many(self, token_lists: Sequence[Sequence[int]], steerings=None, invariant: bool = False
                    ) -> list[np.ndarray]:
        """Next-token logits after every token of each sequence (each float32 [n_tokens, n_vocab]), decoded
        together, sequence i under ``steerings[i]`` (None: the Model's steering). Equal to ``logits`` of each alone."""
        seqs = [self._check_tokens(t) for t in token_lists]
        steerings = self._check_steerings(steerings, len(seqs))
        if not seqs:
            return []
        return self._batched(max(len(s) for s in seqs), invariant).score(seqs, [0] * len(seqs), steerings=steerings)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits after every token: float32 [n_tokens, n_vocab], from an empty context."""
        return self.logits_many([tokens])[0]

    @_locked
    def routing_many(self, token_lists: Sequence[Sequence[int]], steerings=None, tick=None) -> list[RoutingTrace]:
        """The experts every token of each sequence selected per MoE layer, sequences decoded together."""
        self._require_moe()
        seqs = [self._check_tokens(t) for t in token_lists]
        steerings = self._check_steerings(steerings, len(seqs))
        if not seqs:
            return []
        caps = self._batched(max(len(s) for s in seqs)).routing(seqs, steerings, tick)
        out = []
        for toks, cap in zip(seqs, caps):
            for il, (ids, _) in cap.items():
                if len(ids) != len(toks):
                    raise EdgeMoteError(f"routing capture of layer {il} has {len(ids)} rows for {len(toks)} tokens")
            out.append(RoutingTrace(tokens=np.asarray(toks, dtype=np.int32),
                                    ids={il: c[0] for il, c in cap.items()}, weights={il: c[1] for il, c in cap.items()}))
        return out

    def routing(self, tokens: Sequence[int]) -> RoutingTrace:
        """Evaluate ``tokens`` from an empty context and return the experts every token selected per MoE layer."""
        return self.routing_many([tokens])[0]

    @_locked
    def greedy_many(self, prompts: Sequence[Sequence[int]], max_new: int, stop_at_eos: bool = True,
                    keep_logits: int | None = None, tick=None, steerings=None,
                    sampler=None, routing: bool = False, invariant: bool = False, on_row=None) -> list[tuple]:
        """Greedy continuation of many prompts, decoded together (up to 16 sequences per ``llama_decode``), prompt i
        under ``steerings[i]`` (None: the Model's steering); stops at any end-of-generation token.

        Returns, per prompt, the new tokens and the logits each step chose from ([len(new) (+1 when it stopped at
        EOG), n_vocab]; only the first ``keep_logits`` rows when given, which saves memory). ``tick(n)`` reports
        progress; ``sampler(i, row) -> token`` replaces argmax (sampling); ``on_row(i, new, row)`` sees each row
        before that (``new``: prompt i's tokens so far; ``row`` is valid during the call). With ``routing``, each result also
        holds a ``RoutingTrace`` of the tokens whose logits those rows are (the last prompt token, then the
        generated tokens that were fed back), read from the same decodes: the scan's response window.
        ``invariant``: batch-invariant decoding, each prompt's result bit-identical whatever it is batched with
        (slower; see ``edge_mote.runtime.parallel``).
        """
        prompts = [self._check_tokens(p) for p in prompts]
        steerings = self._check_steerings(steerings, len(prompts))
        if not prompts:
            return []
        if max_new < 1:
            raise UserError(f"max_new must be >= 1, got {max_new}")
        longest = max(len(p) for p in prompts) + max_new
        if longest > self._n_ctx:
            raise UserError(f"{longest - max_new} prompt + {max_new} new tokens do not fit the context of {self._n_ctx}",
                            hint="load with a larger n_ctx (--ctx) or ask for fewer new tokens")
        is_eog = self.token_eog if stop_at_eos else (lambda t: False)
        if routing:
            self._require_moe()
        outs = self._batched(longest, invariant).greedy(prompts, max_new, is_eog, keep_logits, tick, steerings, sampler,
                                                        routing, on_row)
        if not routing:
            return outs
        result = []
        for p, (new, rows, route) in zip(prompts, outs):
            fed = ([p[-1]] + new)[: len(next(iter(route.values()))[0])] if route else []
            result.append((new, rows, RoutingTrace(tokens=np.asarray(fed, dtype=np.int32),
                                                    ids={il: r[0] for il, r in route.items()},
                                                    weights={il: r[1] for il, r in route.items()})))
        return result

    def greedy(self, tokens: Sequence[int], max_new: int, stop_at_eos: bool = True) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of ``tokens``: the new tokens, and the logits each step chose from (see
        ``greedy_many``)."""
        return self.greedy_many([tokens], max_new, stop_at_eos)[0]

    @_locked
    def score_many(self, seqs: Sequence[Sequence[int]], first: Sequence[int], reduce=None, tick=None,
                   steerings=None, invariant: bool = False) -> list:
        """Next-token logits of many sequences evaluated together: for sequence i the rows ``first[i]`` to
        ``len - 1`` of ``logits(seqs[i])`` -- or ``reduce(i, rows)`` of them, computed without copying the rows
        out of llama.cpp's buffer (``rows`` is valid only during the call) -- under ``steerings[i]``. ``invariant``: as
        in ``greedy_many``."""
        seqs = [self._check_tokens(s) for s in seqs]
        steerings = self._check_steerings(steerings, len(seqs))
        if not seqs:
            return []
        return self._batched(max(len(s) for s in seqs), invariant).score(seqs, first, reduce, tick, steerings)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                 stop: Sequence[str] | None = None) -> Completion:
        """Complete ``prompt`` (greedy at temperature 0; else sampled among the 40 most likely tokens,
        reproducibly for a fixed seed); stops at any end-of-generation token or before the first ``stop`` string."""
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise UserError(f"temperature must be >= 0, got {temperature}")
        tokens = self.encode_prompt(prompt)
        if len(tokens) + max_tokens > self._n_ctx:
            raise UserError(f"the prompt ({len(tokens)} tokens) + {max_tokens} new tokens do not fit the context of "
                            f"{self._n_ctx}", hint="shorten the prompt, ask for fewer tokens (-n) or raise --ctx")
        sampler = None
        if temperature > 0:
            rng = np.random.default_rng(seed)

            def sampler(_i: int, row: np.ndarray) -> int:
                top = np.argpartition(row, -SAMPLING_TOP_K)[-SAMPLING_TOP_K:] if len(row) > SAMPLING_TOP_K else np.arange(len(row))
                z = row[top].astype(np.float64) / temperature
                p = np.exp(z - z.max())
                return int(top[rng.choice(len(top), p=p / p.sum())])

        t0 = time.perf_counter()
        new, _ = self.greedy_many([tokens], max_tokens, keep_logits=0, sampler=sampler)[0]
        dt = time.perf_counter() - t0
        text = self.detokenize(new)
        for s in stop or ():
            if s and s in text:
                text = text[: text.index(s)]
        return Completion(text=text, n_prompt_tokens=len(tokens), n_tokens=len(new), seconds=dt)


def load(path_or_repo: str | os.PathLike, **llama_kwargs) -> Model:
    """Load a GGUF model (local path or ``hf://owner/repo[:file.gguf][@revision]`` on the Hugging Face Hub).

    Keyword arguments go to ``llama_cpp.Llama`` (``n_ctx``, ``n_gpu_layers``, ``type_k``, ...). The GGUF's
    default steering profile, if any, is in effect after loading (``Model.steering``).
    """
    return Model(path_or_repo, **llama_kwargs)
