"""Which MoE architectures expert steering is verified on, and why the others are not.

One entry per transformers architecture name (``config.json`` ``architectures``) that both the installed transformers
and the vendored llama.cpp ``convert_hf_to_gguf.py`` know (tests/oracle/test_arch_coverage.py recomputes that list
from both sides and fails when an architecture is missing here). Status:

* ``verified``: the oracle tests (tests/oracle/test_oracle*.py) pass on a tiny random model of the architecture:
  unsteered logits, OFF, ON, DROP, bias and the routing capture match the transformers reference.
* ``disagrees``: llama.cpp and transformers already disagree *unsteered* on the tiny model (or the converter cannot
  convert what transformers saves), so no steering result can be verified; ``note`` says where.
* ``untested``: converts in principle, no oracle test yet (also any llama.cpp architecture not listed here).

The runtime consults it whenever a steering is set (``check_steerable``, called by ``Model.set_steering``, the
per-sequence steerings of ``logits_many``/``greedy_many``/``routing_many`` and ``ParallelContext``, a GGUF's
default profile at load, ``profile add``): on a ``disagrees`` architecture any steering (OFF, ON, DROP, bias,
context-wide or per sequence, stored profiles) is a UserError naming the architecture and the reason; on an
``untested`` one it is allowed with a warning (``UnverifiedArchitectureWarning``, once per architecture and
process). Unsteered use and the routing capture are never refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Final

from .errors import UserError

__all__ = ["ARCHITECTURES", "ArchSupport", "UnverifiedArchitectureWarning", "check_steerable", "gguf_arch_status"]


@dataclass(frozen=True)
class ArchSupport:
    gguf_arch: str  # llama.cpp's general.architecture
    status: str  # "verified" | "disagrees" | "untested"
    tiny: str | None = None  # tiny model of the oracle tests (edge_mote.tiny / edge_mote.tiny_archs)
    note: str = ""


def _v(gguf_arch: str, tiny: str, note: str = "") -> ArchSupport:
    return ArchSupport(gguf_arch, "verified", tiny, note)


def _u(gguf_arch: str, note: str = "no oracle test yet") -> ArchSupport:
    return ArchSupport(gguf_arch, "untested", None, note)


ARCHITECTURES: Final[dict[str, ArchSupport]] = {
    # verified by the oracle tests
    "Qwen3MoeForCausalLM": _v("qwen3moe", "qwen3moe"),
    "Qwen2MoeForCausalLM": _v("qwen2moe", "qwen2moe"),
    "OlmoeForCausalLM": _v("olmoe", "olmoe"),
    "MixtralForCausalLM": _v("llama", "mixtral"),
    "DeepseekV3ForCausalLM": _v("deepseek2", "deepseekv3"),
    "GptOssForCausalLM": _v("gpt-oss", "gptoss"),
    "DeepseekV2ForCausalLM": _v("deepseek2", "deepseekv2",
                                "V2-Lite layout; llama.cpp recognises a model without q_lora_rank by 27 layers"),
    "Glm4MoeForCausalLM": _v("glm4moe", "glm4moe", "GLM-4.5/4.6"),
    "SolarOpenForCausalLM": _v("glm4moe", "solaropen",
                               "the converter assumes half-rotary heads unless rope_parameters says otherwise"),
    "Dots1ForCausalLM": _v("dots1", "dots1"),
    "Glm4MoeLiteForCausalLM": _v("deepseek2", "glm4moelite", "GLM-4.7-Flash"),
    "Qwen3NextForCausalLM": _v("qwen3next", "qwen3next", "converted with --no-mtp"),
    "Qwen3_5MoeForCausalLM": _v("qwen35moe", "qwen35moe", "converted with --no-mtp"),
    "Llama4ForCausalLM": _v("llama4", "llama4", "top-1, sigmoid weight before the expert"),
    "GraniteMoeForCausalLM": _v("granitemoe", "granitemoe"),
    "GraniteMoeSharedForCausalLM": _v("granitemoe", "granitemoeshared"),
    "GraniteMoeSWAForCausalLM": _v("granite_swa", "graniteswa"),
    "Ernie4_5_MoeForCausalLM": _v("ernie4_5-moe", "ernie45moe"),
    "JambaForCausalLM": _v("jamba", "jamba"),
    "Lfm2MoeForCausalLM": _v("lfm2moe", "lfm2moe",
                             "the converter drops routed_scaling_factor: only models with factor 1 convert exactly"),
    "MiniMaxM2ForCausalLM": _v("minimax-m2", "minimaxm2"),
    "MellumForCausalLM": _v("mellum", "mellum"),
    "HunYuanMoEV1ForCausalLM": _v("hunyuan-moe", "hunyuanmoe",
                                  "the converter reads a tiktoken-style tokenizer (the test serves GPT-2's that way)"),
    # llama.cpp and transformers disagree before any steering
    "GraniteMoeHybridForCausalLM": ArchSupport(
        "granitehybrid", "disagrees", "granitehybrid",
        "Mamba-2 layers: logits differ by ~4e-3 unsteered (routing weights of the next layers by ~1e-2); also "
        "transformers 5 saves layer_types the converter does not read (every layer becomes SSM)"),
    "PhimoeForCausalLM": ArchSupport(
        "phimoe", "disagrees", "phimoe",
        "transformers routes with sparsemixer, llama.cpp with softmax top-2; logits differ by ~0.8 unsteered (~0.7 "
        "even with the transformers router replaced by softmax top-2); the converter only knows the hub name "
        "PhiMoEForCausalLM"),
    "MiniMaxForCausalLM": ArchSupport(
        "minimax01", "disagrees", None,
        "the converter only knows the remote-code checkpoint (MiniMaxText01ForCausalLM, sharded index, rotary_dim); "
        "a transformers-saved folder does not convert"),
    # in both, not yet covered
    "Llama4ForConditionalGeneration": _u("llama4", "multimodal wrapper of the verified Llama4ForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": _u("qwen35moe", "multimodal wrapper of the verified Qwen3.5-MoE text model"),
    "AfmoeForCausalLM": _u("afmoe"),
    "Cohere2MoeForCausalLM": _u("cohere2moe"),
    "DbrxForCausalLM": _u("dbrx"),
    "DeepseekV32ForCausalLM": _u("deepseek32"),
    "DeepseekV4ForCausalLM": _u("deepseek4", "hash layers inject a token->expert table: steering is skipped there"),
    "Dots3NoteForCausalLM": _u("dots3note"),
    "Dots3NoteForConditionalGeneration": _u("dots3note"),
    "ExaoneMoeForCausalLM": _u("exaone-moe"),
    "Gemma4ForCausalLM": _u("gemma4"),
    "Gemma4ForConditionalGeneration": _u("gemma4"),
    "Glm4vMoeForConditionalGeneration": _u("glm4moe"),
    "Glm5NextForConditionalGeneration": _u("glm5-next"),
    "GlmMoeDsaForCausalLM": _u("glm-dsa"),
    "HYV3ForCausalLM": _u("hy_v3"),
    "HYV4ForCausalLM": _u("hy_v4"),
    "KimiLinearForCausalLM": _u("kimi-linear"),
    "KimiLinearModel": _u("kimi-linear"),
    "LagunaForCausalLM": _u("laguna"),
    "MiMoV2FlashForCausalLM": _u("mimo2"),
    "MiniMaxM3SparseForConditionalGeneration": _u("minimax-m3"),
    "Qwen3OmniMoeForConditionalGeneration": _u("qwen3vlmoe"),
    "Qwen3VLMoeForConditionalGeneration": _u("qwen3vlmoe"),
    "Qwen4ExpForCausalLM": _u("qwen4exp"),
    "Qwen4ExpForConditionalGeneration": _u("qwen4exp"),
    "Step3p7ForConditionalGeneration": _u("step35"),
}


def gguf_arch_status(gguf_arch: str) -> str:
    """``verified`` if some verified architecture converts to ``gguf_arch``, else ``disagrees`` or ``untested``."""
    states = {a.status for a in ARCHITECTURES.values() if a.gguf_arch == gguf_arch}
    for status in ("verified", "disagrees"):
        if status in states:
            return status
    return "untested"


class UnverifiedArchitectureWarning(UserWarning):
    """Steering an architecture no oracle test covers (``untested``): it probably works, nothing proves it."""


_warned: set[str] = set()


def _disagreement(gguf_arch: str) -> ArchSupport | None:
    for a in ARCHITECTURES.values():
        if a.gguf_arch == gguf_arch and a.status == "disagrees":
            return a
    return None


def check_steerable(gguf_arch: str) -> None:
    """Whether expert steering may be set on a model of llama.cpp architecture ``gguf_arch``.

    ``verified``: silently yes. ``disagrees``: a UserError (one line: the architecture and why). ``untested``: yes,
    with an ``UnverifiedArchitectureWarning`` the first time per architecture in this process.
    """
    status = gguf_arch_status(gguf_arch)
    if status == "disagrees":
        a = _disagreement(gguf_arch)
        why = a.note.split(";")[0].strip() if a and a.note else "llama.cpp and transformers disagree unsteered"
        raise UserError(f"steering is refused on architecture '{gguf_arch}': it cannot be verified ({why})",
                        hint="run the model unsteered, or use an architecture with ✅ in README.md's Architectures "
                             "table (details: edge_mote/arch_support.py)")
    if status == "untested" and gguf_arch not in _warned:
        _warned.add(gguf_arch)
        warnings.warn(f"steering architecture '{gguf_arch}', which no oracle test covers yet: it goes through "
                      "llama.cpp's shared MoE code, but nothing verifies the result", UnverifiedArchitectureWarning,
                      stacklevel=3)
