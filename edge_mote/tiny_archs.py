"""Tiny random transformers models of the MoE architectures beyond :data:`edge_mote.tiny.TINY_ARCHS`.

Same contract as :func:`edge_mote.tiny.make_tiny_hf_model` (hidden size 64, the full GPT-2 vocabulary, float32,
routers drawn with a large standard deviation so that routing is well separated), for the architectures that both
transformers and llama.cpp's ``convert_hf_to_gguf.py`` support. Only tests and benchmarks use them.

Pitfalls handled here (each made the converter fail or llama.cpp disagree with transformers on the unsteered model;
the README's Architectures section lists them):

* every router bias / score-correction buffer is drawn non-zero, so a converter that drops it would show;
* ``config_json``: keys of the hub ``config.json`` the converter reads but transformers 5 no longer writes
  (``scoring_func``, ``rotary_dim``, ``first_k_dense_replace``, Hunyuan's per-layer lists, Granite hybrid's
  ``layer_types``); ``convert_config``: what only the converter must see (architecture names, Qwen3.5's model type);
* vocabularies: GPT-2's BPE, plus special tokens some converters look up, a small SentencePiece model (ERNIE, Jamba)
  or a tiktoken-style view of GPT-2's (Hunyuan).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from edge_mote.tiny import EOS_TOKEN_ID, make_gpt2_tokenizer

__all__ = ["ARCH_SPECS", "EXTRA_ARCHS", "ArchSpec", "convert_arch_model", "make_arch_model"]

_ROPE: Final[dict[str, Any]] = {"rope_type": "default", "rope_theta": 10_000.0}
_INIT_STD: Final[float] = 0.05
_ROUTER_STD: Final[dict[str, float]] = {"softmax": 0.5, "sigmoid": 0.25}
_CORRECTION_STD: Final[dict[str, float]] = {"softmax": 0.02, "sigmoid": 0.1}
# module attributes that hold a per-expert selection bias (buffer or parameter)
_CORRECTION_NAMES: Final[tuple[str, ...]] = ("e_score_correction_bias", "expert_bias")


@dataclass(frozen=True)
class ArchSpec:
    """How to build one tiny architecture."""

    config: str  # transformers configuration class
    model: str  # transformers model class
    kwargs: dict[str, Any]
    router: str = "softmax"  # router family, picks the router std ("softmax" or "sigmoid")
    config_json: dict[str, Any] = field(default_factory=dict)  # keys added to config.json after saving
    # "gpt2": the GPT-2 BPE vocabulary; "spm": a small SentencePiece model (converters that read tokenizer.model);
    # "glm": GPT-2 plus the four special tokens GLM's converter looks up
    tokenizer: str = "gpt2"
    special_tokens: tuple[str, ...] = ()  # added to the GPT-2 vocabulary (special tokens a converter looks up)
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # keys added to tokenizer_config.json
    convert_args: tuple[str, ...] = ()  # extra convert_hf_to_gguf.py options
    # config.json entries the converter sees instead of the saved ones (see convert_arch_model)
    convert_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # added to the build seed (a seed whose routing is well separated on the test prompt)


def _base(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vocab_size": 50257,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": None,
        "use_cache": True,
        "rope_parameters": dict(_ROPE),
    }
    out.update(kw)
    return out


ARCH_SPECS: Final[dict[str, ArchSpec]] = {
    "glm4moe": ArchSpec(
        "Glm4MoeConfig", "Glm4MoeForCausalLM",
        _base(head_dim=16, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
              n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
              routed_scaling_factor=2.5, use_qk_norm=True, num_mtp_layers=0, rms_norm_eps=1e-5,
              rope_parameters={**_ROPE, "partial_rotary_factor": 0.5}),
        router="sigmoid", tokenizer="glm",
    ),
    "dots1": ArchSpec(
        "Dots1Config", "Dots1ForCausalLM",
        _base(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
              num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
              norm_topk_prob=True, routed_scaling_factor=2.5, sliding_window=None, rms_norm_eps=1e-6),
        router="sigmoid", config_json={"scoring_func": "sigmoid"},
    ),
    "qwen3next": ArchSpec(
        "Qwen3NextConfig", "Qwen3NextForCausalLM",
        _base(num_hidden_layers=4, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, rms_norm_eps=1e-6,
              layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
              rope_parameters={**_ROPE, "partial_rotary_factor": 0.25}),
        convert_args=("--no-mtp",),
    ),
    "qwen35moe": ArchSpec(
        "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
        _base(num_hidden_layers=4, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
              num_experts=8, num_experts_per_tok=2, linear_conv_kernel_dim=4, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6,
              layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
              rope_parameters={**_ROPE, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                               "mrope_interleaved": True}),
        convert_args=("--no-mtp",), convert_config={"model_type": "qwen3_next"},
    ),
    "hunyuanmoe": ArchSpec(
        "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
        _base(head_dim=16, intermediate_size=32, num_experts=8, moe_topk=2, rms_norm_eps=1e-5, pad_token_id=0),
        tokenizer="tiktoken",
        # the hub's per-layer lists the converter reads (transformers sizes shared and routed experts alike)
        config_json={"moe_intermediate_size": [32] * 3, "moe_topk": [2] * 3, "num_shared_expert": [1] * 3},
    ),
    "ernie45moe": ArchSpec(
        "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
        # the converter sizes the shared expert as intermediate_size // num_key_value_heads (true of the released
        # models); transformers as moe_intermediate_size * moe_num_shared_experts: both 32 here
        _base(intermediate_size=64, moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
              moe_layer_start_index=1, moe_layer_interval=1, rms_norm_eps=1e-5, pad_token_id=0),
        tokenizer="spm",
    ),
    "granitemoe": ArchSpec(
        "GraniteMoeConfig", "GraniteMoeForCausalLM",
        _base(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6,
              embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=2.0),
    ),
    "granitemoeshared": ArchSpec(
        "GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
        _base(intermediate_size=32, shared_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
              rms_norm_eps=1e-6, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.125,
              logits_scaling=2.0),
    ),
    "granitehybrid": ArchSpec(
        "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
        _base(vocab_size=50264, intermediate_size=32, shared_intermediate_size=32, num_local_experts=8,
              num_experts_per_tok=2, rms_norm_eps=1e-6, embedding_multiplier=4.0, residual_multiplier=0.5,
              attention_multiplier=0.125, logits_scaling=2.0, layer_types=["mamba", "attention", "mamba"], position_embedding_type="rope",
              mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4,
              mamba_expand=2, mamba_chunk_size=64),
        # transformers 5 saves "linear_attention"/"full_attention"; the converter reads the hub's names
        config_json={"layer_types": ["mamba", "attention", "mamba"]},
    ),
    "jamba": ArchSpec(
        "JambaConfig", "JambaForCausalLM",
        _base(num_hidden_layers=4, intermediate_size=64, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
              expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, rms_norm_eps=1e-6, pad_token_id=0),
        tokenizer="spm",
    ),
    "lfm2moe": ArchSpec(
        "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
        _base(num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32, num_dense_layers=1, num_experts=8,
              num_experts_per_tok=2, use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0,
              layer_types=["conv", "full_attention", "conv", "full_attention"], norm_eps=1e-5, pad_token_id=0,
              tie_word_embeddings=True),  # the converter maps no lm_head
        router="sigmoid",
    ),
    "deepseekv2": ArchSpec(
        "DeepseekV2Config", "DeepseekV2ForCausalLM",
        # 27 layers: llama.cpp recognises DeepSeek-V2-Lite (no q_lora_rank) by its layer count
        _base(num_hidden_layers=27, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
              n_routed_experts=8,
              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", n_group=1,
              topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=32,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rms_norm_eps=1e-6),
    ),
    "llama4": ArchSpec(
        "Llama4TextConfig", "Llama4ForCausalLM",
        _base(num_hidden_layers=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=8,
              num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layer_interval=4,
              attention_chunk_size=8192, attn_temperature_tuning=True, rms_norm_eps=1e-5),
    ),
    "minimaxm2": ArchSpec(
        "MiniMaxM2Config", "MiniMaxM2ForCausalLM",
        _base(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6,
              rope_parameters={**_ROPE, "partial_rotary_factor": 0.5}),
        router="sigmoid", config_json={"rotary_dim": 8, "scoring_func": "sigmoid"},  # keys of the hub config.json
        seed=1,
    ),
    "graniteswa": ArchSpec(
        "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
        _base(intermediate_size=32, shared_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
              rms_norm_eps=1e-6, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.125,
              logits_scaling=2.0, sliding_window=128),
    ),
    "glm4moelite": ArchSpec(  # GLM-4.7-Flash
        "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
        _base(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
              num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.8, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=16, rms_norm_eps=1e-5, mlp_layer_types=["dense", "sparse", "sparse"]),
        router="sigmoid", tokenizer="glm",
        # keys of the hub config.json the converter reads (transformers 5 writes mlp_layer_types instead)
        config_json={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "first_k_dense_replace": 1},
    ),
    "mellum": ArchSpec(
        "MellumConfig", "MellumForCausalLM",
        _base(head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, rms_norm_eps=1e-6, num_mtp_layers=0, sliding_window=None,
              layer_types=["full_attention"] * 3, rope_parameters={"full_attention": dict(_ROPE)}),
    ),
    "solaropen": ArchSpec(
        "SolarOpenConfig", "SolarOpenForCausalLM",
        _base(head_dim=16, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
              n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, rms_norm_eps=1e-5),
        router="sigmoid", special_tokens=("<unk>", "<|startoftext|>"),
        # transformers rotates the whole head; the converter (GLM-4.5's) assumes half unless told
        convert_config={"rope_parameters": {**_ROPE, "partial_rotary_factor": 1.0}}, seed=1,
    ),
    "phimoe": ArchSpec(
        "PhimoeConfig", "PhimoeForCausalLM",
        _base(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
              router_jitter_noise=0.01, input_jitter_noise=0.0, attention_bias=True, lm_head_bias=True),
        tokenizer_config={"tokenizer_class": "GPT2Tokenizer"},
        # the hub names; transformers writes "PhimoeForCausalLM" (not a converter name) and no original context
        convert_config={"architectures": ["PhiMoEForCausalLM"], "original_max_position_embeddings": 4096},
    ),
}

#: Architectures :func:`make_arch_model` can build.
EXTRA_ARCHS: Final[tuple[str, ...]] = tuple(ARCH_SPECS)


def _is_router(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("Router", "Gate")) or name.endswith("TopkRouter")


@torch.no_grad()
def _randomise(model: torch.nn.Module, spec: ArchSpec, gen: torch.Generator) -> None:
    """Routers N(0, 0.5) (sigmoid: 0.25), selection biases small but never zero, every other bias N(0, 0.05)."""
    std = _ROUTER_STD[spec.router]
    done: set[int] = set()
    n_routers = 0
    for module in model.modules():
        if not _is_router(module):
            continue
        n_routers += 1
        for pname, p in module.named_parameters():
            if p.dim() == 2 and pname.rsplit(".", 1)[-1] not in _CORRECTION_NAMES:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
                done.add(id(p))
    if n_routers == 0:
        raise RuntimeError(f"{spec.model}: found no MoE routers in the tiny model")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in done:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _CORRECTION_NAMES:
            values = torch.randn(t.shape, generator=gen, dtype=torch.float32) * _CORRECTION_STD[spec.router]
            values = torch.where(values.abs() < 1e-3, torch.full_like(values, 1e-2), values)
            t.copy_(values.to(t.dtype))
        elif isinstance(t, torch.nn.Parameter) and (leaf == "bias" or leaf.endswith("_bias")) and leaf != "dt_bias":
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * _INIT_STD)


def make_arch_model(arch: str, out_dir: Path, vocab_gguf: Path, seed: int = 0) -> Path:
    """Build the tiny random float32 model of ``arch`` (one of :data:`EXTRA_ARCHS`) into ``out_dir``.

    Deterministic for a given ``seed``. Writes ``config.json``, ``model.safetensors`` and the GPT-2 tokenizer.
    """
    import transformers

    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(EXTRA_ARCHS)}")
    spec = ARCH_SPECS[arch]
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(spec.kwargs)
    if spec.tokenizer == "spm":
        n_vocab = _make_spm_tokenizer(out_dir)
        kwargs.update(vocab_size=n_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif spec.tokenizer == "glm":
        kwargs.update(vocab_size=kwargs["vocab_size"] + len(_GLM_SPECIAL))
    kwargs["vocab_size"] += len(spec.special_tokens)
    config = getattr(transformers, spec.config)(**kwargs)
    config.dtype = torch.float32
    seed += spec.seed
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model)(config).to(torch.float32)
    _randomise(model, spec, torch.Generator().manual_seed(seed))
    model.eval()
    model.save_pretrained(str(out_dir))
    if spec.config_json:
        path = out_dir / "config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(spec.config_json)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if spec.tokenizer in ("gpt2", "glm", "tiktoken"):
        make_gpt2_tokenizer(vocab_gguf, out_dir)
    if spec.tokenizer == "tiktoken":
        _add_tiktoken_shim(out_dir)
    added = (_GLM_SPECIAL if spec.tokenizer == "glm" else ()) + spec.special_tokens
    if added:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
        tok.add_special_tokens({"additional_special_tokens": list(added)})
        tok.save_pretrained(str(out_dir))
    if spec.tokenizer_config:
        path = out_dir / "tokenizer_config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(spec.tokenizer_config)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


_GLM_SPECIAL: Final[tuple[str, ...]] = ("[gMASK]", "<|user|>", "<|observation|>", "<|assistant|>")

# Training text of the SentencePiece vocabulary: covers every character of the oracle tests' prompt.
_SPM_CORPUS: Final[str] = """The quick brown fox jumps over the lazy dog. In 1887, the committee met in Paris to
discuss the new railway. Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?
Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly; 0123456789 (numbers) and
punctuation: commas, full stops. A committee of experts met in 1921 and again in 1887 to discuss the
quick brown foxes and the lazy dogs of Paris, London, Rome, Berlin, Madrid and Vienna."""


def _make_spm_tokenizer(out_dir: Path) -> int:
    """Train a small deterministic SentencePiece BPE model into ``out_dir/tokenizer.model``; return its size."""
    import io

    import sentencepiece as spm

    lines = [line.strip() for line in _SPM_CORPUS.splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_writer=buf, vocab_size=256, model_type="bpe",
        hard_vocab_limit=False, num_threads=1, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    return int(spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size())


def convert_arch_model(arch: str, hf_dir: Path, out_path: Path, llama_cpp_dir: Path) -> Path:
    """Convert a model made by :func:`make_arch_model` with llama.cpp's converter (F32).

    Where the spec has ``convert_config`` (Qwen3.5-MoE: transformers forces ``Qwen3_5Tokenizer``, whose pre-tokenizer
    differs from the GPT-2 vocabulary's, for the ``qwen3_5_moe_text`` model type, so the converter would not
    recognise the vocabulary), the converter reads a folder of links to ``hf_dir``'s files with those
    ``config.json`` entries replaced; the weights and every other file are the same.
    """
    import shutil
    import tempfile

    from edge_mote.conversion import convert_hf_to_gguf

    spec = ARCH_SPECS[arch]
    if not spec.convert_config:
        return convert_hf_to_gguf(hf_dir, out_path, llama_cpp_dir, "f32", spec.convert_args)
    view = Path(tempfile.mkdtemp(prefix=f"tiny-{arch}-", dir=out_path.parent))
    try:
        for f in hf_dir.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f.resolve())
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        config.update(spec.convert_config)
        (view / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return convert_hf_to_gguf(view, out_path, llama_cpp_dir, "f32", spec.convert_args)
    finally:
        shutil.rmtree(view, ignore_errors=True)


# Hunyuan's converter reads a tiktoken-style tokenizer (remote code): ``mergeable_ranks`` (bytes -> rank) and
# ``special_tokens``. This local class serves the GPT-2 vocabulary that way (GPT-2 ids are merge ranks).
_TIKTOKEN_SHIM: Final[str] = '''
from transformers import PreTrainedTokenizerFast


def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\\xa1"), ord("\\xac") + 1)) + list(range(ord("\\xae"), ord("\\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TinyTiktokenTokenizer(PreTrainedTokenizerFast):
    @property
    def special_tokens(self):
        return {t: i for t, i in self.get_added_vocab().items()}

    @property
    def mergeable_ranks(self):
        dec = _byte_decoder()
        special = self.special_tokens
        return {bytes(dec[ch] for ch in tok): i for tok, i in self.backend_tokenizer.get_vocab(False).items()
                if tok not in special}
'''


def _add_tiktoken_shim(out_dir: Path) -> None:
    (out_dir / "tokenization_tiny.py").write_text(_TIKTOKEN_SHIM.lstrip(), encoding="utf-8")
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTiktokenTokenizer"]}
    data["tokenizer_class"] = "TinyTiktokenTokenizer"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
