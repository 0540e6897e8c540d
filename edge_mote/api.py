"""High-level, typed operations behind the CLI commands (each command calls one of these and renders)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .runtime.model import Completion, ModelInfo, load
from .runtime.resolve import open_model
from .steering import Steering


def describe_model(model: str | os.PathLike, **load_kwargs) -> ModelInfo:
    """Load a model and return what edge-mote knows about it."""
    with open_model(model, **load_kwargs) as m:
        return m.info


@dataclass(frozen=True)
class RunResult:
    info: ModelInfo
    steering: Steering
    profile: str | None
    completion: Completion

    def to_dict(self) -> dict:
        c = self.completion
        return {
            "model": self.info.path,
            "profile": self.profile,
            "steering": str(self.steering),
            "text": c.text,
            "n_prompt_tokens": c.n_prompt_tokens,
            "n_tokens": c.n_tokens,
            "seconds": round(c.seconds, 4),
            "tokens_per_second": round(c.n_tokens / c.seconds, 2) if c.seconds > 0 else None,
        }


def run_prompt(model: str | os.PathLike, prompt: str, *, steering: Steering | None = None, profile: str | None = None,
               max_tokens: int = 64, temperature: float = 0.0, seed: int = 0, **load_kwargs) -> RunResult:
    """Generate from ``prompt``.

    Steering in effect: the GGUF's default profile, unless ``profile`` names another (``"none"``: no profile);
    ``steering`` (if given) is combined with it.
    """
    if not prompt:
        raise UserError("the prompt is empty")
    with open_model(model, **load_kwargs) as m:
        if profile is not None:
            m.use_profile(profile)
        used_profile = profile if profile not in (None, "none") else (m.info.default_profile if profile is None else None)
        if steering is not None:
            m.set_steering(m.steering | steering)
        try:
            completion = m.generate(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        except ValueError as e:  # llama-cpp-python: "Requested tokens (N) exceed context window of C"
            raise _context_error(e, m.info) from None
        return RunResult(m.info, m.steering, used_profile, completion)


def _context_error(e: ValueError, info: ModelInfo) -> Exception:
    import re

    found = re.search(r"Requested tokens \((\d+)\) exceed context window of (\d+)", str(e))
    if found is None:
        return e
    n, ctx = int(found[1]), int(found[2])
    hint = (f"raise --ctx (up to {info.n_ctx_train}, the model's training context) or shorten the prompt"
            if info.n_ctx_train > ctx else "shorten the prompt: the context is already the model's training context")
    return UserError(f"the prompt is {n} tokens: it does not fit the context of {ctx} tokens", hint=hint)


# -- profiles -------------------------------------------------------------------------------------------------------

def list_profiles(model: str | os.PathLike) -> tuple[dict, str | None]:
    """The profiles stored in a GGUF (name -> Profile) and the default profile's name."""
    from .gguf_meta.profiles import read_profiles
    from .runtime.resolve import resolve_model

    return read_profiles(resolve_model(model))


def steering_from_ranking(ranking, top: int, mode: str = "off", bias: float | None = None,
                          info: ModelInfo | None = None) -> Steering:
    """A steering of the first ``top`` experts of a ranking ([(layer, expert), ...], most behaviour-linked first):
    switched OFF / DROPped / forced ON, or, with ``bias``, given that router-logit bias."""
    from .evaluate.protocol import top_experts

    if top < 1:
        raise UserError("--top must be >= 1")
    if bias is not None:
        picked = list(ranking[:top])
        if len(picked) < top:
            raise UserError(f"the scan ranks only {len(picked)} experts")
        return Steering(bias={ex: bias for ex in picked})
    if mode not in ("off", "drop", "on"):
        raise UserError(f"unknown mode '{mode}': use off, drop or on")
    if info is not None:
        picked = top_experts(ranking, top, mode, info.n_expert, info.n_expert_used)
    else:
        picked = list(ranking[:top])
    return Steering(**{mode: picked})


def add_profile(model: str | os.PathLike, out: str | os.PathLike, name: str, steering: Steering,
                description: str = "", default: bool = False) -> Path:
    """Copy ``model`` to ``out`` with profile ``name`` added (or replaced); validated against the model's shape."""
    from .fileio import check_output
    from .gguf_meta.profiles import Profile, check_profile_name, read_profiles, write_profiles
    from .runtime.resolve import resolve_model

    check_profile_name(name)
    if not steering:
        raise UserError("the profile is empty: give experts to steer")
    model = resolve_model(model)
    check_output(out, inputs=[model])  # before loading and copying the model
    with load(model, n_ctx=64) as m:
        info = m.info
        if not info.is_moe:
            raise UserError(f"{Path(model).name} is not a Mixture-of-Experts model")
        m.require_steerable()  # no profiles for architectures where steering cannot be verified
        steering.to_arrays(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)  # validates
    profiles, current_default = read_profiles(model)
    profiles = dict(profiles)
    profiles[name] = Profile(name, steering, description)
    return write_profiles(model, out, profiles, name if default else current_default)


def remove_profile(model: str | os.PathLike, out: str | os.PathLike, name: str) -> Path:
    """Copy ``model`` to ``out`` without profile ``name``."""
    from .fileio import check_output
    from .gguf_meta.profiles import read_profiles, write_profiles
    from .runtime.resolve import resolve_model

    model = resolve_model(model)
    check_output(out, inputs=[model])
    profiles, default = read_profiles(model)
    if name not in profiles:
        raise UserError(f"unknown profile '{name}' in {Path(model).name}",
                        hint="profiles: " + (", ".join(profiles) or "none stored"))
    profiles = {k: v for k, v in profiles.items() if k != name}
    return write_profiles(model, out, profiles, None if default == name else default)


# -- evaluation -----------------------------------------------------------------------------------------------------

def prepare_prompts(model, prompt_set, raw: bool = False):
    """Render (chat template unless ``raw``) and tokenize every prompt of a set, with its reference answer."""
    from .evaluate.protocol import Prepared
    from .ftri.prompts import render

    out = []
    for item in prompt_set:
        r = render(model, item, raw=raw)
        tokens = model.encode_prompt(r.text, templated=r.templated)
        answer = None
        if item.answer:
            answer = model.tokenize((" " if not item.answer.startswith((" ", "\n")) else "") + item.answer,
                                    add_bos=False, special=False)
        out.append(Prepared(tokens, answer))
    return out


def run_eval(model: str | os.PathLike, behavior: str | os.PathLike, control: str | os.PathLike,
             scan: str | os.PathLike, *, tops=(1, 5, 10), modes=("off", "drop", "on"), random_trials: int = 5,
             seed: int = 0, max_new: int = 16, detector: str | os.PathLike | None = None, raw: bool = False,
             progress: bool = False, **load_kwargs):
    """The MoTE evaluation protocol (edge_mote.evaluate.protocol) on one model, with the ranking of a scan."""
    from .evaluate.detectors import load_detector
    from .evaluate.protocol import evaluate
    from .ftri.prompts import load_prompts

    det = load_detector(detector)
    bset, cset = load_prompts(behavior), load_prompts(control)
    ranking, _ = scan_ranking(scan)
    with open_model(model, **load_kwargs) as m:
        if not m.info.is_moe:
            raise UserError(f"{Path(model).name} is not a Mixture-of-Experts model")
        check_scan_matches(scan, m.info)
        b, c = prepare_prompts(m, bset, raw), prepare_prompts(m, cset, raw)
        bar = _progress_factory(progress)
        return evaluate(m, b, c, ranking, tops=tops, modes=modes, random_trials=random_trials, seed=seed,
                        max_new=max_new, detector=det, progress=bar)


def _progress_factory(enabled: bool):
    """A tqdm-based tick factory when enabled and stderr is a terminal, else None."""
    import sys

    if not enabled or not sys.stderr.isatty():
        return None

    def make(total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="prompt", file=sys.stderr, leave=False)
        return lambda: bar.update(1)

    return make


def scan_ranking(scan: str | os.PathLike) -> tuple[list[tuple[int, int]], ModelInfo | None]:
    """The experts of a scan.json, most behaviour-linked first (positive risk difference only), and the model shape
    it was made on (as a ModelInfo with what the scan records, for validating a profile without loading)."""
    from .ftri.report import load_scan

    doc = load_scan(scan)
    ranking = [(int(e["layer"]), int(e["expert"])) for e in doc["ranking"]["entries"] if e["rd"] > 0]
    if not ranking:
        raise UserError(f"{scan}: no expert fires more for the behaviour than for the control set",
                        hint="check the prompt sets and the --tokens window of the scan")
    m = doc["model"]
    info = ModelInfo(path=m.get("path", ""), arch=m.get("arch", ""), name=m.get("name"), n_layer=int(m["n_layer"]),
                     moe_layers=tuple(int(x) for x in m["moe_layers"]), n_expert=int(m["n_expert"]),
                     n_expert_used={int(k): int(v) for k, v in m["n_expert_used"].items()}, n_vocab=0, n_ctx_train=0,
                     profiles=(), default_profile=None, file_bytes=int(m.get("file_bytes", 0)))
    return ranking, info


def check_scan_matches(scan: str | os.PathLike, info: ModelInfo) -> None:
    """A scan made on a model of another shape cannot steer this one."""
    _, s = scan_ranking(scan)
    if (s.n_layer, s.n_expert, s.moe_layers) != (info.n_layer, info.n_expert, info.moe_layers):
        raise UserError(f"{scan} was made on a model with {s.n_layer} layers x {s.n_expert} experts, "
                        f"not this one ({info.n_layer} x {info.n_expert})")
