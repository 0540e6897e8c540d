"""Independent transformers reference for steered MoE routing.

This module shares no code with llama.cpp or with edge-mote's runtime: it re-implements the router
forward of each supported transformers architecture, adds the steering, and runs the unmodified
transformers model around it. Tests compare the patched llama.cpp against it.

Steering inputs, per decoder layer ``il`` (HF decoder-layer index == llama.cpp ``blk.<il>``) and
routed expert ``e``:

* ``state[il, e]`` (int8): :data:`DEFAULT` (0), :data:`OFF` (1), :data:`ON` (2), :data:`DROP` (3);
* ``bias[il, e]`` (float32): added to the router logit.

Semantics, per token, in this order:

1. ``logits`` = the router's logits (for gpt-oss including the router's own bias);
2. ``logits[e] += bias[e]``;
3. OFF: ``logits[e] = -inf``; ON: ``logits[e] = max_j(logits[j]) + margin`` where the max runs over
   the logits after step 2 and the OFF masking (all ON experts get the same value);
4. selection score: the arch's usual one computed from these logits (softmax probabilities;
   DeepSeek: ``sigmoid + e_score_correction_bias``; gpt-oss: the logits), then ``-inf`` for OFF
   and ``+inf`` for ON experts. For DeepSeek this happens before group scoring, so an OFF expert
   is never selected and an ON expert's group is always kept (a group holding an ON expert scores
   ``+inf``);
5. the arch's usual top-k on the selection score (top-k stays k);
6. gate weights: the arch's usual weights of the selected experts from the modified logits
   (softmax over all experts / sigmoid / softmax over the k selected logits); DROP experts among
   the selected get weight 0 (gpt-oss: logit ``-inf`` before the post-top-k softmax) *before* the
   arch's usual normalisation; then the arch's usual normalisation and routed scaling. In a row with
   a DROP, a renormalising arch divides by ``max(sum, 2^-14)`` (``routers.DROP_NORM_FLOOR``, llama.cpp's
   guard): dropping the experts that carry a token does not amplify the near-zero weights of the rest.

Returned routing uses **rows sorted by expert id, ascending** (ids and weights permuted together).
If every selected expert of a token is dropped, its routed weights are all 0 (no NaN).

Rejected inputs (``ValueError``): more ON experts in a layer than ``k``; for DeepSeek, ON experts
spread over more groups than ``topk_group``; steering that leaves fewer than ``k`` selectable
experts for some token. State and bias rows of dense (non-MoE) layers are ignored.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from .routers import NEG_INF as _NEG_INF
from .routers import POS_INF as _POS_INF
from .routers import ROUTER_SPECS, spec_forward, stock_ids_weights
from .routers import LayerRecord as _LayerRecord
from .routers import LayerSteer as _LayerSteer
from .routers import check_selection as _check_selection
from .routers import force_selection as _force_selection
from .routers import safe_normalise as _safe_normalise
from .routers import selection_gap as _gap
from .routers import steer_logits as _steer_logits

__all__ = [
    "DEFAULT",
    "OFF",
    "ON",
    "DROP",
    "ROUTER_CLASSES",
    "load_reference_model",
    "router_modules",
    "moe_shape",
    "reference_forward",
    "routing_gaps",
    "check_default_matches_stock",
]

DEFAULT: Final[int] = 0
OFF: Final[int] = 1
ON: Final[int] = 2
DROP: Final[int] = 3

#: transformers router class name -> gating family re-implemented here.
ROUTER_CLASSES: Final[dict[str, str]] = {
    "Qwen3MoeTopKRouter": "softmax",
    "Qwen2MoeTopKRouter": "softmax",
    "OlmoeTopKRouter": "softmax",
    "MixtralTopKRouter": "mixtral",
    "DeepseekV3TopkRouter": "deepseek",
    "Glm4MoeTopkRouter": "deepseek",  # same routing code as DeepSeek-V3
    "Dots1TopkRouter": "deepseek",
    "Glm4MoeLiteTopkRouter": "deepseek",
    "SolarOpenTopkRouter": "deepseek",
    "GptOssTopKRouter": "gptoss",
}


def load_reference_model(hf_dir: Path) -> torch.nn.Module:
    """Load a transformers causal LM in float32 with eager attention and eager experts, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model.eval()
    return model


def router_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Map each MoE decoder-layer index to its router module (one of :data:`ROUTER_CLASSES`)."""
    layers = model.model.layers  # type: ignore[union-attr]
    out: dict[int, torch.nn.Module] = {}
    for il, layer in enumerate(layers):
        for child in layer.modules():
            if type(child).__name__ in ROUTER_CLASSES or type(child).__name__ in ROUTER_SPECS:
                out[il] = child
                break
    if not out:
        raise ValueError(f"{type(model).__name__}: no supported MoE router found")
    return out


def moe_shape(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(n_layer, n_expert)``: decoder layers and routed experts per MoE layer."""
    routers = router_modules(model)
    n_expert = {int(r.num_experts) for r in routers.values()}
    if len(n_expert) != 1:
        raise ValueError(f"MoE layers disagree on the expert count: {sorted(n_expert)}")
    return len(model.model.layers), n_expert.pop()  # type: ignore[union-attr]


def _softmax_router_forward(family: str, s: _LayerSteer, rec: _LayerRecord) -> Callable[..., Any]:
    """Router forward for Qwen3Moe / Qwen2Moe / Olmoe (``softmax``) and Mixtral (``mixtral``)."""

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # (seq_len, num_experts)
        logits = _steer_logits(router_logits, s)
        if family == "mixtral":
            probs = torch.nn.functional.softmax(logits.float(), dim=-1)
            normalise = True
        else:
            probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
            normalise = bool(self.norm_topk_prob)
        sel = _force_selection(probs, s)
        _, idx = torch.topk(sel, self.top_k, dim=-1)
        _check_selection(sel, idx)
        weights = probs.gather(1, idx)
        weights = torch.where(s.drop[idx], torch.zeros_like(weights), weights)
        if normalise:
            weights = _safe_normalise(weights, dropped=s.drop[idx].any(dim=-1))
        if family != "mixtral":
            weights = weights.to(router_logits.dtype)
        rec.ids.append(idx.detach().clone())
        rec.weights.append(weights.detach().clone())
        rec.gaps.append(_gap(sel, self.top_k))
        rec.log_gaps.append(_gap(_force_selection(logits, s), self.top_k))
        return logits, weights, idx

    return forward


def _deepseek_router_forward(s: _LayerSteer, rec: _LayerRecord) -> Callable[..., Any]:
    """Router forward for DeepSeek-V3 (sigmoid scores, noaux_tc group-limited top-k)."""

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        logits = _steer_logits(router_logits, s)
        scores = logits.sigmoid()
        scores_for_choice = _force_selection(scores + self.e_score_correction_bias, s)
        n_group = self.num_group
        per_group = self.num_experts // n_group
        group_scores = scores_for_choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        # A group holding an ON expert is always kept (+inf, also where +inf + -inf gave NaN).
        group_has_on = s.on.view(n_group, per_group).any(dim=-1)
        group_scores = torch.where(group_has_on, torch.full_like(group_scores, _POS_INF), group_scores)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, self.num_experts)
        masked = scores_for_choice.masked_fill(~score_mask.bool(), _NEG_INF)
        topk_indices = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1]
        _check_selection(masked, topk_indices)
        topk_weights = scores.gather(1, topk_indices)
        topk_weights = torch.where(s.drop[topk_indices], torch.zeros_like(topk_weights), topk_weights)
        if self.norm_topk_prob:
            topk_weights = _safe_normalise(topk_weights, eps=1e-20, dropped=s.drop[topk_indices].any(dim=-1))
        topk_weights = topk_weights * self.routed_scaling_factor
        rec.ids.append(topk_indices.detach().clone())
        rec.weights.append(topk_weights.detach().clone())
        rec.gaps.append(min(_gap(masked, self.top_k), _gap(group_scores, self.topk_group)))
        rec.log_gaps.append(rec.gaps[-1])
        return logits, topk_weights, topk_indices

    return forward


def _gptoss_router_forward(s: _LayerSteer, rec: _LayerRecord) -> Callable[..., Any]:
    """Router forward for gpt-oss (top-k of biased logits, softmax over the k selected)."""

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        router_logits = F.linear(hidden_states, self.weight, self.bias)  # (num_tokens, num_experts)
        logits = _steer_logits(router_logits, s)
        sel = _force_selection(logits, s)
        _, router_indices = torch.topk(sel, self.top_k, dim=-1)
        _check_selection(sel, router_indices)
        router_top_value = logits.gather(1, router_indices)
        router_top_value = torch.where(
            s.drop[router_indices], torch.full_like(router_top_value, _NEG_INF), router_top_value
        )
        router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        router_scores = torch.where(torch.isnan(router_scores), torch.zeros_like(router_scores), router_scores)
        rec.ids.append(router_indices.detach().clone())
        rec.weights.append(router_scores.detach().clone())
        rec.gaps.append(_gap(sel, self.top_k))
        rec.log_gaps.append(rec.gaps[-1])
        return logits, router_scores, router_indices

    return forward


def _make_forward(router: torch.nn.Module, s: _LayerSteer, rec: _LayerRecord) -> Callable[..., Any]:
    """Select the re-implemented forward for ``router``'s class."""
    if type(router).__name__ in ROUTER_SPECS:
        return spec_forward(ROUTER_SPECS[type(router).__name__], s, rec)
    family = ROUTER_CLASSES[type(router).__name__]
    if family in ("softmax", "mixtral"):
        return _softmax_router_forward(family, s, rec)
    if family == "deepseek":
        return _deepseek_router_forward(s, rec)
    return _gptoss_router_forward(s, rec)


def _layer_steers(
    model: torch.nn.Module, state: np.ndarray, bias: np.ndarray, margin: float
) -> dict[int, _LayerSteer]:
    """Validate the steering arrays and split them per MoE layer."""
    n_layer, n_expert = moe_shape(model)
    state = np.asarray(state)
    bias = np.asarray(bias)
    if state.shape != (n_layer, n_expert) or bias.shape != (n_layer, n_expert):
        raise ValueError(
            f"state {state.shape} and bias {bias.shape} must both be (n_layer, n_expert) = {(n_layer, n_expert)}"
        )
    if not np.issubdtype(state.dtype, np.integer):
        raise ValueError(f"state must be an integer array, got {state.dtype}")
    if state.size and (int(state.min()) < DEFAULT or int(state.max()) > DROP):
        raise ValueError("state codes must be 0 (DEFAULT), 1 (OFF), 2 (ON) or 3 (DROP)")
    bias32 = bias.astype(np.float32)
    if not np.all(np.isfinite(bias32)):
        raise ValueError("bias must be finite")
    if not np.isfinite(margin):
        raise ValueError("margin must be finite")
    steers: dict[int, _LayerSteer] = {}
    for il, router in router_modules(model).items():
        row = torch.from_numpy(state[il].astype(np.int64))
        on = row == ON
        if int(on.sum()) > int(router.top_k):
            raise ValueError(f"layer {il}: {int(on.sum())} experts ON but only top-{router.top_k} are selected")
        if ROUTER_CLASSES.get(type(router).__name__) == "deepseek":
            groups_on = int(on.view(router.num_group, -1).any(dim=-1).sum())
            if groups_on > int(router.topk_group):
                raise ValueError(f"layer {il}: ON experts span {groups_on} groups > topk_group {router.topk_group}")
        steers[il] = _LayerSteer(
            off=row == OFF,
            on=on,
            drop=row == DROP,
            bias=torch.from_numpy(bias32[il].copy()),
            margin=float(margin),
        )
    return steers


@contextlib.contextmanager
def _patched_routers(
    model: torch.nn.Module, steers: dict[int, _LayerSteer]
) -> Iterator[dict[int, _LayerRecord]]:
    """Replace each router instance's ``forward`` for the duration of the block."""
    routers = router_modules(model)
    records = {il: _LayerRecord() for il in routers}
    try:
        for il, router in routers.items():
            router.forward = types.MethodType(_make_forward(router, steers[il], records[il]), router)
        yield records
    finally:
        for router in routers.values():
            if "forward" in router.__dict__:
                del router.forward


def _input_ids(token_ids: Sequence[int]) -> torch.Tensor:
    """A [1, n_tokens] int64 tensor from a non-empty token list."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids must not be empty")
    return torch.tensor([ids], dtype=torch.long)


def _sorted_routing(ids: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by expert id (ascending); return int32 ids and float32 weights."""
    order = torch.argsort(ids, dim=-1)
    ids_s = ids.gather(1, order)
    w_s = weights.gather(1, order)
    return ids_s.numpy().astype(np.int32), w_s.float().numpy().astype(np.float32)


def _run(
    model: torch.nn.Module,
    token_ids: Sequence[int],
    state: np.ndarray | None,
    bias: np.ndarray | None,
    margin: float,
) -> tuple[torch.Tensor, dict[int, _LayerRecord]]:
    """Forward ``token_ids`` through ``model`` with re-implemented, steered routers."""
    n_layer, n_expert = moe_shape(model)
    if state is None:
        state = np.zeros((n_layer, n_expert), dtype=np.int8)
    if bias is None:
        bias = np.zeros((n_layer, n_expert), dtype=np.float32)
    steers = _layer_steers(model, state, bias, margin)
    input_ids = _input_ids(token_ids)
    with torch.no_grad(), _patched_routers(model, steers) as records:
        out = model(input_ids=input_ids, use_cache=False)
    for il, rec in records.items():
        if len(rec.ids) != 1:
            raise RuntimeError(f"layer {il}: router ran {len(rec.ids)} times in one forward pass")
    return out.logits[0].detach().float(), records


def reference_forward(
    model: torch.nn.Module,
    token_ids: list[int],
    state: np.ndarray,
    bias: np.ndarray,
    margin: float = 0.01,
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Run ``token_ids`` (one sequence, no cache) through ``model`` with steered routing.

    Args:
        model: a transformers MoE causal LM (see :func:`load_reference_model`).
        token_ids: the tokens, evaluated as one sequence from position 0.
        state: int8 ``(n_layer, n_expert)`` steering codes (:data:`DEFAULT`, :data:`OFF`,
            :data:`ON`, :data:`DROP`); rows of dense layers are ignored.
        bias: float32 ``(n_layer, n_expert)`` additive router-logit bias.
        margin: how far above the per-token maximum logit an ON expert's logit is placed.

    Returns:
        ``(logits, routing)``: float32 logits ``[n_tokens, n_vocab]`` and, for each MoE layer index,
        ``(ids, weights)``: int32 selected expert ids ``[n_tokens, k]`` and float32 final gate
        weights ``[n_tokens, k]`` (the factors multiplying each routed expert's output, after
        normalisation and routed scaling); each row sorted by expert id, ascending.
    """
    logits, records = _run(model, token_ids, state, bias, margin)
    routing = {il: _sorted_routing(rec.ids[0], rec.weights[0]) for il, rec in records.items()}
    return logits.numpy().astype(np.float32), routing


def routing_gaps(
    model: torch.nn.Module,
    token_ids: list[int],
    state: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    margin: float = 0.01,
    log_space: bool = True,
) -> dict[int, float]:
    """Smallest selection-score gap per MoE layer over the tokens (unsteered by default).

    The gap is the k-th minus the (k+1)-th selection score, per token, minimised over tokens:

    * softmax archs (qwen3moe, qwen2moe, olmoe, mixtral): with ``log_space`` (default) between the
      (steered) router logits, i.e. log-probabilities -- softmax is monotonic and float noise on
      a probability is relative to it, so this is the margin that decides whether another
      engine's ~1e-6 noise can flip a choice; with ``log_space=False`` between probabilities;
    * DeepSeek-V3: between bias-corrected sigmoid scores within the kept groups, or between the
      last kept and first dropped group score, whichever is smaller;
    * gpt-oss: between the (router-biased, steered) logits.

    Gaps below ~1e-3 mean float noise could flip an expert choice.
    """
    _, records = _run(model, token_ids, state, bias, margin)
    return {il: (rec.log_gaps[0] if log_space else rec.gaps[0]) for il, rec in records.items()}


def _stock_routing(
    model: torch.nn.Module, input_ids: torch.Tensor
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Run the unmodified model, capturing each router's (weights, indices) with forward hooks."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for il, router in router_modules(model).items():
        if "forward" in router.__dict__:
            raise RuntimeError(f"layer {il}: router forward is already patched")

        def hook(_mod: torch.nn.Module, _inp: Any, out: Any, il: int = il) -> None:
            ids, weights = stock_ids_weights(_mod, out)
            captured[il] = (ids.detach().clone(), weights.detach().clone())

        handles.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0].detach().float(), captured


def check_default_matches_stock(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Assert that unsteered :func:`reference_forward` equals the stock transformers forward exactly.

    Compares the logits bit for bit and, per MoE layer, the selected expert ids and gate weights
    (both sorted by expert id). Raises ``AssertionError`` describing the first difference.
    """
    n_layer, n_expert = moe_shape(model)
    state = np.zeros((n_layer, n_expert), dtype=np.int8)
    bias = np.zeros((n_layer, n_expert), dtype=np.float32)
    ref_logits, ref_routing = reference_forward(model, token_ids, state, bias)
    stock_logits, stock = _stock_routing(model, _input_ids(token_ids))
    if set(stock) != set(ref_routing):
        raise AssertionError(f"MoE layers differ: stock {sorted(stock)} vs reference {sorted(ref_routing)}")
    for il, (ids, weights) in stock.items():
        s_ids, s_w = _sorted_routing(ids, weights)
        r_ids, r_w = ref_routing[il]
        if not np.array_equal(s_ids, r_ids):
            raise AssertionError(f"layer {il}: selected experts differ from the stock router")
        if not np.array_equal(s_w, r_w):
            diff = float(np.max(np.abs(s_w - r_w)))
            raise AssertionError(f"layer {il}: gate weights differ from the stock router (max {diff:.3g})")
    stock_np = stock_logits.numpy().astype(np.float32)
    if not np.array_equal(stock_np, ref_logits):
        diff = float(np.max(np.abs(stock_np - ref_logits)))
        raise AssertionError(f"logits differ from the stock forward (max abs diff {diff:.3g})")
