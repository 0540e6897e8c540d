"""Steered router forwards for the transformers MoE architectures, described by a :class:`RouterSpec` each.

The primitives (bias/OFF/ON on logits, forced selection, gaps, safe normalisation) are shared with
tests/oracle/reference.py, which documents the steering semantics. Each spec re-implements its transformers router's
forward operation for operation, so that unsteered it equals the stock forward bit for bit
(``check_default_matches_stock``), and adds the steering at the same places as the patched llama.cpp:

* logits: ``+ bias``, OFF ``-inf``, ON ``max + margin`` (before the gating function);
* selection score (probs, ``probs + correction`` or, for top-k-then-softmax / Llama 4, the logits): OFF ``-inf``,
  ON ``+inf``;
* gate weights of DROP experts: 0 before the arch's normalisation (softmax over the selected logits: ``-inf``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import torch.nn.functional as F

NEG_INF: Final[float] = float("-inf")
POS_INF: Final[float] = float("inf")


@dataclass
class LayerSteer:
    """Steering of one MoE layer as torch tensors."""

    off: torch.Tensor  # bool [n_expert]
    on: torch.Tensor  # bool [n_expert]
    drop: torch.Tensor  # bool [n_expert]
    bias: torch.Tensor  # float32 [n_expert]
    margin: float


@dataclass
class LayerRecord:
    """What a patched router saw and chose in one forward pass."""

    ids: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # in the space top-k is taken in
    log_gaps: list[float] = field(default_factory=list)  # softmax archs: between logits


def steer_logits(logits: torch.Tensor, s: LayerSteer) -> torch.Tensor:
    """Apply bias, OFF and ON to router logits [n_tokens, n_expert] (identity for no steering)."""
    x = logits + s.bias.to(logits.dtype)
    x = torch.where(s.off, torch.full_like(x, NEG_INF), x)
    if bool(s.on.any()):
        row_max = x.max(dim=-1, keepdim=True).values + s.margin
        x = torch.where(s.on, row_max.expand_as(x), x)
    return x


def force_selection(score: torch.Tensor, s: LayerSteer) -> torch.Tensor:
    """Selection score with OFF experts at -inf and ON experts at +inf."""
    score = torch.where(s.off, torch.full_like(score, NEG_INF), score)
    return torch.where(s.on, torch.full_like(score, POS_INF), score)


def check_selection(sel: torch.Tensor, idx: torch.Tensor) -> None:
    """Raise if a selected expert was not selectable (steering left fewer than k candidates)."""
    if bool(torch.isneginf(sel.gather(1, idx)).any()):
        raise ValueError("steering leaves fewer than k selectable experts for some token")


def selection_gap(sel: torch.Tensor, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th selection score over the tokens."""
    if sel.shape[-1] <= k:
        return POS_INF
    top = torch.topk(sel, k + 1, dim=-1).values
    gaps = top[:, k - 1] - top[:, k]
    gaps = torch.where(torch.isnan(gaps), torch.full_like(gaps, POS_INF), gaps)
    return float(gaps.min()) if gaps.numel() else POS_INF


#: After a DROP, the remaining selected weights are renormalised by ``max(sum, DROP_NORM_FLOOR)``: llama.cpp's
#: normalisation guard (2^-14, the smallest normal F16), so that dropping the experts that carry a token's routing
#: does not blow up the near-zero weights of the others. Rows without a DROP use the arch's own normalisation.
DROP_NORM_FLOOR: Final[float] = 6.103515625e-5


def safe_normalise(
    w: torch.Tensor, eps: float = 0.0, clamp: float | None = None, dropped: torch.Tensor | None = None
) -> torch.Tensor:
    """``w / denom`` with ``denom = sum + eps`` (or ``max(sum, clamp)``); all-zero rows stay zero.

    ``dropped`` (bool [n_tokens]): rows where a selected expert was DROPped use ``max(sum, DROP_NORM_FLOOR)``.
    """
    total = w.sum(dim=-1, keepdim=True)
    denom = torch.clamp(total, min=clamp) if clamp is not None else (total + eps if eps else total)
    if dropped is not None and bool(dropped.any()):
        denom = torch.where(dropped.unsqueeze(-1), torch.clamp(total, min=DROP_NORM_FLOOR), denom)
    return torch.where(total > 0, w / denom, torch.zeros_like(w))


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class RouterSpec:
    """The routing of one transformers router class.

    gating: ``softmax``, ``sigmoid``, ``topk_softmax`` (top-k of the logits, softmax over the k selected) or
    ``llama4`` (top-k of the logits, sigmoid of the selected, returned as a dense ``[n_tokens, n_expert]`` score).
    """

    gating: str
    weight: str = "weight"  # dotted attribute of the router weight
    f32: bool = False  # logits from float32 inputs and weights
    correction: str | None = None  # selection bias added to the probs: "arg" (forward's 2nd argument) or an attribute
    norm: bool | str = False  # normalise the selected weights (or: the attribute that says whether)
    norm_eps: float = 0.0
    norm_clamp: str | None = None  # attribute: lower bound of the normalisation denominator
    scaling: str | None = None  # attribute: routed scaling factor


#: transformers router class name -> its spec (the six original architectures are in reference.py).
ROUTER_SPECS: Final[dict[str, RouterSpec]] = {
    "Qwen3NextTopKRouter": RouterSpec("softmax", norm="norm_topk_prob"),
    "Qwen3_5MoeTopKRouter": RouterSpec("softmax", norm=True),
    "HunYuanMoEV1Gate": RouterSpec("softmax", weight="wg.weight", f32=True, norm=True),
    "Ernie4_5_MoeTopKRouter": RouterSpec("softmax", f32=True, correction="moe_statics.e_score_correction_bias",
                                         norm=True, norm_clamp="norm_min"),
    "JambaTopKRouter": RouterSpec("softmax"),
    "MiniMaxTopKRouter": RouterSpec("softmax", norm=True),
    "DeepseekV2TopkRouter": RouterSpec("softmax", f32=True, scaling="routed_scaling_factor"),
    "GraniteMoeTopKRouter": RouterSpec("topk_softmax"),
    "GraniteMoeSharedTopKRouter": RouterSpec("topk_softmax"),
    "GraniteMoeHybridTopKRouter": RouterSpec("topk_softmax"),
    "GraniteMoeSWATopKRouter": RouterSpec("topk_softmax"),
    "MellumTopKRouter": RouterSpec("softmax", norm="norm_topk_prob"),
    "Lfm2MoeTopKRouter": RouterSpec("sigmoid", correction="arg", norm="norm_topk_prob", norm_eps=1e-6,
                                    scaling="routed_scaling_factor"),
    "MiniMaxM2TopKRouter": RouterSpec("sigmoid", correction="arg", norm=True),
    "Llama4Router": RouterSpec("llama4"),
}


def stock_ids_weights(router: torch.nn.Module, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) [n_tokens, k] from the stock router forward's output."""
    if type(router).__name__ == "Llama4Router":
        scores, logits = out
        ids = torch.topk(logits, router.top_k, dim=1)[1]
        return ids, scores.gather(1, ids)
    return out[2], out[1]


def spec_forward(spec: RouterSpec, s: LayerSteer, rec: LayerRecord) -> Callable[..., Any]:
    """The steered forward of a router described by ``spec``."""

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
        w = _attr(self, spec.weight)
        h = hidden_states.reshape(-1, w.shape[1])
        router_logits = F.linear(h.float(), w.float()) if spec.f32 else F.linear(h, w)
        k = int(self.top_k)
        x = steer_logits(router_logits, s)
        if spec.gating in ("topk_softmax", "llama4"):
            sel = force_selection(x, s)
            top_x, idx = torch.topk(sel, k, dim=-1)
            check_selection(sel, idx)
            top_x = x.gather(1, idx)
            if spec.gating == "topk_softmax":
                # = softmax over all experts, the selected renormalised (llama.cpp: SOFTMAX gating + norm_w); rows
                # with a DROP: the selected probabilities with the dropped at 0, renormalised (DROP_NORM_FLOOR)
                weights = torch.softmax(top_x.float(), dim=-1).type_as(h)
                dropped = s.drop[idx].any(dim=-1)
                if bool(dropped.any()):
                    kept = torch.softmax(x.float(), dim=-1).gather(1, idx)
                    kept = torch.where(s.drop[idx], torch.zeros_like(kept), kept)
                    kept = safe_normalise(kept, dropped=dropped).type_as(h)
                    weights = torch.where(dropped.unsqueeze(-1), kept, weights)
            else:
                weights = torch.sigmoid(top_x.float()).to(top_x.dtype)
                weights = torch.where(s.drop[idx], torch.zeros_like(weights), weights)
            gap = selection_gap(sel, k)
            log_gap = gap
        else:
            probs = torch.softmax(x, dim=-1, dtype=torch.float) if spec.gating == "softmax" else torch.sigmoid(x.float())
            score = probs
            if spec.correction is not None:
                corr = args[0] if spec.correction == "arg" else _attr(self, spec.correction)
                if corr is not None:
                    score = probs + corr
            sel = force_selection(score, s)
            idx = torch.topk(sel, k, dim=-1)[1]
            check_selection(sel, idx)
            weights = probs.gather(1, idx)
            weights = torch.where(s.drop[idx], torch.zeros_like(weights), weights)
            norm = spec.norm if isinstance(spec.norm, bool) else bool(getattr(self, spec.norm))
            if norm:
                clamp = float(getattr(self, spec.norm_clamp)) if spec.norm_clamp else None
                weights = safe_normalise(weights, spec.norm_eps, clamp, dropped=s.drop[idx].any(dim=-1))
            if spec.scaling is not None:
                weights = weights * getattr(self, spec.scaling)
            weights = weights.to(router_logits.dtype)
            gap = selection_gap(sel, k)
            log_gap = selection_gap(force_selection(x, s), k) if spec.correction is None and spec.gating == "softmax" else gap
        rec.ids.append(idx.detach().clone())
        rec.weights.append(weights.detach().clone())
        rec.gaps.append(gap)
        rec.log_gaps.append(log_gap)
        if spec.gating == "llama4":
            dense = torch.zeros_like(router_logits).scatter_(1, idx, weights)
            return dense, router_logits
        return router_logits, weights, idx

    return forward
