"""Tiny, randomly initialised transformers MoE models of real architectures.

These models exist only for tests: they are small enough to build, convert to GGUF and run in a
few seconds on a CPU, yet they use the real transformers modelling code (and therefore the real
llama.cpp converter paths) of each supported architecture.

Every model has hidden size 64 and 3 decoder layers, uses the full GPT-2 vocabulary (50257 tokens,
taken from llama.cpp's ``models/ggml-vocab-gpt-2.gguf`` so that the converter recognises the
pre-tokenizer as ``gpt-2`` without network access) and is saved in float32.

Router weights are drawn with a much larger standard deviation than the rest of the model
(0.5 for softmax routers, 0.25 for sigmoid routers) so that the routing is well separated: the
~1e-6 numerical noise between transformers and llama.cpp must not flip an expert choice.

Known pitfalls handled here (see ``/work/shared/notes/oracle-testing-gotchas.md``):

* OLMoE: llama.cpp's converter hard-codes ``rms_norm_eps = 1e-5``, so the config uses 1e-5.
* DeepSeek-V3: transformers no longer writes ``scoring_func`` to ``config.json``; without
  ``"scoring_func": "sigmoid"`` and ``"topk_method": "noaux_tc"`` llama.cpp falls back to softmax
  gating, so both keys are added to ``config.json`` after saving. MTP layers are disabled.
* GPT-OSS: ``GptOssConfig`` defaults to YaRN with ``truncate: false``, which llama.cpp does not
  implement (it always floors/ceils the correction dims); the tiny model uses ``truncate: true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import torch

__all__ = [
    "TINY_ARCHS",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "make_gpt2_tokenizer",
    "make_tiny_hf_model",
    "tiny_config_kwargs",
]

#: Architectures :func:`make_tiny_hf_model` can build (llama.cpp-style short names).
TINY_ARCHS: Final[tuple[str, ...]] = ("qwen3moe", "qwen2moe", "olmoe", "mixtral", "deepseekv3", "gptoss")

#: The GPT-2 end-of-text token and its id in the GPT-2 vocabulary.
EOS_TOKEN: Final[str] = "<|endoftext|>"
EOS_TOKEN_ID: Final[int] = 50256

_GPT2_VOCAB_SIZE: Final[int] = 50257
_HIDDEN: Final[int] = 64
_N_LAYER: Final[int] = 3
_INIT_STD: Final[float] = 0.05
_SOFTMAX_ROUTER_STD: Final[float] = 0.5
_SIGMOID_ROUTER_STD: Final[float] = 0.25
_ROUTER_BIAS_STD: Final[float] = 0.5
_SCORE_CORRECTION_STD: Final[float] = 0.1

# transformers configuration class name and model class name for each arch.
_HF_CLASSES: Final[dict[str, tuple[str, str]]] = {
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "deepseekv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "gptoss": ("GptOssConfig", "GptOssForCausalLM"),
}


def _common_kwargs() -> dict[str, Any]:
    """Configuration entries shared by every tiny architecture."""
    return {
        "vocab_size": _GPT2_VOCAB_SIZE,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _N_LAYER,
        "max_position_embeddings": 4096,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": None,
        "use_cache": True,
    }


def tiny_config_kwargs(arch: str) -> dict[str, Any]:
    """Return the transformers configuration keyword arguments of the tiny model for ``arch``.

    Raises:
        ValueError: if ``arch`` is not one of :data:`TINY_ARCHS`.
    """
    kw = _common_kwargs()
    if arch == "qwen3moe":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    elif arch == "qwen2moe":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    elif arch == "olmoe":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=32,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            rms_norm_eps=1e-5,  # llama.cpp's converter hard-codes 1e-5 for OLMoE
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        )
    elif arch == "mixtral":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    elif arch == "deepseekv3":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            rms_norm_eps=1e-6,
            num_mtp_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        )
    elif arch == "gptoss":
        kw.update(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=128,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150_000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": True,  # llama.cpp always truncates the YaRN correction range
                "original_max_position_embeddings": 4096,
            },
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    return kw


def make_gpt2_tokenizer(vocab_gguf: Path, out_dir: Path) -> Path:
    """Build the full GPT-2 byte-level BPE tokenizer from a llama.cpp vocab GGUF and save it.

    Reads ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges`` from ``vocab_gguf`` (normally
    llama.cpp's ``models/ggml-vocab-gpt-2.gguf``) and writes ``tokenizer.json`` and friends into
    ``out_dir`` with :meth:`PreTrainedTokenizerFast.save_pretrained`. The vocabulary is not
    truncated, so llama.cpp's converter recognises the pre-tokenizer hash as ``gpt-2``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: if the GGUF lacks the tokens or merges, or is not the GPT-2 vocabulary.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(vocab_gguf))
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.merges" not in fields:
        raise ValueError(f"{vocab_gguf}: no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    tokens: list[str] = [str(t) for t in fields["tokenizer.ggml.tokens"].contents()]
    merge_lines: list[str] = [str(m) for m in fields["tokenizer.ggml.merges"].contents()]
    if len(tokens) != _GPT2_VOCAB_SIZE or tokens[EOS_TOKEN_ID] != EOS_TOKEN:
        raise ValueError(f"{vocab_gguf}: not the GPT-2 vocabulary ({len(tokens)} tokens)")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for line in merge_lines:
        left, sep, right = line.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{vocab_gguf}: malformed merge {line!r}")
        merges.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOS_TOKEN])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=1024,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def _router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the router (gate) module of every MoE layer of a tiny model, in layer order."""
    routers: list[torch.nn.Module] = []
    for layer in model.model.layers:  # type: ignore[union-attr]
        mlp = layer.mlp
        router = getattr(mlp, "router", None)
        if router is None and hasattr(mlp, "experts"):
            router = getattr(mlp, "gate", None)
        if router is not None:
            routers.append(router)
    return routers


@torch.no_grad()
def _randomise(model: torch.nn.Module, arch: str, gen: torch.Generator) -> None:
    """Overwrite routers and biases so routing is well separated and every parameter matters.

    * router weights: N(0, 0.5) (softmax routers) or N(0, 0.25) (DeepSeek's sigmoid router);
    * GPT-OSS router bias: N(0, 0.5);
    * DeepSeek ``e_score_correction_bias``: N(0, 0.1), never zero;
    * every other bias (attention / expert biases that transformers zero-initialises): N(0, 0.05).
    """
    routers = _router_modules(model)
    if not routers:
        raise RuntimeError(f"{arch}: found no MoE routers in the tiny model")
    router_std = _SIGMOID_ROUTER_STD if arch == "deepseekv3" else _SOFTMAX_ROUTER_STD
    router_params: set[int] = set()
    for router in routers:
        weight = router.weight
        weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * router_std)
        router_params.add(id(weight))
        bias = getattr(router, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=gen, dtype=bias.dtype) * _ROUTER_BIAS_STD)
            router_params.add(id(bias))
        corr = getattr(router, "e_score_correction_bias", None)
        if isinstance(corr, torch.Tensor):
            values = torch.randn(corr.shape, generator=gen, dtype=torch.float32) * _SCORE_CORRECTION_STD
            values = torch.where(values.abs() < 1e-3, torch.full_like(values, 1e-2), values)
            corr.copy_(values.to(corr.dtype))
    for name, param in model.named_parameters():
        if id(param) in router_params:
            continue
        if name.endswith("bias") or name.endswith("_bias"):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * _INIT_STD)


def _patch_config_json(arch: str, out_dir: Path) -> None:
    """Add keys llama.cpp's converter needs but transformers no longer writes."""
    if arch != "deepseekv3":
        return
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["scoring_func"] = "sigmoid"
    config["topk_method"] = "noaux_tc"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_hf_model(
    arch: str,
    out_dir: Path,
    vocab_gguf: Path,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random float32 MoE model of ``arch`` and save it as a transformers folder.

    The result is deterministic for a given ``seed`` (``torch.manual_seed(seed)`` before
    construction, and a generator seeded with ``seed`` for the router re-initialisation).

    Args:
        arch: one of :data:`TINY_ARCHS`.
        out_dir: folder to write (created if needed); receives ``config.json``,
            ``model.safetensors`` and the GPT-2 tokenizer files.
        vocab_gguf: llama.cpp's ``models/ggml-vocab-gpt-2.gguf``.
        seed: random seed.
        **config_overrides: entries replacing those of :func:`tiny_config_kwargs`.

    Returns:
        ``out_dir``.
    """
    import transformers

    if arch not in _HF_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    config_name, model_name = _HF_CLASSES[arch]
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, model_name)

    kwargs = tiny_config_kwargs(arch)
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)
    config.dtype = torch.float32

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    _randomise(model, arch, gen)
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    _patch_config_json(arch, out_dir)
    make_gpt2_tokenizer(vocab_gguf, out_dir)
    return out_dir
