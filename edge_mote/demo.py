"""``edge-mote demo``: the whole MoTE loop on the project's own model organism (no downloads).

1. build (once, cached) the refusal organism: a tiny Qwen3-MoE chat model trained here on a synthetic corpus, whose
   refusal was taught late, in a few experts (``edge_mote.organism``), converted with llama.cpp's converter;
2. scan it (fTRI, decision window, with the causal check of the top 8 candidates) on the training prompt sets ->
   ``scan.json``, ``scan.png``, ``scan.html``;
3. store the top-N experts switched OFF as profile ``no-refusal`` -> ``organism-steered.gguf`` (still a plain GGUF);
4. evaluate on the held-out sets: top-N vs random-N, OFF and ON, decision and phrase level, KL, perplexity.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_TOP = (2,)
PROFILE_N = 2
CAUSAL_TOP = 8  # the scan's causal check re-ranks its top 8 candidates (edge_mote.ftri.causal)


def demo_dir() -> Path:
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    return root / "demo"


@dataclass
class DemoResult:
    workdir: Path
    organism: Path
    scan_json: Path
    heatmap_png: Path
    heatmap_html: Path
    steered_gguf: Path
    profile: str
    top: list[dict]
    report: object           # edge_mote.evaluate.protocol.EvalReport
    examples: list[tuple[str, str, str]]  # (prompt, unsteered answer, answer with the profile)
    seconds: dict[str, float]


TRAINING_DEPS = ("torch", "transformers", "safetensors", "tokenizers")


def organism_builder():
    """``edge_mote.organism.train.build_organism``; without the optional training dependencies a one-line
    UserError that says what to install."""
    from .errors import UserError

    try:
        for name in TRAINING_DEPS:
            __import__(name)
        from .organism.train import build_organism
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise UserError(f"edge-mote demo trains its model organism with PyTorch and transformers: {missing} is not "
                        f"installed", hint="pip install 'edge-mote[convert]' (CPU-only PyTorch: pip install torch "
                        "--index-url https://download.pytorch.org/whl/cpu), or run ./setup.sh") from None
    return build_organism


def run_demo(workdir: Path | None = None, *, tops=DEMO_TOP, profile_n: int = PROFILE_N, random_trials: int = 5,
             max_new: int = 16, progress: bool = True) -> DemoResult:
    from .api import add_profile, prepare_prompts, scan_ranking, steering_from_ranking
    from .evaluate.protocol import evaluate
    from .ftri.prompts import load_prompts, render
    from .ftri.scan import scan_and_write
    from .runtime.model import load

    build_organism = organism_builder()

    workdir = Path(workdir or demo_dir())
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    org = build_organism(workdir / "organism", seed=0, progress=progress)
    seconds["organism"] = time.perf_counter() - t

    t = time.perf_counter()
    scan_json, png, html = workdir / "scan.json", workdir / "scan.png", workdir / "scan.html"
    result = scan_and_write(org.gguf, org.sets["behavior_train"], org.sets["control_train"], scan_json,
                            tokens="decision", heatmap=png, html=html, top=10, progress=progress, n_threads=2,
                            causal=CAUSAL_TOP)
    top = [{k: r[k] for k in ("layer", "expert", "p1", "p2", "rd", "z", "stability")} for r in result.top(5)]
    seconds["scan"] = time.perf_counter() - t

    t = time.perf_counter()
    ranking, info = scan_ranking(scan_json)
    steering = steering_from_ranking(ranking, profile_n, "off", None, info)
    steered = add_profile(org.gguf, workdir / "organism-steered.gguf", "no-refusal", steering,
                          f"top-{profile_n} refusal experts OFF (edge-mote demo scan)", default=False)
    seconds["profile"] = time.perf_counter() - t

    t = time.perf_counter()
    bset, cset = load_prompts(org.sets["behavior_heldout"]), load_prompts(org.sets["control_heldout"])
    with load(steered, n_ctx=512, n_threads=2) as m:
        b, c = prepare_prompts(m, bset), prepare_prompts(m, cset)
        report = evaluate(m, b, c, ranking, tops=tops, modes=("off", "on"), random_trials=random_trials, seed=0,
                          max_new=max_new)
        examples = []
        for item, prep in list(zip(bset, b))[:3]:
            m.use_profile("none")
            plain, _ = m.greedy(prep.tokens, max_new)
            m.use_profile("no-refusal")
            steered_answer, _ = m.greedy(prep.tokens, max_new)
            examples.append((item.raw_text(), m.detokenize(plain).strip(), m.detokenize(steered_answer).strip()))
    seconds["eval"] = time.perf_counter() - t
    return DemoResult(workdir, org.gguf, scan_json, png, html, steered, "no-refusal", top, report, examples, seconds)
