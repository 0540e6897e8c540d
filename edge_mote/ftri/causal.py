"""The scan's causal check: re-rank the statistical top candidates by what switching each one OFF does.

The fTRI statistics rank experts by how much more often the behaviour prompts select them (risk difference, then
z, then the gate-weight contrast ``dw``). An expert can be selected more for a behaviour without carrying it (it is
co-selected with the one that does), and several experts can tie exactly (the model organism's refusal experts
of three layers all have rd = 1.00; which two come first then rested on ``dw`` differences in the third decimal,
and the wrong pair leaves most of the refusal in place). The causal check measures instead, for each of the top
``k`` candidates alone:

    effect = mean KL(unsteered || expert OFF) of the next-token distribution at the decision position (the last
             prompt token) over behaviour prompts  -  the same mean over control prompts
    score  = rd x effect

i.e. how much switching the expert OFF moves the model's decision on the behaviour, beyond what it moves on
everything else, weighted by how much more often the behaviour selects it (its risk difference): an expert that
every prompt selects (rd ~ 0) and whose removal disrupts everything is not the behaviour's carrier even if the
disruption is larger on behaviour prompts (organism seed 1: layer 0's expert 0:3, rd 0.02, effect 0.39 with KL 0.29
on control prompts, ranked second by effect alone; switched OFF with the top one it cut refusal to 0 but cost a
first-token KL of 0.36 on neutral prompts). The candidates are re-ordered by score (largest first; scores equal to 6
decimals tie and keep the statistical order, as batched decodes differ by ~1e-9 in KL), the
experts below them keep their statistical order. Cost: ``(k + 1) x`` one prompt pass over ``causal_prompts`` (64) prompts of
each set (evenly spaced through the set), on the Model's batched decode surface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..evaluate.metrics import kl_divergence, log_softmax
from ..steering import Steering

__all__ = ["CausalCheck", "causal_check", "subsample"]

DEFAULT_PROMPTS = 64
TIE_DECIMALS = 6  # effects equal to 6 decimals tie (batched decodes differ by ~1e-9 in KL): statistical order


@dataclass(frozen=True)
class CausalCheck:
    """The measured effect of switching each candidate OFF alone (see the module docstring)."""

    candidates: tuple[tuple[int, int], ...]     # (layer, expert), in the statistical order
    rd: tuple[float, ...]                       # their risk differences
    kl_behavior: tuple[float, ...]
    kl_control: tuple[float, ...]
    n_behavior: int                             # prompts measured per set
    n_control: int

    @property
    def effect(self) -> tuple[float, ...]:
        return tuple(b - c for b, c in zip(self.kl_behavior, self.kl_control))

    @property
    def score(self) -> tuple[float, ...]:
        return tuple(r * ef for r, ef in zip(self.rd, self.effect))

    def order(self) -> list[tuple[int, int]]:
        """The candidates, largest score first (ties: statistical order)."""
        sc = self.score
        idx = sorted(range(len(self.candidates)), key=lambda i: (-round(sc[i], TIE_DECIMALS), i))
        return [self.candidates[i] for i in idx]

    def record(self, layer: int, expert: int) -> dict[str, float] | None:
        try:
            i = self.candidates.index((layer, expert))
        except ValueError:
            return None
        return {"effect": self.effect[i], "score": self.score[i], "kl_behavior": self.kl_behavior[i],
                "kl_control": self.kl_control[i]}

    def to_dict(self) -> dict[str, Any]:
        return {"k": len(self.candidates), "n_behavior": self.n_behavior, "n_control": self.n_control,
                "measure": "effect = mean KL(unsteered || OFF) at the decision position, behaviour minus control; "
                           "score = rd x effect",
                "candidates": [{"layer": l, "expert": e, "score": float(f"{s:.9g}"), "effect": float(f"{ef:.9g}"),
                                "kl_behavior": float(f"{b:.9g}"), "kl_control": float(f"{c:.9g}")}
                               for (l, e), s, ef, b, c in zip(self.candidates, self.score, self.effect,
                                                               self.kl_behavior, self.kl_control)]}


def subsample(items: Sequence, n: int) -> list:
    """At most ``n`` items, evenly spaced through ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _off(base: Steering, expert: tuple[int, int]) -> Steering:
    try:
        return base | Steering(off=[expert])
    except Exception:  # the steering in effect already sets this expert another way: measure it as it is
        return base


def _decision_kl(model, prompts: list[list[int]], candidates: Sequence[tuple[int, int]]) -> list[float]:
    """Per candidate, the mean KL(unsteered || candidate OFF) at each prompt's last token."""
    n = len(prompts)
    first = [len(p) - 1 for p in prompts]
    base = model.steering  # the steering in effect (a default profile) stays on in both
    ref = model.score_many(prompts, first, reduce=lambda i, rows: log_softmax(rows[:1]).astype(np.float32))
    k = len(candidates)
    kls = model.score_many(prompts * k, first * k, reduce=lambda i, rows: float(kl_divergence(ref[i % n], rows[:1])[0]),
                           steerings=[_off(base, c) for c in candidates for _ in range(n)])
    return [float(np.mean(kls[j * n:(j + 1) * n])) for j in range(k)]


def causal_check(model, behavior: list[list[int]], control: list[list[int]],
                 candidates: Sequence[tuple[int, int]], rd: Sequence[float]) -> CausalCheck:
    """Measure each candidate's effect (prompts as token lists; ``rd``: the candidates' risk differences; see the
    module docstring)."""
    candidates = [(int(l), int(e)) for l, e in candidates]
    kb = _decision_kl(model, behavior, candidates)
    kc = _decision_kl(model, control, candidates)
    return CausalCheck(tuple(candidates), tuple(float(r) for r in rd), tuple(kb), tuple(kc), len(behavior),
                       len(control))
