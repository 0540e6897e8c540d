"""``edge-mote demo``: steering on a model the project makes itself (no downloads).

Builds (once, cached) a tiny random Qwen3-MoE with transformers, converts it with llama.cpp's own converter, then
shows the routing of a prompt and what switching experts OFF / forcing them ON does to routing and to the
next-token distribution, all through the patched llama.cpp. The weights are random, so the text is noise: the demo
shows the mechanics (which experts fire, that steered experts are never/always chosen, how far outputs move).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runtime.steering import Steering

DEMO_PROMPT = "The committee met in Paris to decide whether the bridge should be rebuilt"


def demo_dir() -> Path:
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    return root / "demo"


def make_demo_model(workdir: Path | None = None, arch: str = "qwen3moe") -> Path:
    """The demo GGUF (built on first use: ~10 s)."""
    from .conversion import convert_hf_to_gguf
    from .runtime.native import vendored_llama_cpp
    from .tiny import make_tiny_hf_model

    d = (workdir or demo_dir()) / arch
    gguf = d / "model-f32.gguf"
    if not gguf.exists():
        vendor = vendored_llama_cpp()
        make_tiny_hf_model(arch, d / "hf", vendor / "models" / "ggml-vocab-gpt-2.gguf", seed=0)
        convert_hf_to_gguf(d / "hf", gguf, vendor, outtype="f32")
    return gguf


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over rows of next-token distributions given as logits."""
    def logsm(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = logsm(p_logits.astype(np.float64)), logsm(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


@dataclass
class DemoRow:
    name: str
    steering: str
    kl: float
    routing_changed: float          # fraction of (token, layer) slots whose expert set changed
    steered_selected: float         # fraction of tokens that selected the steered experts
    text: str


@dataclass
class DemoReport:
    model: Path
    info: dict
    top_experts: dict[int, list[tuple[int, float]]]
    rows: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(workdir: Path | None = None, prompt: str = DEMO_PROMPT, max_tokens: int = 16) -> DemoReport:
    from .runtime.model import load

    t0 = time.perf_counter()
    gguf = make_demo_model(workdir)
    with load(gguf, n_ctx=512) as m:
        toks = m.tokenize(prompt, add_bos=False)
        base_logits = m.logits(toks)
        base = m.routing(toks)
        n_expert = m.info.n_expert
        usage = {l: np.bincount(base.ids[l].ravel(), minlength=n_expert) / len(toks) for l in base.layers}
        ranked = {l: [int(e) for e in np.argsort(-usage[l], kind="stable")] for l in base.layers}
        report = DemoReport(gguf, m.info.to_dict(),
                            {l: [(e, float(usage[l][e])) for e in ranked[l][:3]] for l in base.layers})
        cases = [
            ("unsteered", Steering()),
            ("top-2 per layer OFF", Steering(off=[(l, e) for l in base.layers for e in ranked[l][:2]])),
            ("top-1 per layer DROP", Steering(drop=[(l, ranked[l][0]) for l in base.layers])),
            ("least-used ON", Steering(on=[(l, ranked[l][-1]) for l in base.layers])),
            ("top-1 bias -2", Steering(bias={(l, ranked[l][0]): -2.0 for l in base.layers})),
        ]
        for name, s in cases:
            with m.steer(s):
                logits = m.logits(toks)
                trace = m.routing(toks)
                text = m.generate(prompt, max_tokens=max_tokens).text
            changed = np.mean([np.any(np.sort(trace.ids[l], 1) != np.sort(base.ids[l], 1), axis=1).mean()
                               for l in base.layers])
            targets = sorted(s.off | s.on | s.drop | frozenset(s.bias))
            sel = np.mean([(trace.ids[l] == e).any(axis=1).mean() for l, e in targets]) if targets else float("nan")
            report.rows.append(DemoRow(name, str(s) or "-", _kl(base_logits, logits), float(changed), float(sel), text))
    report.seconds = time.perf_counter() - t0
    return report
