"""fTRI ("functional token-resonance imaging", after MoTE): find the routed experts that carry a behaviour.

Send a *behaviour* prompt set and a *control* prompt set through the model, count which experts every token in a
window (``prompt``, ``decision``, ``response`` or ``all``) selected, and rank experts by the SteerMoE risk
difference ``p1 - p2`` (behaviour rate minus control rate), with a significance measure and a bootstrap estimate of
how stable the ranking is.

    from edge_mote import load
    from edge_mote.ftri import load_prompts, run_scan, write_scan

    with load("model.gguf", n_ctx=4096) as m:
        result = run_scan(m, load_prompts("refuse.jsonl"), load_prompts("comply.jsonl"), tokens="decision")
    write_scan(result, "scan.json")

Modules: ``prompts`` (prompt sets, chat-template rendering), ``stats`` (pure numpy statistics), ``scan`` (the
model pass), ``report`` (scan.json, heatmaps). Only ``prompts`` and ``stats`` are imported eagerly here; they need
no native code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .prompts import ChatTemplate, PromptItem, PromptSet, Rendered, load_prompts, render
from .stats import ExpertStats, Stability, bootstrap_stability, expert_stats, ranking

if TYPE_CHECKING:  # pragma: no cover
    from .report import heatmap_html, heatmap_png, load_scan, write_scan
    from .scan import WINDOWS, ScanResult, run_scan, scan_and_write

__all__ = [
    "ChatTemplate", "PromptItem", "PromptSet", "Rendered", "load_prompts", "render",
    "ExpertStats", "Stability", "bootstrap_stability", "expert_stats", "ranking",
    "WINDOWS", "ScanResult", "run_scan", "scan_and_write",
    "heatmap_html", "heatmap_png", "load_scan", "write_scan",
]

_LAZY = {
    "WINDOWS": "scan", "ScanResult": "scan", "run_scan": "scan", "scan_and_write": "scan",
    "heatmap_html": "report", "heatmap_png": "report", "load_scan": "report", "write_scan": "report",
}


def __getattr__(name: str) -> Any:
    """Import ``scan`` and ``report`` on first use (they pull in the runtime and matplotlib)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
