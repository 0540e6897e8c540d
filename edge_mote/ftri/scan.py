"""The fTRI scan: route two prompt sets through the model and count which experts each window token selected.

Windows (``tokens=``), for a prompt of ``n`` tokens (after the chat template, unless ``raw``):

``prompt``    every prompt token (positions ``0 .. n-1``);
``decision``  the first response position: the routing at the last prompt token (position ``n-1``), the
              computation that produces the first answer token;
``response``  the positions that produce the greedy response the model writes itself, from the decision position
              on: ``n-1 .. n-2+m`` where ``m`` = the response length + 1 if it stopped at an end-of-generation
              token (the position that produced that token counts), else ``max_new``;
``all``       ``prompt`` and ``response`` together (``0 .. n-2+m``).

The response is generated greedily token by token (stopping at any end-of-generation token), then the routing
of ``prompt + response`` is read once with ``Model.routing`` (the patched llama.cpp's capture). Statistics are
over tokens (SteerMoE's ``a``/``d``), and the per-prompt counts are kept for the bootstrap (see ``stats``). Besides
the counts, the scan sums each expert's gate weight (``RoutingTrace.weights``, renormalised over the top k) over each
prompt's window tokens: its mean per window token breaks ties of the selection contrast in the ranking.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..fileio import check_output, same_file
from .prompts import ChatTemplate, PromptItem, PromptSet, load_prompts, render
from .stats import ExpertStats, Stability, bootstrap_stability, expert_stats, ranking

__all__ = ["WINDOWS", "SetSummary", "PromptRecord", "ScanResult", "run_scan", "scan_and_write"]

WINDOWS: tuple[str, ...] = ("prompt", "decision", "response", "all")


@dataclass(frozen=True)
class SetSummary:
    """One prompt set as scanned."""

    path: str
    n_prompts: int
    n_prompt_tokens: int      # all prompt tokens (after the chat template)
    n_window_tokens: int      # tokens counted in the window


@dataclass(frozen=True)
class PromptRecord:
    """What the scan did with one prompt."""

    set: str                  # "behavior" or "control"
    id: str
    source: str
    n_prompt_tokens: int
    n_window_tokens: int
    response: str | None = None          # the greedy response (windows response/all)
    n_response_tokens: int | None = None


@dataclass(frozen=True)
class ScanResult:
    """Everything a scan measured; ``report.write_scan`` turns it into scan.json."""

    info: Any                              # edge_mote.runtime.model.ModelInfo
    steering: str                          # the steering in effect during the scan ("" = none)
    window: str
    max_new: int
    raw: bool
    templated: bool                        # the chat template was applied
    behavior: SetSummary
    control: SetSummary
    layers: tuple[int, ...]
    stats: ExpertStats = field(repr=False)
    stability: Stability = field(repr=False)
    counts1: np.ndarray = field(repr=False)   # [n_behaviour_prompts, n_layers, n_expert]
    tokens1: np.ndarray = field(repr=False)   # [n_behaviour_prompts] window tokens
    counts2: np.ndarray = field(repr=False)
    tokens2: np.ndarray = field(repr=False)
    wsum1: np.ndarray = field(repr=False)     # float64 [n_behaviour_prompts, n_layers, n_expert] gate-weight sums
    wsum2: np.ndarray = field(repr=False)
    prompts: tuple[PromptRecord, ...] = field(repr=False)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    tokens_evaluated: int = 0
    causal: Any = None                     # edge_mote.ftri.causal.CausalCheck of the top candidates, if run

    def order(self) -> list[int]:
        """Flat indices (``layer_row * n_expert + expert``), best first: the statistical ranking, with the causal
        check's candidates (if any) re-ordered by their measured effect ahead of the rest."""
        st = self.stats
        order = [int(i) for i in ranking(st.rd, st.z, st.dw)]
        if self.causal is None:
            return order
        row = {l: i for i, l in enumerate(st.layers)}
        first = [row[l] * st.n_expert + e for l, e in self.causal.order()]
        taken = set(first)
        return first + [i for i in order if i not in taken]

    def top(self, n: int | None = None) -> list[dict]:
        """The best ``n`` experts (all if None) as records with ``rank`` and bootstrap ``stability`` (top-10 freq);
        with the causal check, its ``score``, ``effect`` (``kl_behavior``, ``kl_control``) on the candidates."""
        st = self.stats
        order = self.order()
        if n is not None:
            order = order[: max(0, n)]
        out = []
        for rank, i in enumerate(order, 1):
            li, e = divmod(int(i), st.n_expert)
            rec = {"rank": rank, **st.record(li, e), "stability": float(self.stability.top_freq[li, e])}
            causal = self.causal.record(int(st.layers[li]), e) if self.causal is not None else None
            if causal:
                rec.update(causal)
            out.append(rec)
        return out

    def to_dict(self, *, top: int = 100, full_hash: bool = False) -> dict:
        """The scan.json document (see ``edge_mote.ftri.report``)."""
        from .report import scan_document

        return scan_document(self, top=top, full_hash=full_hash)


def _as_set(s: PromptSet | str | os.PathLike | Sequence[str], name: str) -> PromptSet:
    if isinstance(s, PromptSet):
        return s
    if isinstance(s, (str, os.PathLike)):
        return load_prompts(s)
    return PromptSet.from_texts(list(s), name=name)


def _tokens_for(model: Any, item: PromptItem, template: ChatTemplate | None, raw: bool) -> tuple[list[int], bool, bool]:
    """(prompt tokens, templated, fell back to raw text) for one item."""
    r = render(template, item, raw=raw)
    toks = model.encode_prompt(r.text, templated=r.templated)  # the template writes its own BOS
    if not toks:
        raise UserError(f"{item.source}: the prompt has no tokens")
    return toks, r.templated, r.fallback


def _set_prompts(model: Any, pset: PromptSet, window: str, max_new: int, template: ChatTemplate | None, raw: bool,
                 state: dict) -> list[list[int]]:
    """The tokens of every prompt of a set, checked against the context."""
    n_ctx = model.n_ctx
    prompts = []
    for item in pset:
        toks, templated, fallback = _tokens_for(model, item, template, raw)
        state["templated"] |= templated
        state["fallback"] |= fallback
        need = len(toks) + (max_new if window in ("response", "all") else 0)
        if need > n_ctx:
            raise UserError(f"{item.source}: {len(toks)} prompt tokens" + (f" + {max_new} new" if need > len(toks) else "")
                            + f" do not fit the context of {n_ctx}", hint="load with a larger --ctx")
        prompts.append(toks)
    return prompts


def _decode(model: Any, prompts: list[list[int]], window: str, max_new: int, bar: Any,
            state: dict) -> tuple[list[list[int] | None], list, list[np.ndarray]]:
    """(greedy responses or None, routing traces, the window's rows of each trace) of prompts of both sets, decoded
    together on the Model's batched decode surface (greedy responses, then one routing pass unless the routing was
    read from the generating decodes)."""

    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n / (2 if window == "all" else 1))
            dt = time.perf_counter() - state["t0"]
            if dt > 0:
                bar.set_postfix_str(f"{state['evaluated'] / dt:.0f} tok/s")

    responses: list[list[int] | None] = [None] * len(prompts)
    traces = None
    if window == "response":  # the window is the decoded tokens: routing read from the generating decodes
        outs = model.greedy_many(prompts, max_new, keep_logits=0, tick=tick, routing=True)
        responses = [new for new, _, _ in outs]
        traces = [tr for _, _, tr in outs]
    elif window == "all":
        outs = model.greedy_many(prompts, max_new, keep_logits=0, tick=tick)
        responses = [new for new, _ in outs]
    seqs, rows_of = [], []
    for toks, new in zip(prompts, responses):
        n = len(toks)
        if new is not None:
            m = min(len(new) + 1, max_new)
            seqs.append(toks + new[: m - 1])
            rows_of.append(np.arange(0, m) if window == "response" else np.arange(0, n - 1 + m))
            state["evaluated"] += len(new)
        else:
            seqs.append(toks)
            rows_of.append(np.arange(0, n) if window == "prompt" else np.array([n - 1]))
        state["evaluated"] += len(seqs[-1])
    if traces is None:
        traces = model.routing_many(seqs, tick=tick)
    return responses, traces, rows_of


def _tally(model: Any, pset: PromptSet, label: str, prompts: list[list[int]], responses: list, traces: list,
           rows_of: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[PromptRecord], int]:
    """(counts, window tokens, gate-weight sums, records, prompt tokens) of one prompt set."""
    info = model.info
    layers = info.moe_layers
    counts = np.zeros((len(pset), len(layers), info.n_expert), dtype=np.int32)
    wsum = np.zeros((len(pset), len(layers), info.n_expert), dtype=np.float64)
    ntok = np.zeros(len(pset), dtype=np.int64)
    records: list[PromptRecord] = []
    for pi, (item, trace, rows) in enumerate(zip(pset, traces, rows_of)):
        for li, layer in enumerate(layers):
            ids = trace.ids[layer][rows].reshape(-1)
            wts = np.asarray(trace.weights[layer][rows], dtype=np.float64).reshape(-1)
            ok = (ids >= 0) & (ids < info.n_expert)
            ids, wts = ids[ok], wts[ok]
            counts[pi, li] = np.bincount(ids, minlength=info.n_expert)[: info.n_expert]
            wsum[pi, li] = np.bincount(ids, weights=wts, minlength=info.n_expert)[: info.n_expert]
        ntok[pi] = len(rows)
        new = responses[pi]
        records.append(PromptRecord(set=label, id=item.id, source=item.source, n_prompt_tokens=len(prompts[pi]),
                                    n_window_tokens=int(len(rows)),
                                    response=model.detokenize(new) if new is not None else None,
                                    n_response_tokens=len(new) if new is not None else None))
    return counts, ntok, wsum, records, sum(len(t) for t in prompts)


def run_scan(model: Any, behavior: PromptSet | str | os.PathLike | Sequence[str],
             control: PromptSet | str | os.PathLike | Sequence[str], tokens: str = "decision", max_new: int = 16,
             raw: bool = False, progress: bool = True, *, n_boot: int = 200, seed: int = 0, causal: int = 0,
             causal_prompts: int = 64) -> ScanResult:
    """Scan a loaded ``Model`` with a behaviour and a control prompt set (``PromptSet``, a path, or strings).

    ``tokens`` is the window (``prompt``, ``decision``, ``response``, ``all``); ``max_new`` bounds the greedy
    response (response/all). The steering in effect on ``model`` (e.g. the GGUF's default profile) applies and is
    recorded. A progress bar (tqdm, with tokens/s) is shown when ``progress`` and stderr is a terminal.
    ``causal`` > 0: re-rank the statistical top ``causal`` candidates (positive risk difference) by rd x the measured
    effect of switching each OFF on the decision, on up to ``causal_prompts`` prompts per set
    (``edge_mote.ftri.causal``).
    """
    if tokens not in WINDOWS:
        raise UserError(f"unknown token window '{tokens}'", hint=f"choose one of {', '.join(WINDOWS)}")
    if tokens in ("response", "all") and max_new < 1:
        raise UserError(f"max_new must be >= 1 for the '{tokens}' window, got {max_new}")
    bset, cset = _as_set(behavior, "behavior"), _as_set(control, "control")
    model.require_moe()
    template = None if raw else ChatTemplate.from_model(model)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(bset) + len(cset), unit="prompt", desc=f"scan ({tokens})", file=sys.stderr,
                   leave=False, dynamic_ncols=True)
    state: dict = {"t0": time.perf_counter(), "evaluated": 0, "templated": False, "fallback": False}
    try:  # both sets in the same decodes (a scan of small sets keeps the batch full)
        pb = _set_prompts(model, bset, tokens, max_new, template, raw, state)
        pc = _set_prompts(model, cset, tokens, max_new, template, raw, state)
        responses, traces, rows_of = _decode(model, pb + pc, tokens, max_new, bar, state)
        nb = len(pb)
        c1, t1, w1, r1, np1 = _tally(model, bset, "behavior", pb, responses[:nb], traces[:nb], rows_of[:nb])
        c2, t2, w2, r2, np2 = _tally(model, cset, "control", pc, responses[nb:], traces[nb:], rows_of[nb:])
    finally:
        if bar is not None:
            bar.close()
    layers = tuple(model.info.moe_layers)
    stats = expert_stats(c1, t1, c2, t2, layers=layers, weights1=w1, weights2=w2)
    stability = bootstrap_stability(c1, t1, c2, t2, n_boot=n_boot, seed=seed, weights1=w1, weights2=w2)
    check = None
    if causal > 0:
        from .causal import causal_check, subsample

        row = {l: i for i, l in enumerate(layers)}
        cands = [(l, e) for l, e in stats.ranking() if stats.rd[row[l], e] > 0][:causal]
        if cands:
            toks = [[_tokens_for(model, item, template, raw)[0] for item in subsample(list(s), causal_prompts)]
                    for s in (bset, cset)]
            check = causal_check(model, toks[0], toks[1], cands, [stats.rd[row[l], e] for l, e in cands])
    warnings = []
    if state["fallback"]:
        warnings.append(f"{Path(model.info.path).name} has no chat template (tokenizer.chat_template): "
                        "prompts were used as raw text")
    return ScanResult(
        info=model.info, steering=str(model.steering) if model.steering else "", window=tokens, max_new=max_new,
        raw=raw, templated=state["templated"],
        behavior=SetSummary(bset.path, len(bset), np1, int(t1.sum())),
        control=SetSummary(cset.path, len(cset), np2, int(t2.sum())),
        layers=layers, stats=stats, stability=stability, counts1=c1, tokens1=t1, counts2=c2, tokens2=t2,
        wsum1=w1, wsum2=w2,
        prompts=tuple(r1 + r2), warnings=tuple(warnings), seconds=time.perf_counter() - state["t0"],
        tokens_evaluated=state["evaluated"], causal=check)


def _check_outputs(outputs: Sequence[tuple[str, str | os.PathLike | None]],
                   inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse outputs that would overwrite an input or each other, or whose directory does not exist."""
    seen: list[tuple[str, Path]] = []
    for what, out in outputs:
        if out is None:
            continue
        p = Path(out)
        for i in inputs:
            if same_file(p, Path(i)):
                raise UserError(f"the {what} output {out} is an input file; refusing to overwrite it")
        for other_what, other in seen:
            if same_file(p, other):
                raise UserError(f"the {what} and {other_what} outputs are the same file: {out}")
        check_output(p)  # a folder, a missing or read-only output folder: before the scan, not after it
        seen.append((what, p))


def scan_and_write(model: str | os.PathLike, behavior: str | os.PathLike, control: str | os.PathLike,
                   out: str | os.PathLike, *, tokens: str = "decision", max_new: int = 16, raw: bool = False,
                   heatmap: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
                   top: int = 100, progress: bool = True, n_boot: int = 200, seed: int = 0, full_hash: bool = False,
                   causal: int = 0, **load_kwargs: Any) -> ScanResult:
    """What ``edge-mote scan`` does: check the outputs, read both prompt sets (before loading the model), scan,
    and write scan.json (atomically) and the optional PNG and HTML heatmaps."""
    from ..runtime.resolve import open_model, resolve_model
    from . import report

    model = resolve_model(model)
    _check_outputs([("scan", out), ("heatmap", heatmap), ("html", html)], [model, behavior, control])
    if tokens not in WINDOWS:
        raise UserError(f"unknown token window '{tokens}'", hint=f"choose one of {', '.join(WINDOWS)}")
    bset, cset = load_prompts(behavior), load_prompts(control)
    with open_model(model, **load_kwargs) as m:
        m.require_moe()
        result = run_scan(m, bset, cset, tokens=tokens, max_new=max_new, raw=raw, progress=progress,
                          n_boot=n_boot, seed=seed, causal=causal)
    doc = report.scan_document(result, top=top, full_hash=full_hash)
    inputs = [model, behavior, control]
    report.write_scan(doc, out, inputs=inputs)
    if heatmap is not None:
        report.heatmap_png(doc, heatmap, inputs=inputs)
    if html is not None:
        report.heatmap_html(doc, html, inputs=inputs)
    return result
