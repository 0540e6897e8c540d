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
from .metrics import log_softmax, perplexity, token_nll

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

    def _teacher_forced(self, prepared: Sequence[Prepared], steerings: Sequence[Steering], fed, covered,
                        per_row) -> list[list[float]]:
        """For every (steering, prompt) j = c * len(prepared) + i: ``per_row(i, r, logits row r)`` for the rows
        r = ``covered[j]`` .. ``len(fed(i))`` of prompt + ``fed(i)`` (row r follows ``fed(i)[:r]``; none where ``fed(i)`` is
        None), decoded together."""
        n = len(prepared)
        todo = [j for j in range(len(steerings) * n) if fed(j % n) is not None and covered[j] <= len(fed(j % n))]
        if not todo:
            return [[] for _ in range(len(steerings) * n)]

        def reduce(t: int, rows: np.ndarray):
            j = todo[t]
            i, r0 = j % n, covered[j]
            return [per_row(i, r0 + r, rows[r]) for r in range(len(fed(i)) + 1 - r0)]

        done = self.m.score_many([prepared[j % n].tokens + list(fed(j % n)) for j in todo],
                                 [len(prepared[j % n].tokens) - 1 + covered[j] for j in todo],
                                 reduce=reduce, steerings=[steerings[j // n] for j in todo], invariant=True)
        out: list[list] = [[] for _ in range(len(steerings) * n)]
        for j, vals in zip(todo, done):
            out[j] = vals
        return out

    def _greedy(self, prepared: Sequence[Prepared], steerings: Sequence[Steering], control: bool):
        """Greedy responses of every prompt under every steering, decoded together; and, per (steering, prompt), the
        answer NLL per row and (control) the KL per row. The rows a greedy step chooses from are the teacher-forced
        rows as long as the response so far equals the reference answer (or the unsteered response): decoding is
        batch invariant, so they are bit-identical, and only the rest is scored in a pass of its own."""
        n, k = len(prepared), len(steerings)
        nll: list[list[float]] = [[] for _ in range(n * k)]
        kl: list[list[float]] = [[] for _ in range(n * k)]
        answer = lambda i: prepared[i].answer or []
        answer_fed = lambda i: answer(i)[:-1] if answer(i) else None  # NLL row r predicts answer[r]
        ref_fed = lambda i: self.ref[i][0][: len(self.ref[i][1]) - 1]  # the KL rows follow these response tokens

        def on_row(j: int, new: list[int], row: np.ndarray) -> None:
            i, r = j % n, len(new)
            last = new[-1] if new else None
            need_nll = len(nll[j]) == r < len(answer(i)) and (r == 0 or last == answer(i)[r - 1])
            need_kl = control and len(kl[j]) == r < len(self.ref[i][1]) and (r == 0 or last == self.ref[i][0][r - 1])
            if need_kl:
                lq = log_softmax(row)
                kl[j].append(self._kl_of(i, r, lq))
                if need_nll:
                    nll[j].append(float(-lq[answer(i)[r]]))
            elif need_nll:
                nll[j].append(token_nll(row, answer(i)[r]))

        outs = self.m.greedy_many([p.tokens for p in prepared] * k, self.max_new, keep_logits=0, tick=self.tick,
                                  steerings=[s for s in steerings for _ in range(n)], invariant=True, on_row=on_row)
        more = self._teacher_forced(prepared, steerings, answer_fed, [len(x) for x in nll],
                                    lambda i, r, row: token_nll(row, answer(i)[r]))
        nll = [a + b for a, b in zip(nll, more)]
        if control:
            more = self._teacher_forced(prepared, steerings, ref_fed, [len(x) for x in kl], self._kl_row)
            kl = [a + b for a, b in zip(kl, more)]
        return outs, nll, kl

    def _kl_row(self, i: int, r: int, row: np.ndarray) -> float:
        """KL(unsteered || steered) at response row r of control prompt i, from the steered logits."""
        return self._kl_of(i, r, log_softmax(row))

    def _kl_of(self, i: int, r: int, lq: np.ndarray) -> float:
        """KL(unsteered || steered) at response row r of control prompt i, from the steered log-probabilities."""
        p_lp = self.ref[i][1][r]
        p = np.exp(p_lp)
        return float(max((p * (p_lp - lq)).sum(), 0.0))  # >= 0 (float rounding gives -1e-9)

    def measure_many(self, steerings: Sequence[Steering]) -> list[dict[str, float]]:
        """The metrics of every steering; all configurations share decodes (each sequence with its own steering),
        each distinct steering measured once."""
        unique = list(dict.fromkeys(steerings))
        measured = dict(zip(unique, self._measure_unique(unique)))
        return [dict(measured[s]) for s in steerings]

    def _measure_unique(self, steerings: Sequence[Steering]) -> list[dict[str, float]]:
        m, det, k = self.m, self.detector, len(steerings)
        nb, nc = len(self.behavior), len(self.control)
        outs_b, nll_rows_b, _ = self._greedy(self.behavior, steerings, control=False)
        outs_c, nll_rows_c, kl_rows = self._greedy(self.control, steerings, control=True)

        def nll(rows: list[list[float]], n: int, c: int) -> tuple[float, int]:
            per = rows[c * n:(c + 1) * n]
            return sum(sum(x) for x in per), sum(len(x) for x in per)

        nll_b = [nll(nll_rows_b, nb, c) for c in range(k)]
        nll_c = [nll(nll_rows_c, nc, c) for c in range(k)]
        kls = [np.asarray(x, dtype=np.float64) for x in kl_rows]
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
