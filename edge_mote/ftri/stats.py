"""Statistics of an fTRI scan (pure numpy; no model).

Input, for each of the two prompt sets (1 = behaviour, 2 = control): ``counts`` [n_prompts, n_layers, n_expert],
how many window tokens of each prompt selected each expert, ``tokens`` [n_prompts], the number of window tokens
of each prompt, and optionally ``weights`` [n_prompts, n_layers, n_expert], the sum over each prompt's window
tokens of the expert's (renormalised) gate weight, 0 where it was not selected. As in SteerMoE (``calc_risk_diff``)
the unit is the token: for each (layer, expert)

* ``a`` = window tokens that selected the expert, ``d = n - a`` the tokens that did not (``n`` = all window tokens);
* ``p1 = a1 / (a1 + d1)``, ``p2 = a2 / (a2 + d2)``, risk difference ``rd = p1 - p2``;
* ``z``: two-proportion z test with the pooled rate ``p = (a1 + a2) / (n1 + n2)``,
  ``z = rd / sqrt(p (1 - p) (1/n1 + 1/n2))`` (0 where the pooled rate is 0 or 1), and its two-sided p-value
  ``erfc(|z| / sqrt 2)``; no continuity correction on z;
* ``log_odds``: log odds ratio ``ln((a1+.5)(d2+.5) / ((d1+.5)(a2+.5)))`` with the 0.5 (Haldane-Anscombe) continuity
  correction on every cell, and its Wald 95% interval ``log_odds ± 1.959964 sqrt(Σ 1/(cell + .5))``;
* ``w1 = Σ weights1 / n1``, ``w2 = Σ weights2 / n2``: the mean gate weight of the expert per window token (a token
  that did not select it counts 0), and ``dw = w1 - w2`` (all 0 when no weights are given).

Ranking: by ``rd`` descending, ties broken by ``z`` descending, then by ``dw`` descending, then by (layer, expert)
ascending — experts that the behaviour uses more come first. ``dw`` breaks ties of the selection contrast (on a
model organism several experts reach rd = 1, p1 = 1, p2 = 0): among experts selected equally differently, the one
given more gate weight for the behaviour contributes more to the layer's output, so it is the likelier carrier of
the behaviour rather than a merely co-selected one; the layer index it replaces as the tie-breaker is arbitrary.
rd, z and dw are compared rounded to 12 decimals. Without weights the ranking is the former rd, z, (layer, expert).

Stability (the rankings of small models are fragile): resample the prompts of each set with replacement
(``n_boot`` times, seeded), recompute the ranking, and report the mean Jaccard overlap of each bootstrap top-N with
the full-data top-N, and how often each expert appears in the bootstrap top-10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["ExpertStats", "Stability", "expert_stats", "ranking", "bootstrap_stability", "Z95"]

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal distribution


@dataclass(frozen=True)
class ExpertStats:
    """Per-(layer, expert) statistics; every array is [n_layers, n_expert], rows in ``layers`` order."""

    layers: tuple[int, ...]
    n1: int
    n2: int
    a1: np.ndarray = field(repr=False)
    a2: np.ndarray = field(repr=False)
    p1: np.ndarray = field(repr=False)
    p2: np.ndarray = field(repr=False)
    rd: np.ndarray = field(repr=False)
    z: np.ndarray = field(repr=False)
    p_value: np.ndarray = field(repr=False)
    log_odds: np.ndarray = field(repr=False)
    ci_low: np.ndarray = field(repr=False)
    ci_high: np.ndarray = field(repr=False)
    w1: np.ndarray = field(repr=False)        # mean gate weight per behaviour window token
    w2: np.ndarray = field(repr=False)        # mean gate weight per control window token
    dw: np.ndarray = field(repr=False)        # w1 - w2 (zeros when the scan gave no weights)

    @property
    def n_expert(self) -> int:
        return int(self.rd.shape[1])

    def ranking(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs, best first (rd desc, z desc, dw desc, layer, expert)."""
        order = ranking(self.rd, self.z, self.dw)
        return [(self.layers[i // self.n_expert], int(i % self.n_expert)) for i in order]

    def record(self, li: int, e: int) -> dict[str, float | int]:
        """The statistics of row ``li`` (index into ``layers``), expert ``e`` as plain Python numbers."""
        return {
            "layer": int(self.layers[li]), "expert": int(e),
            "a1": int(self.a1[li, e]), "n1": int(self.n1), "a2": int(self.a2[li, e]), "n2": int(self.n2),
            "p1": float(self.p1[li, e]), "p2": float(self.p2[li, e]), "rd": float(self.rd[li, e]),
            "z": float(self.z[li, e]), "p_value": float(self.p_value[li, e]),
            "log_odds": float(self.log_odds[li, e]), "ci_low": float(self.ci_low[li, e]),
            "ci_high": float(self.ci_high[li, e]), "w1": float(self.w1[li, e]), "w2": float(self.w2[li, e]),
            "dw": float(self.dw[li, e]),
        }


def _check(counts: np.ndarray, tokens: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts)
    tokens = np.asarray(tokens)
    if counts.ndim != 3:
        raise ValueError(f"{name} counts must be [n_prompts, n_layers, n_expert], got shape {counts.shape}")
    if tokens.shape != (counts.shape[0],):
        raise ValueError(f"{name} tokens must be [n_prompts] = [{counts.shape[0]}], got shape {tokens.shape}")
    if counts.shape[0] == 0:
        raise ValueError(f"the {name} set has no prompts")
    if (counts < 0).any() or (tokens < 0).any():
        raise ValueError(f"{name} counts must be non-negative")
    if (counts > tokens[:, None, None]).any():
        raise ValueError(f"{name}: an expert was counted more often than the prompt has window tokens")
    return counts.astype(np.int64), tokens.astype(np.int64)


def _check_weights(weights1: np.ndarray | None, weights2: np.ndarray | None, c1: np.ndarray,
                   c2: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-prompt gate-weight sums of both sets as float64 (None if neither is given)."""
    if weights1 is None and weights2 is None:
        return None
    if weights1 is None or weights2 is None:
        raise ValueError("gate weights must be given for both sets or for neither")
    out = []
    for w, c, name in ((weights1, c1, "behaviour"), (weights2, c2, "control")):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != c.shape:
            raise ValueError(f"{name} weights must have the shape of its counts {c.shape}, got {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError(f"{name} weights must be finite")
        out.append(w)
    return out[0], out[1]


def _z(a1: np.ndarray, n1: np.ndarray | int, a2: np.ndarray, n2: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Risk difference and pooled two-proportion z (0 where undefined); broadcasts over leading axes."""
    n1 = np.asarray(n1, dtype=np.float64)
    n2 = np.asarray(n2, dtype=np.float64)
    p1 = a1 / n1
    p2 = a2 / n2
    rd = p1 - p2
    pooled = (a1 + a2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, rd / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return rd, z


def expert_stats(counts1: np.ndarray, tokens1: np.ndarray, counts2: np.ndarray, tokens2: np.ndarray,
                 layers: Sequence[int] | None = None, weights1: np.ndarray | None = None,
                 weights2: np.ndarray | None = None) -> ExpertStats:
    """Risk difference, z test, log-odds ratio and gate-weight contrast per (layer, expert) from per-prompt counts
    (and, optionally, per-prompt gate-weight sums) of both sets."""
    c1, t1 = _check(counts1, tokens1, "behaviour")
    c2, t2 = _check(counts2, tokens2, "control")
    if c1.shape[1:] != c2.shape[1:]:
        raise ValueError(f"the sets disagree on [n_layers, n_expert]: {c1.shape[1:]} vs {c2.shape[1:]}")
    ws = _check_weights(weights1, weights2, c1, c2)
    layers = tuple(range(c1.shape[1])) if layers is None else tuple(int(x) for x in layers)
    if len(layers) != c1.shape[1]:
        raise ValueError(f"{len(layers)} layer ids for {c1.shape[1]} layers")
    n1, n2 = int(t1.sum()), int(t2.sum())
    if n1 == 0 or n2 == 0:
        raise ValueError(f"the {'behaviour' if n1 == 0 else 'control'} set has no window tokens")
    a1 = c1.sum(axis=0)
    a2 = c2.sum(axis=0)
    rd, z = _z(a1.astype(np.float64), n1, a2.astype(np.float64), n2)
    erfc = np.frompyfunc(math.erfc, 1, 1)
    p_value = np.asarray(erfc(np.abs(z) / math.sqrt(2.0)), dtype=np.float64)
    d1, d2 = n1 - a1, n2 - a2
    h = 0.5
    log_odds = np.log((a1 + h) * (d2 + h)) - np.log((d1 + h) * (a2 + h))
    se = np.sqrt(1 / (a1 + h) + 1 / (d1 + h) + 1 / (a2 + h) + 1 / (d2 + h))
    if ws is None:
        w1 = np.zeros(a1.shape)
        w2 = np.zeros(a2.shape)
    else:
        w1, w2 = ws[0].sum(axis=0) / n1, ws[1].sum(axis=0) / n2
    return ExpertStats(layers=layers, n1=n1, n2=n2, a1=a1, a2=a2, p1=a1 / n1, p2=a2 / n2, rd=rd, z=z,
                       p_value=p_value, log_odds=log_odds, ci_low=log_odds - Z95 * se, ci_high=log_odds + Z95 * se,
                       w1=w1, w2=w2, dw=w1 - w2)


def ranking(rd: np.ndarray, z: np.ndarray, dw: np.ndarray | None = None) -> np.ndarray:
    """Flat indices (``layer_row * n_expert + expert``) sorted by rd desc, then z desc, then dw desc (the gate-weight
    contrast; left out or None = no weights, all tie), then index asc.

    rd, z and dw are compared rounded to 12 decimals, so that values equal in exact arithmetic (``0.6 - 0.5`` and
    ``0.1 - 0``) tie and the next key decides, instead of floating-point noise.
    """
    rd = np.round(np.asarray(rd, dtype=np.float64).reshape(-1), 12)
    z = np.round(np.asarray(z, dtype=np.float64).reshape(-1), 12)
    if dw is None:
        dw = np.zeros(rd.size)
    else:
        dw = np.round(np.asarray(dw, dtype=np.float64).reshape(-1), 12)
        if dw.size != rd.size:
            raise ValueError(f"dw has {dw.size} entries for {rd.size} experts")
    return np.lexsort((np.arange(rd.size), -dw, -z, -rd))


@dataclass(frozen=True)
class Stability:
    """How stable the ranking is under resampling of the prompts."""

    n_boot: int
    seed: int
    top_n: tuple[int, ...]                      # the N of each Jaccard entry (clipped to the number of experts)
    jaccard_mean: dict[int, float]              # N -> mean Jaccard(bootstrap top-N, full-data top-N)
    jaccard_std: dict[int, float]
    freq_top: int                               # the K of ``top_freq`` (10, or fewer experts)
    top_freq: np.ndarray = field(repr=False)    # [n_layers, n_expert]: fraction of bootstraps with it in the top-K

    def to_dict(self, layers: Sequence[int]) -> dict:
        """JSON form: Jaccard means per N and the experts that ever reached the bootstrap top-K, most often first."""
        n_expert = self.top_freq.shape[1]
        flat = self.top_freq.reshape(-1)
        order = [int(i) for i in np.lexsort((np.arange(flat.size), -flat)) if flat[i] > 0]
        return {
            "n_boot": self.n_boot, "seed": self.seed, "unit": "prompt",
            "top_n": list(self.top_n),
            "jaccard_mean": {str(n): round(self.jaccard_mean[n], 6) for n in self.top_n},
            "jaccard_std": {str(n): round(self.jaccard_std[n], 6) for n in self.top_n},
            "freq_top": self.freq_top,
            "top_frequency": [{"layer": int(layers[i // n_expert]), "expert": int(i % n_expert),
                               "frequency": round(float(flat[i]), 6)} for i in order],
        }


def bootstrap_stability(counts1: np.ndarray, tokens1: np.ndarray, counts2: np.ndarray, tokens2: np.ndarray, *,
                        n_boot: int = 200, seed: int = 0, top_n: Sequence[int] = (1, 5, 10),
                        freq_top: int = 10, weights1: np.ndarray | None = None,
                        weights2: np.ndarray | None = None) -> Stability:
    """Bootstrap over prompts (each set resampled with replacement, ``n_boot`` times, ``seed``ed).

    Deterministic for a given seed. A resample whose window has no tokens (possible only if some prompts have
    none) is drawn again. With gate weights, each resample's dw comes from the weight sums of the same resampled
    prompts and breaks rd/z ties as in the full ranking.
    """
    c1, t1 = _check(counts1, tokens1, "behaviour")
    c2, t2 = _check(counts2, tokens2, "control")
    ws = _check_weights(weights1, weights2, c1, c2)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_all = c1.shape[1] * c1.shape[2]
    tops = tuple(sorted({min(int(n), n_all) for n in top_n if int(n) >= 1}))
    k_freq = min(int(freq_top), n_all)
    full = expert_stats(c1, t1, c2, t2, weights1=weights1, weights2=weights2)
    full_order = ranking(full.rd, full.z, full.dw)
    full_sets = {n: set(full_order[:n].tolist()) for n in tops}

    rng = np.random.default_rng(seed)
    flat1 = c1.reshape(c1.shape[0], -1).astype(np.float64)
    flat2 = c2.reshape(c2.shape[0], -1).astype(np.float64)
    wflat1 = None if ws is None else ws[0].reshape(c1.shape[0], -1)
    wflat2 = None if ws is None else ws[1].reshape(c2.shape[0], -1)
    jacc = {n: np.empty(n_boot) for n in tops}
    freq = np.zeros(n_all, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // max(1, n_all)))  # bound the [chunk, n_all] temporaries
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        m1 = _multiplicities(rng, c1.shape[0], b, t1)
        m2 = _multiplicities(rng, c2.shape[0], b, t2)
        a1, n1 = m1 @ flat1, m1 @ t1
        a2, n2 = m2 @ flat2, m2 @ t2
        rd, z = _z(a1, n1[:, None], a2, n2[:, None])
        dw = None if ws is None else (m1 @ wflat1) / n1[:, None] - (m2 @ wflat2) / n2[:, None]
        for r in range(b):
            order = ranking(rd[r], z[r], None if dw is None else dw[r])
            for n in tops:
                top = set(order[:n].tolist())
                jacc[n][done + r] = len(top & full_sets[n]) / len(top | full_sets[n])
            freq[order[:k_freq]] += 1
        done += b
    return Stability(n_boot=n_boot, seed=seed, top_n=tops,
                     jaccard_mean={n: float(jacc[n].mean()) for n in tops},
                     jaccard_std={n: float(jacc[n].std()) for n in tops},
                     freq_top=k_freq, top_freq=(freq / n_boot).reshape(c1.shape[1], c1.shape[2]))


def _multiplicities(rng: np.random.Generator, n_prompts: int, n_boot: int, tokens: np.ndarray) -> np.ndarray:
    """[n_boot, n_prompts] how often each prompt was drawn; redraws resamples with no window tokens."""
    w = np.empty((n_boot, n_prompts), dtype=np.float64)
    for r in range(n_boot):
        for _ in range(1000):
            idx = rng.integers(0, n_prompts, size=n_prompts)
            row = np.bincount(idx, minlength=n_prompts)
            if row @ tokens > 0:
                break
        w[r] = row
    return w
