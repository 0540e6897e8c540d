"""Helpers shared by bench/bench_prune.py and bench/bench_quantize.py (not a benchmark itself).

The organism (edge_mote/organism) is found in the demo cache or the test-model cache when one with the current
recipe hash exists there (no retraining), else trained into the demo cache. Quality of a shipped file against a
reference file on a prompt set: first-token KL (at the position that produces the first answer token), mean KL
over the reference answer's tokens, perplexity of the reference answers, decision-level behaviour rate of greedy
answers, and routing fidelity (share of (token, MoE layer) top-k sets identical to the reference's).
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}"


def organism():
    import json

    from edge_mote.demo import demo_dir
    from edge_mote.organism.train import RECIPE_FILE, Recipe, build_organism, recipe_hash

    want = recipe_hash(Recipe(), 0)
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    for cand in [demo_dir() / "organism", *sorted((root / "test-models").glob("*/organism"))]:
        try:
            if json.loads((cand / RECIPE_FILE).read_text())["hash"] == want:
                return build_organism(cand, seed=0, progress=False)  # complete: returned as is
        except (OSError, ValueError, KeyError):
            continue
    return build_organism(demo_dir() / "organism", seed=0, progress=True)


@dataclass
class Seq:
    prompt: list[int]
    answer: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer


def sequences(gguf, prompt_file) -> list[Seq]:
    import edge_mote
    from edge_mote.api import prepare_prompts
    from edge_mote.ftri.prompts import load_prompts

    with edge_mote.load(gguf, n_ctx=512, n_threads=2) as m:
        return [Seq(list(p.tokens), list(p.answer or [])) for p in prepare_prompts(m, load_prompts(prompt_file))]


def run_model(gguf, seqs: list[Seq], *, greedy: int = 0, routing: bool = False, profile: str | None = "none",
              steering=None) -> dict:
    """Logits of every sequence (prompt + answer), optionally greedy answers and routing, with a profile."""
    import edge_mote

    out = {"logits": [], "greedy": [], "routing": []}
    with edge_mote.load(gguf, n_ctx=512, n_threads=2) as m:
        if profile is not None:
            m.use_profile(profile)
        if steering is not None:
            m.set_steering(m.steering | steering)
        for s in seqs:
            out["logits"].append(m.logits(s.tokens))
            if routing:
                out["routing"].append(m.routing(s.tokens))
        if greedy:
            out["greedy"] = [m.detokenize(new) for new, _ in m.greedy_many([s.prompt for s in seqs], greedy)]
    return out


def quality(ref: dict, test: dict, seqs: list[Seq]) -> dict:
    from edge_mote.evaluate.metrics import answer_nll, kl_divergence, log_softmax, perplexity

    first, ans_kl, nll, n = [], [], 0.0, 0
    for s, a, b in zip(seqs, ref["logits"], test["logits"]):
        i = len(s.prompt) - 1
        first.append(float(kl_divergence(log_softmax(a[i]), b[i])))
        if s.answer:
            rows = slice(i, i + len(s.answer))
            ans_kl.append(float(kl_divergence(log_softmax(a[rows]), b[rows]).mean()))
            x, k = answer_nll(b, len(s.prompt), s.answer)
            nll, n = nll + x, n + k
    return {"first_kl": float(np.mean(first)), "answer_kl": float(np.mean(ans_kl)) if ans_kl else float("nan"),
            "ppl": perplexity(nll, n)}


def refusal_rate(answers: list[str]) -> float:
    from edge_mote.evaluate.detectors import REFUSAL

    return float(np.mean([REFUSAL.decision(a) for a in answers])) if answers else float("nan")


def routing_fidelity(ref: dict, test: dict) -> float:
    """Share of (token, MoE layer) whose top-k expert set equals the reference's."""
    same = total = 0
    for a, b in zip(ref["routing"], test["routing"]):
        for l in a.ids:
            sa, sb = np.sort(a.ids[l], 1), np.sort(b.ids[l], 1)
            same += int((sa == sb).all(axis=1).sum())
            total += sa.shape[0]
    return same / total if total else float("nan")


def median_spread(xs) -> str:
    xs = list(xs)
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"
