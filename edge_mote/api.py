"""High-level, typed operations behind the CLI commands (each command calls one of these and renders)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .runtime.model import Completion, ModelInfo, load
from .runtime.steering import Steering


def describe_model(model: str | os.PathLike, **load_kwargs) -> ModelInfo:
    """Load a model and return what edge-mote knows about it."""
    with load(model, **load_kwargs) as m:
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
    with load(model, **load_kwargs) as m:
        if profile is not None:
            m.use_profile(profile)
        used_profile = profile if profile not in (None, "none") else (m.info.default_profile if profile is None else None)
        if steering is not None:
            m.set_steering(m.steering | steering)
        completion = m.generate(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return RunResult(m.info, m.steering, used_profile, completion)


# -- profiles -------------------------------------------------------------------------------------------------------

def list_profiles(model: str | os.PathLike) -> tuple[dict, str | None]:
    """The profiles stored in a GGUF (name -> Profile) and the default profile's name."""
    from .gguf_meta.profiles import read_profiles

    return read_profiles(model)


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
    from .gguf_meta.profiles import Profile, check_profile_name, read_profiles, write_profiles

    check_profile_name(name)
    if not steering:
        raise UserError("the profile is empty: give experts to steer")
    with load(model, n_ctx=64) as m:
        info = m.info
        if not info.is_moe:
            raise UserError(f"{Path(model).name} is not a Mixture-of-Experts model")
        steering.to_arrays(info.n_layer, info.n_expert, info.moe_layers, info.n_expert_used)  # validates
    profiles, current_default = read_profiles(model)
    profiles = dict(profiles)
    profiles[name] = Profile(name, steering, description)
    return write_profiles(model, out, profiles, name if default else current_default)


def remove_profile(model: str | os.PathLike, out: str | os.PathLike, name: str) -> Path:
    """Copy ``model`` to ``out`` without profile ``name``."""
    from .gguf_meta.profiles import read_profiles, write_profiles

    profiles, default = read_profiles(model)
    if name not in profiles:
        raise UserError(f"unknown profile '{name}' in {Path(model).name}",
                        hint="profiles: " + (", ".join(profiles) or "none stored"))
    profiles = {k: v for k, v in profiles.items() if k != name}
    return write_profiles(model, out, profiles, None if default == name else default)
