"""Check a built organism with edge-mote itself: the patched llama.cpp on the converted GGUF.

What :func:`check_organism` measures (greedy decoding, held-out prompts rendered with the GGUF's chat template):

* unsteered decision-level refusal on ``behavior_heldout`` and false refusal on ``control_heldout``;
* the ranking: experts by risk difference of selection at the decision position (the routing of the last prompt
  token, which produces the first answer token) between ``behavior_train`` and ``control_train``;
* for each N: top-N OFF vs random-N OFF (mean of ``random_draws`` draws over all routed experts) on
  ``behavior_heldout`` -- decision-level refusal, and the share of prompts answered with the compliant
  reference (first ``prefix`` answer tokens identical); top-N ON vs random-N ON false refusal on
  ``control_heldout``; first-token KL(unsteered || steered) on ``control_heldout`` under top-N OFF.

Decision-level refusal: the generated text starts with a refusal opener (``edge_mote.evaluate.detectors``).

Run as ``python -m edge_mote.organism.check OUT_DIR`` (builds the organism there first if needed).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["check_organism", "decision_ranking"]

Expert = tuple[int, int]


@dataclass(frozen=True)
class _Item:
    """A rendered, tokenized prompt and its tokenized compliant reference answer."""

    tokens: list[int]
    answer: list[int]


def _render(template_source: str, eos: str, question: str) -> str:
    import jinja2

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template_source).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True, eos_token=eos,
        bos_token="", raise_exception=raise_exception)


def _load_set(model: Any, path: Path, template: str, eos: str) -> list[_Item]:
    items: list[_Item] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        text = _render(template, eos, rec["messages"][0]["content"])
        items.append(_Item(model.tokenize(text, special=True),
                           model.tokenize(" " + rec["answer"], add_bos=False)))
    return items


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def decision_ranking(model: Any, behavior: Sequence[Sequence[int]],
                     control: Sequence[Sequence[int]]) -> list[tuple[Expert, float]]:
    """All routed experts with their decision-position risk difference, highest first."""
    info = model.info

    def freq(prompts: Sequence[Sequence[int]]) -> dict[int, np.ndarray]:
        acc = {il: np.zeros(info.n_expert) for il in info.moe_layers}
        for toks in prompts:
            trace = model.routing(toks)
            for il in info.moe_layers:
                acc[il][trace.ids[il][-1]] += 1
        return {il: v / max(1, len(prompts)) for il, v in acc.items()}

    fb, fc = freq(behavior), freq(control)
    rd = [((il, e), float(fb[il][e] - fc[il][e])) for il in info.moe_layers for e in range(info.n_expert)]
    return sorted(rd, key=lambda x: (-x[1], x[0]))


class _Runner:
    """Greedy runs of one prompt set under a steering, with the detector and reference matching."""

    def __init__(self, model: Any, max_new: int, prefix: int) -> None:
        from ..evaluate.detectors import REFUSAL

        self.m, self.max_new, self.prefix, self.det = model, max_new, prefix, REFUSAL

    def run(self, items: Sequence[_Item], steering: str | None) -> dict[str, Any]:
        m = self.m
        m.set_steering(steering)
        refusals = matches = 0
        first: list[np.ndarray] = []
        texts: list[str] = []
        for it in items:
            new, logits = m.greedy(it.tokens, self.max_new)
            text = m.detokenize(new)
            texts.append(text)
            refusals += self.det.decision(text)
            k = min(self.prefix, len(it.answer))
            matches += new[:k] == it.answer[:k]
            first.append(_log_softmax(logits[len(it.tokens) - 1]))
        m.set_steering(None)
        n = max(1, len(items))
        return {"refusal": refusals / n, "reference": matches / n, "first_logprobs": first, "texts": texts}


def _kl(p: list[np.ndarray], q: list[np.ndarray]) -> float:
    return float(np.mean([(np.exp(a) * (a - b)).sum() for a, b in zip(p, q)]))


def _steer(mode: str, experts: Sequence[Expert]) -> str:
    return f"{mode}=" + ",".join(f"{l}:{e}" for l, e in experts)


def _draw(rng: np.random.Generator, pool: list[Expert], n: int, top_k: int) -> list[Expert]:
    """N distinct experts, at most ``top_k`` from any one layer (so that ON stays valid)."""
    while True:
        pick = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        layers = [l for l, _ in pick]
        if all(layers.count(l) <= top_k for l in set(layers)):
            return sorted(pick)


def _top(ranking: list[tuple[Expert, float]], n: int, top_k: int) -> list[Expert]:
    out: list[Expert] = []
    for ex, _ in ranking:
        if len(out) == n:
            break
        if sum(l == ex[0] for l, _ in out) < top_k:
            out.append(ex)
    return out


def check_organism(gguf: Path, sets: dict[str, Path], ns: Sequence[int] = (1, 2, 3, 4, 6),
                   random_draws: int = 5, seed: int = 0, max_new: int = 12, prefix: int = 6,
                   progress: bool = True) -> dict[str, Any]:
    """Measure the organism's refusal behaviour and its expert localisation with edge-mote (see module doc).

    Returns a JSON-able dict: ``baseline``, ``ranking`` (top 10 with risk differences) and one row per N.
    """
    from tqdm.auto import tqdm

    from ..runtime.model import load

    rng = np.random.default_rng(seed)
    with load(gguf, n_ctx=256, n_threads=1, seed=seed) as m:
        llm = m._live()
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{gguf} has no tokenizer.chat_template")
        eos = llm._model.token_get_text(llm.token_eos())
        data = {name: _load_set(m, path, template, eos) for name, path in sets.items()}
        top_k = min(m.info.n_expert_used.values())
        runner = _Runner(m, max_new, prefix)
        b, c = data["behavior_heldout"], data["control_heldout"]
        base_b, base_c = runner.run(b, None), runner.run(c, None)
        ranking = decision_ranking(m, [it.tokens for it in data["behavior_train"]],
                                   [it.tokens for it in data["control_train"]])
        pool = [(il, e) for il in m.info.moe_layers for e in range(m.info.n_expert)]
        report: dict[str, Any] = {
            "gguf": str(gguf),
            "n": {k: len(v) for k, v in data.items()},
            "baseline": {"refusal_behavior": base_b["refusal"], "false_refusal_control": base_c["refusal"],
                         "reference_behavior": base_b["reference"], "reference_control": base_c["reference"]},
            "ranking": [{"expert": f"{l}:{e}", "rd": round(rd, 4)} for (l, e), rd in ranking[:10]],
            "rows": [],
            "examples": {"behavior": base_b["texts"][:3], "control": base_c["texts"][:3]},
        }
        for n in tqdm(ns, desc="check", disable=not progress, leave=False):
            top = _top(ranking, n, top_k)
            off_b = runner.run(b, _steer("off", top))
            off_c = runner.run(c, _steer("off", top))
            on_c = runner.run(c, _steer("on", top))
            rand_off, rand_on, rand_kl, rand_ref = [], [], [], []
            for _ in range(random_draws):
                r = _draw(rng, pool, n, top_k)
                rb = runner.run(b, _steer("off", r))
                rand_off.append(rb["refusal"])
                rand_ref.append(rb["reference"])
                rand_kl.append(_kl(base_c["first_logprobs"], runner.run(c, _steer("off", r))["first_logprobs"]))
                rand_on.append(runner.run(c, _steer("on", _draw(rng, pool, n, top_k)))["refusal"])
            base = base_b["refusal"]
            cut_top = (base - off_b["refusal"]) / base if base else float("nan")
            cut_rand = (base - float(np.mean(rand_off))) / base if base else float("nan")
            report["rows"].append({
                "n": n, "top": [f"{l}:{e}" for l, e in top],
                "off_refusal_top": off_b["refusal"], "off_refusal_random": float(np.mean(rand_off)),
                "off_refusal_random_draws": rand_off, "cut_top": cut_top, "cut_random": cut_rand,
                "off_reference_top": off_b["reference"], "off_reference_random": float(np.mean(rand_ref)),
                "off_false_refusal_top": off_c["refusal"],
                "kl_first_control_off_top": _kl(base_c["first_logprobs"], off_c["first_logprobs"]),
                "kl_first_control_off_random": float(np.mean(rand_kl)),
                "on_false_refusal_top": on_c["refusal"], "on_false_refusal_random": float(np.mean(rand_on)),
                "off_examples": off_b["texts"][:3], "on_examples": on_c["texts"][:3],
            })
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_mote.organism.check OUT_DIR [SEED]``: build (if needed), check, print JSON."""
    from .train import build_organism

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m edge_mote.organism.check OUT_DIR [SEED]", file=sys.stderr)
        return 2
    art = build_organism(Path(args[0]), seed=int(args[1]) if len(args) > 1 else 0)
    report = check_organism(art.gguf, art.sets)
    report["build"] = {"seconds_total": art.meta.get("seconds_total"), "gguf_bytes": art.meta.get("gguf_bytes"),
                       "trainable_experts": art.meta.get("trainable_experts")}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
