"""edge-mote: Mixture of Tunable Experts for llama.cpp -- scan, steer and ship the experts of MoE LLMs.

Public API (imported lazily, so ``import edge_mote`` is cheap)::

    edge_mote.load(path_or_repo, **llama_kwargs) -> Model
    edge_mote.Model, edge_mote.ModelInfo, edge_mote.RoutingTrace
    edge_mote.Steering
    edge_mote.EdgeMoteError, edge_mote.UserError
"""

from __future__ import annotations

from .errors import EdgeMoteError, UserError

__version__ = "0.1.0"

_LAZY = {
    "load": "edge_mote.runtime.model",
    "Model": "edge_mote.runtime.model",
    "ModelInfo": "edge_mote.runtime.model",
    "RoutingTrace": "edge_mote.runtime.model",
    "Completion": "edge_mote.runtime.model",
    "Steering": "edge_mote.steering",
    "ExpertState": "edge_mote.steering",
}

__all__ = ["EdgeMoteError", "UserError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge_mote' has no attribute {name!r}")
