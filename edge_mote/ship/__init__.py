"""Ship: turn a model into a small GGUF that still carries its steering.

``convert`` (transformers folder or Hub repo -> GGUF, llama.cpp's own converter, plus edge-mote profiles),
``quantize`` (llama.cpp's quantizer with per-tensor type overrides: uniform or the expert-aware ``moe`` recipe,
optionally with an importance matrix from calibration prompts), ``prune`` (physically remove routed experts,
bit-exact on quantized tensors, profiles renumbered) with ``saliency`` (which experts to remove), and ``inspect``
(what a GGUF is made of, before shipping). Every writer goes through ``edge_mote.fileio.atomic_output``.
"""
