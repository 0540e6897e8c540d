"""Physically remove routed experts from a GGUF: ``edge-mote prune``.

Every expert-indexed tensor of a MoE layer (``*_exps`` weights and biases, the router ``ffn_gate_inp``, DeepSeek's
``exp_probs_b``) has the expert as its outermost axis, and in a quantized tensor each expert is a contiguous run of
whole quant blocks: removing experts is slicing bytes, bit-exact, with no requantization (prune the quantized file;
re-quantizing a pruned F32 file can pick other types, e.g. llama.cpp's Q4_K_M special-cases ``n_expert == 8``).
``expert_count`` is rewritten and the stored steering profiles are renumbered.

A pruned file computes what the unpruned file computes with the same experts switched OFF (router logit -inf,
gating over the rest): that is the test oracle. llama.cpp has one ``expert_count`` per model, so the same number of
experts goes from every MoE layer; every invalid request is refused before anything is written:

* an uneven count per layer, an expert out of range or in a dense layer;
* fewer experts left than a token is routed to (``expert_used_count``);
* DeepSeek expert groups: the same number must go from every group of a layer (an uneven drop loads but selects
  from the wrong groups), at least 2 must stay per group (llama.cpp scores a group by its top 2), and the groups a
  token may use must still hold ``expert_used_count`` experts;
* a stored profile that steers a removed expert (``--protect-profile`` keeps its experts when choosing by
  saliency), or one that no longer fits the smaller layer.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import EdgeMoteError, UserError
from ..fileio import atomic_output, check_output
from ..steering import Steering, format_ranges
from .gguf_copy import KV, copy_gguf, field_value, kv_of_field, open_gguf

#: tensors whose outermost axis is the routed expert: expert FFNs (weights, biases), router weight/bias, DeepSeek's
#: selection bias. ``ffn_gate_inp_shexp`` (Qwen2-MoE's shared-expert gate) and ``*_shexp`` are not per expert.
EXPERT_TENSOR_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate_inp\.(?:weight|bias)|exp_probs_b\.bias|\w+_exps\.\w+)$")
ROUTER_RE = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")


@dataclass(frozen=True)
class MoeShape:
    """The routed-expert layout of a GGUF, read from its metadata and tensor names (no model load)."""

    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    moe_layers: tuple[int, ...]
    n_groups: int = 0
    n_group_used: int = 0

    @property
    def per_group(self) -> int:
        return self.n_expert // self.n_groups if self.n_groups > 1 else self.n_expert

    def used(self) -> dict[int, int]:
        return {l: self.n_expert_used for l in self.moe_layers}


def moe_shape(reader) -> MoeShape:
    from gguf import Keys

    arch = field_value(reader, Keys.General.ARCHITECTURE)
    if arch is None:
        raise UserError("the file has no general.architecture: not a llama.cpp model")
    arch = str(arch)

    def get(key, default=0):
        v = field_value(reader, key.format(arch=arch))
        return default if v is None else int(v)

    n_layer = get(Keys.LLM.BLOCK_COUNT)
    moe = sorted({int(m.group(1)) for t in reader.tensors if (m := ROUTER_RE.match(t.name))})
    return MoeShape(arch=arch, n_layer=n_layer, n_expert=get(Keys.LLM.EXPERT_COUNT),
                    n_expert_used=get(Keys.LLM.EXPERT_USED_COUNT), moe_layers=tuple(moe),
                    n_groups=get(Keys.LLM.EXPERT_GROUP_COUNT), n_group_used=get(Keys.LLM.EXPERT_GROUP_USED_COUNT))


@dataclass(frozen=True)
class PrunePlan:
    """Which experts go from every MoE layer, checked against the model and its profiles."""

    shape: MoeShape
    drop: dict[int, tuple[int, ...]]          # MoE layer -> removed experts (sorted)
    keep: dict[int, tuple[int, ...]] = field(init=False)

    def __post_init__(self):
        keep = {l: tuple(e for e in range(self.shape.n_expert) if e not in set(self.drop[l])) for l in self.drop}
        object.__setattr__(self, "keep", keep)

    @property
    def n_expert_after(self) -> int:
        return self.shape.n_expert - len(next(iter(self.drop.values())))

    def new_index(self, layer: int, expert: int) -> int | None:
        """The expert's index in the pruned file, None if it is removed."""
        keep = self.keep.get(layer)
        if keep is None:
            return expert
        try:
            return keep.index(expert)
        except ValueError:
            return None

    def renumber(self, steering: Steering, name: str = "") -> Steering:
        """The same steering in the pruned file's numbering; a removed expert in it is a UserError."""
        def move(items, mode):
            out = []
            for l, e in sorted(items):
                ne = self.new_index(l, e)
                if ne is None:
                    raise UserError(f"profile '{name}' steers expert {l}:{e} ({mode}), which the pruning removes",
                                    hint=f"keep its experts with --protect-profile {name} (with --keep-ratio), "
                                         f"or remove the profile first: edge-mote profile rm")
                out.append((l, ne))
            return out

        bias = {}
        for (l, e), v in steering.bias.items():
            (key,) = move([(l, e)], "bias")
            bias[key] = v
        return Steering(off=move(steering.off, "off"), drop=move(steering.drop, "drop"), on=move(steering.on, "on"),
                        bias=bias, margin=steering.margin)


def _group_of(shape: MoeShape, expert: int) -> int:
    return expert // shape.per_group


def plan_prune(shape: MoeShape, drop: Iterable[tuple[int, int]]) -> PrunePlan:
    """Check a set of (layer, expert) to remove against llama.cpp's constraints; a UserError names the first
    problem."""
    if not shape.moe_layers or shape.n_expert <= 0:
        raise UserError(f"not a Mixture-of-Experts model (architecture '{shape.arch}' has no routed experts)")
    drop = sorted(set((int(l), int(e)) for l, e in drop))
    if not drop:
        raise UserError("nothing to prune: no experts given")
    moe = set(shape.moe_layers)
    per_layer: dict[int, list[int]] = {l: [] for l in shape.moe_layers}
    for l, e in drop:
        if l >= shape.n_layer:
            raise UserError(f"layer {l} is out of range: the model has {shape.n_layer} layers (0-{shape.n_layer - 1})")
        if l not in moe:
            raise UserError(f"layer {l} is a dense layer (no router); MoE layers: {format_ranges(sorted(moe))}")
        if e >= shape.n_expert:
            raise UserError(f"expert {e} is out of range: layer {l} has {shape.n_expert} routed experts "
                            f"(0-{shape.n_expert - 1})")
        per_layer[l].append(e)
    counts = {l: len(v) for l, v in per_layer.items()}
    if len(set(counts.values())) != 1:
        shown = ", ".join(f"layer {l}: {c}" for l, c in counts.items())
        raise UserError(f"llama.cpp has one expert count per model: the same number of experts must go from every "
                        f"MoE layer ({shown})", hint="drop as many experts from each MoE layer, or use --keep-ratio")
    c = next(iter(counts.values()))
    left = shape.n_expert - c
    k = shape.n_expert_used
    if left < k:
        raise UserError(f"{left} of {shape.n_expert} experts would be left per layer, but each token is routed to {k}: "
                        f"at most {shape.n_expert - k} can go")
    if shape.n_groups > 1:
        g, per = shape.n_groups, shape.per_group
        for l, es in per_layer.items():
            by_group = [0] * g
            for e in es:
                by_group[_group_of(shape, e)] += 1
            if len(set(by_group)) != 1:
                raise UserError(f"layer {l}: the experts form {g} groups of {per} (DeepSeek group routing) and the "
                                f"same number must go from every group (here {by_group})",
                                hint=f"drop a multiple of {g} experts per layer, as many from each group")
        left_per = left // g
        if left_per < 2:
            raise UserError(f"{left_per} expert(s) would be left per group: llama.cpp scores a group by its best 2 "
                            f"experts, so at least 2 must stay in each of the {g} groups")
        if g >= left:
            raise UserError(f"{left} experts would be left for {g} groups: llama.cpp needs more experts than groups")
        if shape.n_group_used * left_per < k:
            raise UserError(f"a token may use {shape.n_group_used} groups of {left_per} experts after pruning, "
                            f"fewer than the {k} it is routed to")
    return PrunePlan(shape, {l: tuple(sorted(v)) for l, v in per_layer.items()})


def select_by_saliency(shape: MoeShape, scores: Mapping[int, np.ndarray], keep_ratio: float,
                       protected: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """The experts to remove: per MoE layer the lowest-scoring ones, so that ``keep_ratio`` of the experts stay
    (rounded to a whole number per group for DeepSeek groups, never below ``expert_used_count``); protected
    experts never go. Ties go to the lower index (stable)."""
    if not 0.0 < keep_ratio < 1.0:
        raise UserError(f"--keep-ratio must be between 0 and 1 (exclusive), got {keep_ratio}")
    n = shape.n_expert
    groups = shape.n_groups if shape.n_groups > 1 else 1
    per = n // groups
    keep_per_group = max(1, int(round(keep_ratio * n / groups)))
    if groups > 1:
        keep_per_group = max(keep_per_group, 2)
    n_keep = keep_per_group * groups
    n_keep = max(n_keep, -(-shape.n_expert_used // groups) * groups)
    keep_per_group = n_keep // groups
    if n_keep >= n:
        raise UserError(f"--keep-ratio {keep_ratio} keeps all {n} experts of a layer: nothing to prune")
    protected = set(protected)
    out = []
    for l in shape.moe_layers:
        s = np.asarray(scores[l], dtype=np.float64)
        for g in range(groups):
            members = list(range(g * per, (g + 1) * per))
            cands = [e for e in members if (l, e) not in protected]
            need = per - keep_per_group
            if len(cands) < need:
                raise UserError(f"layer {l}: {per - len(cands)} protected experts"
                                + (f" in group {g}" if groups > 1 else "")
                                + f" leave too few to remove {need}", hint="raise --keep-ratio")
            order = sorted(cands, key=lambda e: (s[e], e))
            out += [(l, e) for e in order[:need]]
    return out


@dataclass(frozen=True)
class PruneResult:
    source: str
    output: str
    n_expert_before: int
    n_expert_after: int
    dropped: dict[int, tuple[int, ...]]
    bytes_before: int
    bytes_after: int
    expert_bytes_before: int
    expert_bytes_after: int
    profiles: tuple[str, ...]
    saliency: str | None
    seconds: float

    def to_dict(self) -> dict:
        return {"source": self.source, "output": self.output, "n_expert_before": self.n_expert_before,
                "n_expert_after": self.n_expert_after,
                "dropped": {str(l): list(v) for l, v in self.dropped.items()},
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "expert_bytes_before": self.expert_bytes_before, "expert_bytes_after": self.expert_bytes_after,
                "profiles": list(self.profiles), "saliency": self.saliency, "seconds": round(self.seconds, 3)}


def expert_tensor_layer(name: str) -> int | None:
    m = EXPERT_TENSOR_RE.match(name)
    return int(m.group(1)) if m else None


def prune_model(src: str | os.PathLike, dst: str | os.PathLike, *, drop: Iterable[tuple[int, int]] | None = None,
                keep_ratio: float | None = None, calib: str | os.PathLike | None = None,
                protect: Sequence[str] = (), saliency: str = "reap", raw: bool = False, seed: int = 0,
                n_threads: int | None = None, progress: bool = False) -> PruneResult:
    """Write ``dst``: ``src`` without the experts ``drop`` lists, or without the least salient ones so that
    ``keep_ratio`` of each layer's experts stay (saliency measured on the ``calib`` prompts, see ``saliency``).
    Everything is checked before anything is written; the output is atomic and never the input."""
    from ..gguf_meta import keys as K
    from ..gguf_meta.profiles import profile_metadata, read_profiles

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_output(dst, inputs=[src])
    if (drop is None) == (keep_ratio is None):
        raise UserError("give either --drop L:E,... or --keep-ratio R (with --calib prompts)")
    drop = None if drop is None else [(int(l), int(e)) for l, e in drop]
    reader = open_gguf(src)
    shape = moe_shape(reader)
    if not shape.moe_layers:
        raise UserError(f"{src.name} is not a Mixture-of-Experts model (no router tensors)")
    profiles, default = read_profiles(reader)
    for name in protect:
        if name not in profiles:
            raise UserError(f"--protect-profile {name}: no such profile in {src.name}",
                            hint="profiles: " + (", ".join(profiles) or "none stored"))
    method = None
    if keep_ratio is not None:
        if calib is None:
            raise UserError("--keep-ratio needs --calib prompts.jsonl (the prompts saliency is measured on)")
        from .saliency import measure_saliency

        protected = {ex for name in protect for ex in profiles[name].steering.experts}
        if not 0.0 < keep_ratio < 1.0:
            raise UserError(f"--keep-ratio must be between 0 and 1 (exclusive), got {keep_ratio}")
        scores = measure_saliency(src, calib, method=saliency, raw=raw, seed=seed, n_threads=n_threads,
                                  progress=progress)
        drop = select_by_saliency(shape, scores, keep_ratio, protected)
        method = saliency
    else:
        hit = [(n, ex) for n in protect for ex in profiles[n].steering.experts if ex in set(drop)]
        if hit:
            n, (l, e) = hit[0]
            raise UserError(f"--drop removes expert {l}:{e}, which protected profile '{n}' steers")
    plan = plan_prune(shape, drop)
    new_profiles = {}
    for name, prof in profiles.items():
        st = plan.renumber(prof.steering, name)
        try:
            st.check(shape.n_layer, plan.n_expert_after, shape.moe_layers, shape.used())
        except UserError as e:
            raise UserError(f"profile '{name}' does not fit the pruned model: {e}") from None
        new_profiles[name] = type(prof)(name, st, prof.description)

    from gguf import Keys

    count_key = Keys.LLM.EXPERT_COUNT.format(arch=shape.arch)
    kv = kv_of_field(reader.fields[count_key])
    replace = {count_key: KV(count_key, plan.n_expert_after, kv.vtype)}
    has_meta = field_value(reader, K.VERSION) is not None
    extra = [KV(*row) for row in profile_metadata(new_profiles, default)] if has_meta else []
    keep_idx = {l: np.asarray(v, dtype=np.int64) for l, v in plan.keep.items()}
    expert_before = expert_after = 0

    def transform(t):
        nonlocal expert_before, expert_after
        layer = expert_tensor_layer(t.name)
        if layer is None or layer not in keep_idx:
            return None
        if t.data.shape[0] != shape.n_expert:
            raise EdgeMoteError(f"{t.name}: outermost axis {t.data.shape[0]} is not the expert count "
                                f"{shape.n_expert}; this layout is not supported")
        out = t.data[keep_idx[layer]]
        expert_before += int(t.data.nbytes)
        expert_after += int(out.nbytes)
        return out

    with atomic_output(dst, inputs=[src]) as tmp:
        copy_gguf(reader, tmp, replace=replace, drop=lambda k: has_meta and k.startswith(K.PREFIX), extra=extra,
                  transform=transform, progress=progress, desc="pruning")
    return PruneResult(str(src), str(dst), shape.n_expert, plan.n_expert_after, plan.drop, src.stat().st_size,
                       dst.stat().st_size, expert_before, expert_after, tuple(new_profiles), method,
                       time.perf_counter() - t0)
