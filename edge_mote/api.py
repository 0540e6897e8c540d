"""High-level, typed operations behind the CLI commands (each command calls one of these and renders)."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
