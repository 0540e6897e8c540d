"""How much each routed expert matters, measured on calibration prompts: which experts ``prune --keep-ratio`` removes.

Methods (higher = more salient, kept first):

* ``frequency`` -- routing frequency x mean gate weight: the expert's gate weight summed over all calibration
  tokens / number of tokens (0 for a token that did not select it). Needs only the routing capture.
* ``reap`` (default) -- REAP (Cerebras, arXiv 2510.13999): the mean, over the tokens routed to the expert, of gate
  weight x the L2 norm of the expert's output. Needs the expert outputs (``edge_mote.runtime.probe``). On the
  organism it kept quality clearly better than ``frequency``, which removes rarely routed but decisive experts
  (bench/bench_prune.py, BENCHMARKS.md).
* ``random`` -- a seeded random score: the baseline the other two must beat.

Saliency is measured on the model without steering (its default profile is not applied): the pruned file should
keep what the model itself uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

METHODS = ("frequency", "reap", "random")


@dataclass
class RoutingStats:
    """Per MoE layer: [n_expert] selection counts, summed gate weights, summed gate x output norm; token count."""

    layers: tuple[int, ...]
    count: dict[int, np.ndarray]
    gate_sum: dict[int, np.ndarray]
    reap_sum: dict[int, np.ndarray] | None
    n_tokens: int

    def scores(self, method: str, seed: int = 0) -> dict[int, np.ndarray]:
        if method == "frequency":
            return {l: self.gate_sum[l] / max(self.n_tokens, 1) for l in self.layers}
        if method == "reap":
            if self.reap_sum is None:
                raise UserError("REAP saliency needs the expert output norms, which were not measured")
            return {l: self.reap_sum[l] / np.maximum(self.count[l], 1) for l in self.layers}
        if method == "random":
            rng = np.random.default_rng(seed)
            return {l: rng.random(len(self.count[l])) for l in self.layers}
        raise UserError(f"unknown saliency '{method}': use one of {', '.join(METHODS)}")


def calibration_tokens(model, calib: str | os.PathLike, raw: bool = False) -> list[list[int]]:
    """Token sequences of a prompt set (chat template of the model unless ``raw``; reference answers appended)."""
    from ..ftri.prompts import load_prompts, render

    out = []
    for item in load_prompts(calib):
        r = render(model, item, raw=raw)
        toks = model.tokenize(r.text, add_bos=not r.templated, special=r.templated)
        if item.answer:
            ans = item.answer if item.answer.startswith((" ", "\n")) else " " + item.answer
            toks = toks + model.tokenize(ans, add_bos=False, special=False)
        out.append(toks)
    if not out:
        raise UserError(f"{calib}: no prompts")
    return out


def _bar(total: int, enabled: bool):
    import sys

    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="saliency", unit="prompt", leave=False, file=sys.stderr)


def routing_stats(model, seqs, progress: bool = False) -> RoutingStats:
    """Selection counts and summed gate weights of ``seqs`` on a loaded Model, unsteered (its routing capture)."""
    info = model.info
    layers = tuple(info.moe_layers)
    count = {l: np.zeros(info.n_expert, np.int64) for l in layers}
    gate = {l: np.zeros(info.n_expert, np.float64) for l in layers}
    bar = _bar(len(seqs), progress)
    n_tokens = 0
    try:
        with model.steer(None):
            for toks in seqs:
                trace = model.routing(toks)
                for l in layers:
                    ids = trace.ids[l].ravel()
                    np.add.at(count[l], ids, 1)
                    np.add.at(gate[l], ids, trace.weights[l].astype(np.float64).ravel())
                n_tokens += len(toks)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return RoutingStats(layers, count, gate, None, n_tokens)


def reap_stats(path: str | os.PathLike, seqs, n_expert: int, n_threads: int | None = None,
               progress: bool = False) -> RoutingStats:
    """Counts, gate sums and gate x expert-output-norm sums, read by the expert-output probe (unsteered)."""
    from ..runtime.probe import ExpertOutputProbe

    bar = _bar(len(seqs), progress)
    n_tokens = 0
    with ExpertOutputProbe(path, n_ctx=max(len(s) for s in seqs) + 8, n_threads=n_threads) as probe:
        layers = probe.moe_layers
        count = {l: np.zeros(n_expert, np.int64) for l in layers}
        gate = {l: np.zeros(n_expert, np.float64) for l in layers}
        reap = {l: np.zeros(n_expert, np.float64) for l in layers}
        try:
            for toks in seqs:
                for l, (ids, w, norms) in probe.outputs(toks).items():
                    ids = ids.ravel()
                    w = w.astype(np.float64).ravel()
                    np.add.at(count[l], ids, 1)
                    np.add.at(gate[l], ids, w)
                    np.add.at(reap[l], ids, w * norms.astype(np.float64).ravel())
                n_tokens += len(toks)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return RoutingStats(tuple(layers), count, gate, reap, n_tokens)


def measure_saliency(path: str | os.PathLike, calib: str | os.PathLike, method: str = "reap", raw: bool = False,
                     seed: int = 0, n_threads: int | None = None, progress: bool = False) -> dict[int, np.ndarray]:
    """Saliency of every routed expert of the GGUF at ``path`` on the prompts of ``calib``: {layer: [n_expert]}."""
    from ..runtime.model import load

    if method not in METHODS:
        raise UserError(f"unknown saliency '{method}': use one of {', '.join(METHODS)}")
    with load(path, n_ctx=2048, n_threads=n_threads) as m:
        seqs = calibration_tokens(m, calib, raw=raw)
        n_expert, layers = m.info.n_expert, tuple(m.info.moe_layers)
        if method == "frequency":
            return routing_stats(m, seqs, progress=progress).scores(method)
    if method == "random":
        return RoutingStats(layers, {l: np.zeros(n_expert) for l in layers}, {}, None, 0).scores(method, seed)
    return reap_stats(path, seqs, n_expert, n_threads=n_threads, progress=progress).scores("reap")
