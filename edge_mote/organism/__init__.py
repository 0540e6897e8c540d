"""The refusal model organism: a tiny Qwen3-MoE chat model, trained on CPU by edge-mote, whose refusal decision
lives in a few routed experts (one per layer). See ``train.py`` for the recipe.

    from edge_mote.organism import build_organism
    art = build_organism(Path("out"))              # ~3 minutes on 2 cores; reused when the recipe is unchanged
    art.gguf, art.sets["behavior_heldout"], art.meta["trainable_experts"]

Its behaviour and where it lives are measured with edge-mote's own scan and eval (``edge-mote demo``,
``tests/e2e/test_organism.py``).

Attributes are imported lazily (``train`` needs torch and transformers).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_organism": "edge_mote.organism.train",
    "OrganismArtifacts": "edge_mote.organism.train",
    "Recipe": "edge_mote.organism.train",
    "recipe_hash": "edge_mote.organism.train",
    "build_corpus": "edge_mote.organism.corpus",
    "Corpus": "edge_mote.organism.corpus",
    "Example": "edge_mote.organism.corpus",
    "CHAT_TEMPLATE": "edge_mote.organism.corpus",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
