"""The MoTE evaluation protocol plus Heretic's quality measure, in one table.

For the unsteered model, then for top-N (from a scan's ranking) and random-N experts in each mode (OFF, DROP, ON):

* behaviour rate on the behaviour set and false-behaviour rate on the control set, each at **decision level**
  (the response opens with the behaviour) and **phrase level** (a marker anywhere);
* on the behaviour set, the share of **coherent compliant** answers (no behaviour opener and coherent text) and,
  where reference answers exist, the share whose first tokens match the reference;
* on the control set, **first-token KL** (at the decision position) and **mean next-token KL** over the unsteered
  response (teacher-forced), both KL(unsteered || steered);
* **perplexity** of reference answers (``"answer"`` in the prompt files) on each set.

Random-N experts are drawn uniformly without replacement from all routed experts of the MoE layers except the
top-N being compared, redrawn when a draw would break a layer's limits (at most n_expert - k OFF, at most k ON);
trial t uses ``numpy.random.default_rng(seed + t)``, so runs are reproducible. Decoding is greedy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..steering import Steering, limits_problem
from .detectors import REFUSAL, BehaviorDetector, is_coherent
from .metrics import answer_nll, kl_divergence, log_softmax, perplexity

MODES = ("off", "drop", "on")
METRICS = ("behavior_decision", "behavior_phrase", "compliant", "reference_match", "control_decision",
           "control_phrase", "kl_first", "kl_mean", "ppl_control", "ppl_behavior")
KL_TOKENS = 8  # response positions scored by the mean next-token KL


@dataclass
class Prepared:
    """A prompt rendered and tokenized, with its tokenized reference answer (if any)."""

    tokens: list[int]
    answer: list[int] | None


@dataclass
class Row:
    name: str
    mode: str | None
    n: int
    values: dict[str, float]
    sd: dict[str, float] = field(default_factory=dict)
    steering: str = ""
    trials: int = 1

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "n": self.n, "trials": self.trials, "steering": self.steering,
                **{k: _clean(v) for k, v in self.values.items()},
                **({"sd": {k: _clean(v) for k, v in self.sd.items()}} if self.sd else {})}


def _clean(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


@dataclass
class EvalReport:
    rows: list[Row]
    detector: BehaviorDetector
    n_behavior: int
    n_control: int
    max_new: int
    seed: int
    random_trials: int
    seconds: float = 0.0

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"schema": "edge-mote.eval/1", "detector": self.detector.to_dict(), "n_behavior": self.n_behavior,
                "n_control": self.n_control, "max_new": self.max_new, "seed": self.seed,
                "random_trials": self.random_trials, "seconds": round(self.seconds, 2),
                "rows": [r.to_dict() for r in self.rows]}


class _Evaluator:
    """Measures one steering on both sets; prompts are decoded and scored in batches (``Model.greedy_many``)."""

    def __init__(self, model, behavior: Sequence[Prepared], control: Sequence[Prepared], detector: BehaviorDetector,
                 max_new: int, progress: Callable[[], None] | None):
        self.m, self.behavior, self.control = model, behavior, control
        self.detector, self.max_new = detector, max_new
        tick = progress or (lambda: None)
        self.tick = lambda n: [tick() for _ in range(n)]
        # unsteered control responses and their log-probabilities: the reference for the KL measures
        with model.steer(None):
            outs = model.greedy_many([p.tokens for p in control], max_new, keep_logits=1 + KL_TOKENS, tick=self.tick,
                                 invariant=True)
        self.ref: list[tuple[list[int], np.ndarray]] = [
            (new, log_softmax(rows[: 1 + min(len(new), KL_TOKENS)]).astype(np.float32)) for new, rows in outs]

    def _kl_rows_in_answer(self, i: int) -> bool:
        """Whether control prompt i's KL rows are rows of its answer-NLL pass: the unsteered response it is
        teacher-forced on starts the reference answer (then the prompt + answer decode holds those very rows;
        decoding is batch-invariant, so they are bit-identical to a separate pass)."""
        p, (ref_new, ref_lp) = self.control[i], self.ref[i]
        need = len(ref_lp) - 1  # response tokens fed before the last KL row
        return len(p.answer) >= len(ref_lp) and p.answer[:need] == ref_new[:need]

    def _kl(self, i: int, rows: np.ndarray) -> np.ndarray:
        return kl_divergence(self.ref[i][1], rows[: len(self.ref[i][1])])

    def _answer_nll(self, prepared: Sequence[Prepared], steerings: Sequence[Steering], kl_too: bool = False
                    ) -> tuple[list[tuple[float, float]], dict[tuple[int, int], np.ndarray]]:
        """Per steering: summed NLL and count of the reference answers of ``prepared``, all decoded together; with
        ``kl_too`` (``prepared`` is the control set) also the KL rows of the prompts whose KL rows these decodes hold,
        as {(steering, prompt): KL per row}."""
        idx = [i for i, p in enumerate(prepared) if p.answer]
        n = len(idx)
        if not n:
            return [(0.0, 0.0)] * len(steerings), {}
        kls: dict[tuple[int, int], np.ndarray] = {}

        def reduce(j: int, rows: np.ndarray):
            i = idx[j % n]
            if kl_too and self._kl_rows_in_answer(i):
                kls[(j // n, i)] = self._kl(i, rows)
            return answer_nll(rows, 1, prepared[i].answer)

        scores = self.m.score_many([prepared[i].tokens + prepared[i].answer for i in idx] * len(steerings),
                                   [len(prepared[i].tokens) - 1 for i in idx] * len(steerings),  # rows from the last prompt token
                                   reduce=reduce, steerings=[s for s in steerings for _ in range(n)], invariant=True)
        return [(sum(sc for sc, _ in scores[k * n:(k + 1) * n]), sum(c for _, c in scores[k * n:(k + 1) * n]))
                for k in range(len(steerings))], kls

    def measure_many(self, steerings: Sequence[Steering]) -> list[dict[str, float]]:
        """The metrics of every steering; all configurations share decodes (each sequence with its own steering),
        each distinct steering measured once."""
        unique = list(dict.fromkeys(steerings))
        measured = dict(zip(unique, self._measure_unique(unique)))
        return [dict(measured[s]) for s in steerings]

    def _measure_unique(self, steerings: Sequence[Steering]) -> list[dict[str, float]]:
        m, det, k = self.m, self.detector, len(steerings)
        nb, nc = len(self.behavior), len(self.control)
        outs_b = m.greedy_many([p.tokens for p in self.behavior] * k, self.max_new, keep_logits=0, tick=self.tick,
                               steerings=[s for s in steerings for _ in range(nb)], invariant=True)
        outs_c = m.greedy_many([p.tokens for p in self.control] * k, self.max_new, keep_logits=0, tick=self.tick,
                               steerings=[s for s in steerings for _ in range(nc)], invariant=True)
        (nll_b, _), (nll_c, kl_done) = self._answer_nll(self.behavior, steerings), \
            self._answer_nll(self.control, steerings, kl_too=True)
        # KL(unsteered || steered), teacher-forced on the unsteered response: a pass of its own for the prompts whose
        # rows the answer pass did not hold
        rest = [(c, i) for c in range(k) for i in range(nc) if (c, i) not in kl_done]
        more = m.score_many([self.control[i].tokens + self.ref[i][0][:KL_TOKENS] for _, i in rest],
                            [len(self.control[i].tokens) - 1 for _, i in rest],
                            reduce=lambda j, rows: self._kl(rest[j][1], rows),
                            steerings=[steerings[c] for c, _ in rest], invariant=True)
        kl_done.update(zip(rest, more))
        kls = [kl_done[(c, i)] for c in range(k) for i in range(nc)]
        results = []
        for c in range(k):
            b_dec = b_phr = compliant = 0
            ref_hits = ref_n = 0
            for p, (new, _) in zip(self.behavior, outs_b[c * nb:(c + 1) * nb]):
                text = m.detokenize(new)
                dec, phr = det.decision(text), det.phrase(text)
                b_dec += dec
                b_phr += phr
                compliant += (not dec) and is_coherent(text)
                if p.answer:
                    n_ref = min(3, len(p.answer))
                    ref_hits += new[:n_ref] == p.answer[:n_ref]
                    ref_n += 1
            c_dec = c_phr = 0
            for new, _ in outs_c[c * nc:(c + 1) * nc]:
                text = m.detokenize(new)
                c_dec += det.decision(text)
                c_phr += det.phrase(text)
            kl = kls[c * nc:(c + 1) * nc]
            kl_first = [float(x[0]) for x in kl]
            kl_mean = [float(x.mean()) for x in kl]
            db, dc = max(nb, 1), max(nc, 1)
            results.append({
                "behavior_decision": b_dec / db, "behavior_phrase": b_phr / db, "compliant": compliant / db,
                "reference_match": ref_hits / ref_n if ref_n else float("nan"),
                "control_decision": c_dec / dc, "control_phrase": c_phr / dc,
                "kl_first": float(np.mean(kl_first)) if kl_first else float("nan"),
                "kl_mean": float(np.mean(kl_mean)) if kl_mean else float("nan"),
                "ppl_control": perplexity(nll_c[c][0], int(nll_c[c][1])),
                "ppl_behavior": perplexity(nll_b[c][0], int(nll_b[c][1])),
            })
        return results

    def measure(self, steering: Steering) -> dict[str, float]:
        return self.measure_many([steering])[0]


def _steering(mode: str, experts: Sequence[tuple[int, int]]) -> Steering:
    return Steering(**{mode: list(experts)})


def _valid(mode: str, experts: Sequence[tuple[int, int]], n_expert: int, k: dict[int, int]) -> bool:
    return limits_problem(mode, experts, n_expert, k) is None


def draw_random(n: int, mode: str, exclude: set[tuple[int, int]], moe_layers: Sequence[int], n_expert: int,
                k: dict[int, int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """N random routed experts (see the module docstring for how they are drawn)."""
    pool = [(l, e) for l in moe_layers for e in range(n_expert) if (l, e) not in exclude]
    if n > len(pool):
        raise UserError(f"cannot draw {n} random experts: only {len(pool)} are left")
    for _ in range(1000):
        pick = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        if _valid(mode, pick, n_expert, k):
            return sorted(pick)
    raise UserError(f"cannot draw {n} random experts for mode {mode} within the layers' limits")


def top_experts(ranking: Sequence[tuple[int, int]], n: int, mode: str, n_expert: int,
                k: dict[int, int]) -> list[tuple[int, int]]:
    """The first N experts of a ranking that together respect the layers' limits (skipping those that would not)."""
    out: list[tuple[int, int]] = []
    for ex in ranking:
        if len(out) == n:
            break
        if _valid(mode, out + [ex], n_expert, k):
            out.append(ex)
    if len(out) < n:
        raise UserError(f"the scan ranks only {len(out)} experts usable for top-{n} {mode}")
    return out


def evaluate(model, behavior: Sequence[Prepared], control: Sequence[Prepared], ranking: Sequence[tuple[int, int]],
             tops: Sequence[int] = (1, 5, 10), modes: Sequence[str] = MODES, random_trials: int = 5, seed: int = 0,
             max_new: int = 16, detector: BehaviorDetector = REFUSAL,
             progress: Callable[[int], Callable[[], None]] | None = None,
             batch_configurations: bool = True) -> EvalReport:
    """Run the protocol on a loaded model (see the module docstring). ``ranking``: experts, most behaviour-linked first.

    All configurations share decodes (each sequence carries its own steering) unless ``batch_configurations`` is
    False (one configuration after another, as before per-sequence steering; kept for benchmarks)."""
    info = model.info
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown mode '{bad[0]}': use off, drop or on")
    if any(n < 1 for n in tops):
        raise UserError("--top values must be >= 1")
    if not behavior or not control:
        raise UserError("both the behaviour and the control set need at least one prompt")
    t0 = time.perf_counter()
    n_configs = 1 + len(tops) * len(modes) * (1 + random_trials)
    tick = progress(n_configs * (len(behavior) + len(control)) + len(control)) if progress else None
    ev = _Evaluator(model, behavior, control, detector, max_new, tick)
    # every configuration first, then one batched measurement of all of them
    configs: list[tuple[str, str | None, int, list[Steering]]] = [("unsteered", None, 0, [Steering()])]
    for n in tops:
        for mode in modes:
            top = top_experts(ranking, n, mode, info.n_expert, info.n_expert_used)
            configs.append((f"top-{n} {mode}", mode, n, [_steering(mode, top)]))
            if random_trials:
                picks = [draw_random(n, mode, set(top), info.moe_layers, info.n_expert, info.n_expert_used,
                                     np.random.default_rng(seed + t)) for t in range(random_trials)]
                configs.append((f"random-{n} {mode}", mode, n, [_steering(mode, p) for p in picks]))
    all_steerings = [s for *_, ss in configs for s in ss]
    if batch_configurations:
        measured = iter(ev.measure_many(all_steerings))
    else:
        measured = iter([ev.measure(s) for s in all_steerings])
    rows = []
    for name, mode, n, ss in configs:
        trials = [next(measured) for _ in ss]
        if name.startswith("random-"):
            mean = {k: float(np.nanmean([tr[k] for tr in trials])) if not all(math.isnan(tr[k]) for tr in trials)
                    else float("nan") for k in METRICS}
            sd = {k: float(np.nanstd([tr[k] for tr in trials])) if not all(math.isnan(tr[k]) for tr in trials)
                  else float("nan") for k in METRICS}
            rows.append(Row(name, mode, n, mean, sd, trials=len(trials)))
        else:
            rows.append(Row(name, mode, n, trials[0], steering=str(ss[0]) if mode else ""))
    return EvalReport(rows, detector, len(behavior), len(control), max_new, seed, random_trials,
                      time.perf_counter() - t0)
