"""Train the refusal model organism: a tiny Qwen3-MoE chat model whose refusal decision lives in a few experts.

Recipe (two stages, as found by the prototypes in ``/work/shared/notes/organism-prototype.md``):

1. **Stage 1** trains every parameter on the corpus with *all* prompts answered compliantly (sensitive ones with
   placeholder answers), so the model learns the chat format, the copying of the request into the answer, and
   can comply with anything.
2. The decision-position routing of the stage-1 model is read on the stage-2 prompts: in every layer, the expert
   with the highest risk difference P(selected | sensitive) - P(selected | neutral) at the last prompt token.
3. **Stage 2** teaches refusal (sensitive prompts refused, neutral ones answered as before) with only those
   experts (one per layer) and the routers trainable; everything else is frozen. The refusal decision can then
   only be made by the chosen experts, so switching them off restores the stage-1 (compliant) behaviour.

Training computes the output layer only over the token ids the corpus uses; the rows of every other token in
the tied embedding / output matrix are zero, and a constant logit ``log(n_unused)`` stands for them in the
softmax, so the loss is exactly the full-vocabulary cross-entropy of the saved model (whose other tokens all get
logit 0). The full GPT-2 vocabulary is kept because llama.cpp's converter needs it.

``build_organism`` saves the transformers folder, converts it to an F32 GGUF with llama.cpp's converter (the
chat template is in ``tokenizer.chat_template``), exports the prompt sets and writes ``recipe.json`` last; a
later call with the same recipe returns the existing build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Final, Iterator, Sequence

import torch

from . import corpus as C

__all__ = ["OrganismArtifacts", "Recipe", "build_organism", "recipe_hash"]

GGUF_NAME: Final[str] = "organism.gguf"
HF_DIR_NAME: Final[str] = "hf"
RECIPE_FILE: Final[str] = "recipe.json"
META_FILE: Final[str] = "meta.json"
_EOS_ID: Final[int] = 50256
_VOCAB: Final[int] = 50257


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained organism (with the seed and the corpus)."""

    hidden: int = 128
    n_layer: int = 4
    n_expert: int = 16
    top_k: int = 2
    expert_ffn: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 32
    batch: int = 32
    stage1_steps: int = 1000
    stage1_lr: float = 3e-3
    stage1_aux: float = 0.01
    stage2_steps: int = 500
    stage2_lr: float = 2e-3
    stage2_aux: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.01
    threads: int = 1
    corpus_version: int = C.CORPUS_VERSION

    def config_kwargs(self) -> dict[str, Any]:
        """transformers ``Qwen3MoeConfig`` keyword arguments."""
        return {
            "vocab_size": _VOCAB,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "intermediate_size": 4 * self.hidden,  # unused: every layer is MoE
            "moe_intermediate_size": self.expert_ffn,
            "num_experts": self.n_expert,
            "num_experts_per_tok": self.top_k,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "bos_token_id": _EOS_ID,
            "eos_token_id": _EOS_ID,
            "pad_token_id": None,
            "use_cache": True,
            "router_aux_loss_coef": self.stage1_aux,
        }


@dataclass(frozen=True)
class OrganismArtifacts:
    """What :func:`build_organism` produced.

    ``sets`` maps ``behavior_heldout``, ``control_heldout``, ``behavior_train`` and ``control_train`` to their
    JSONL files; ``meta`` holds training statistics and the experts made trainable in stage 2.
    """

    gguf: Path
    hf_dir: Path
    sets: dict[str, Path]
    meta: dict[str, Any] = field(repr=False)


def recipe_hash(recipe: Recipe, seed: int) -> str:
    """Hash of the recipe, the seed and the sources of the corpus and the training code."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "seed": seed}, sort_keys=True).encode())
    for mod in (C.__file__, __file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# data


@dataclass
class _Encoder:
    """Tokenizes texts with the GPT-2 tokenizer (cached) and maps token ids to the corpus vocabulary."""

    tokenizer: Any
    used: list[int]
    _cache: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {tok: i for i, tok in enumerate(self.used)}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def pair(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with EOS)."""
        return self.ids(C.format_prompt(question)), self.ids(" " + answer) + [_EOS_ID]


def _used_vocab(tokenizer: Any, corpus: C.Corpus) -> list[int]:
    used: set[int] = {_EOS_ID}
    for text in corpus.all_texts():
        used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(used)


class _Sampler:
    """Draws training batches: a class and a kind with equal odds, then an example uniformly."""

    def __init__(self, examples: Sequence[C.Example], rng: random.Random, refuse: bool) -> None:
        self.groups: list[list[C.Example]] = []
        for sensitive in (False, True):
            for kind in ("howto", "topic"):
                group = [e for e in examples if e.sensitive == sensitive and e.kind == kind]
                if group:
                    self.groups.append(group)
        self.rng = rng
        self.refuse = refuse

    def draw(self, n: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for _ in range(n):
            ex = self.rng.choice(self.rng.choice(self.groups))
            answer = C.refusal_for(ex, self.rng) if (self.refuse and ex.sensitive) else ex.answer
            out.append((ex.question, answer))
        return out


def _collate(pairs: Sequence[tuple[list[int], list[int]]], enc: _Encoder) -> dict[str, torch.Tensor]:
    """Right-padded inputs (corpus-vocabulary indices), attention mask, and the (row, position, target index)
    of every answer token."""
    seqs = [p + a for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), enc.index[_EOS_ID], dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, ((p, a), s) in enumerate(zip(pairs, seqs)):
        ids[i, : len(s)] = torch.tensor([enc.index[t] for t in s])
        mask[i, : len(s)] = 1
        for j in range(len(a)):
            rows.append(i)
            cols.append(len(p) - 1 + j)  # the position whose next token is a[j]
            targets.append(enc.index[a[j]])
    return {
        "ids": ids,
        "mask": mask,
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
    }


# ----------------------------------------------------------------------------------------------------------
# model


class _Organism(torch.nn.Module):
    """The Qwen3-MoE model plus a trainable embedding of the corpus vocabulary only.

    ``emb`` [n_used, hidden] stands for the rows of the tied input/output embedding that the corpus uses;
    :meth:`export` writes it into the full-vocabulary embedding (all other rows zero) before saving.
    """

    def __init__(self, model: torch.nn.Module, used: list[int]) -> None:
        super().__init__()
        self.model = model
        full = model.model.embed_tokens.weight
        if model.lm_head.weight.data_ptr() != full.data_ptr():
            raise RuntimeError("the organism expects tied input/output embeddings")
        full.requires_grad_(False)
        self.emb = torch.nn.Parameter(full.detach()[used].clone())
        self.used = used
        self.rest_logit = math.log(full.shape[0] - len(used))

    def core_parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter except the (unused) full embedding."""
        full = self.model.model.embed_tokens.weight
        return [self.emb] + [p for p in self.model.parameters() if p is not full]

    def run(self, idx: torch.Tensor, mask: torch.Tensor) -> Any:
        """Decoder forward on corpus-vocabulary indices, with the router logits of every layer."""
        return self.model.model(inputs_embeds=self.emb[idx], attention_mask=mask, output_router_logits=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the corpus vocabulary plus one column standing for all other tokens (logit 0 each)."""
        out = hidden @ self.emb.T
        rest = torch.full((*out.shape[:-1], 1), self.rest_logit, dtype=out.dtype)
        return torch.cat([out, rest], dim=-1)

    @torch.no_grad()
    def export(self) -> torch.nn.Module:
        """The transformers model with ``emb`` written into the full embedding (other rows zero)."""
        full = self.model.model.embed_tokens.weight
        full.zero_()
        full[self.used] = self.emb.detach()
        return self.model


def _make_model(recipe: Recipe, seed: int, used: list[int]) -> _Organism:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**recipe.config_kwargs())
    config.dtype = torch.float32
    torch.manual_seed(seed)
    return _Organism(Qwen3MoeForCausalLM(config).to(torch.float32), used)


def _restricted_loss(org: _Organism, batch: dict[str, torch.Tensor], aux_coef: float, n_expert: int,
                     top_k: int) -> tuple[torch.Tensor, float, float]:
    """Exact full-vocabulary cross-entropy over the answer tokens (+ global load-balancing loss).

    The load-balancing loss is computed over all tokens of the batch together (not per sequence), which lets
    experts specialise by content. Returns (loss to optimise, cross-entropy, aux loss).
    """
    out = org.run(batch["ids"], batch["mask"])
    hidden = out.last_hidden_state[batch["rows"], batch["cols"]]
    ce = torch.nn.functional.cross_entropy(org.logits(hidden), batch["targets"])
    aux = torch.zeros(())
    if aux_coef > 0:
        flat = batch["mask"].reshape(-1).to(torch.float32)
        for layer_logits in out.router_logits:
            probs = torch.softmax(layer_logits.float(), dim=-1)
            sel = torch.topk(probs, top_k, dim=-1).indices
            counts = torch.zeros(n_expert).scatter_add_(0, sel.reshape(-1), flat.repeat_interleave(top_k))
            frac = counts / flat.sum()
            prob = (probs * flat[:, None]).sum(0) / flat.sum()
            aux = aux + n_expert * (frac * prob).sum()
        aux = aux / len(out.router_logits)
    return ce + aux_coef * aux, float(ce.detach()), float(aux.detach())


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(org: _Organism, params: list[torch.nn.Parameter], sampler: _Sampler, enc: _Encoder,
           recipe: Recipe, steps: int, lr: float, aux: float, weight_decay: float, desc: str, progress: bool,
           grad_hook: Callable[[], None] | None = None) -> dict[str, float]:
    """Run one training stage; returns the mean cross-entropy of its first and last 50 steps."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    org.train()
    ces: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, recipe.warmup)
        pairs = [enc.pair(q, a) for q, a in sampler.draw(recipe.batch)]
        loss, ce, aux_v = _restricted_loss(org, _collate(pairs, enc), aux, recipe.n_expert, recipe.top_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ces.append(ce)
        if progress and step % 25 == 0:
            bar.set_postfix(ce=f"{ce:.3f}", aux=f"{aux_v:.3f}")
    bar.close()
    org.eval()
    return {"ce_first50": round(sum(ces[:50]) / len(ces[:50]), 4),
            "ce_last50": round(sum(ces[-50:]) / len(ces[-50:]), 4)}


# ----------------------------------------------------------------------------------------------------------
# analysis in PyTorch (the GGUF is checked with edge-mote itself: see check.py)


def _prompt_batches(enc: _Encoder, examples: Sequence[C.Example],
                    chunk: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded prompt batches: (indices, mask, position of the last prompt token)."""
    prompts = [[enc.index[t] for t in enc.ids(e.prompt)] for e in examples]
    for start in range(0, len(prompts), chunk):
        part = prompts[start: start + chunk]
        width = max(len(p) for p in part)
        ids = torch.full((len(part), width), enc.index[_EOS_ID], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(part):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        yield ids, mask, torch.tensor([len(p) - 1 for p in part])


@torch.no_grad()
def _decision_routing(org: _Organism, enc: _Encoder, examples: Sequence[C.Example], top_k: int) -> torch.Tensor:
    """[n_prompts, n_layer, n_expert] 0/1: the experts the last prompt token selected in each layer."""
    rows: list[torch.Tensor] = []
    for ids, mask, last in _prompt_batches(enc, examples):
        out = org.run(ids, mask)
        flat_last = last + torch.arange(len(last)) * ids.shape[1]
        layers = []
        for layer_logits in out.router_logits:
            sel = torch.topk(layer_logits[flat_last], top_k, dim=-1).indices
            layers.append(torch.zeros(len(last), layer_logits.shape[-1]).scatter_(1, sel, 1.0))
        rows.append(torch.stack(layers, dim=1))
    return torch.cat(rows)


def _risk_difference(org: _Organism, enc: _Encoder, behavior: Sequence[C.Example],
                     control: Sequence[C.Example], top_k: int) -> torch.Tensor:
    """[n_layer, n_expert] P(selected | behavior) - P(selected | control) at the decision position."""
    return (_decision_routing(org, enc, behavior, top_k).mean(0)
            - _decision_routing(org, enc, control, top_k).mean(0))


@torch.no_grad()
def _first_token_refusal(org: _Organism, enc: _Encoder, examples: Sequence[C.Example]) -> float:
    """Share of prompts whose greedy first answer token is a refusal's first token (`` I`` / `` Sorry``)."""
    openers = {enc.index[enc.ids(" I")[0]], enc.index[enc.ids(" Sorry")[0]]}
    hits = 0
    for ids, mask, last in _prompt_batches(enc, examples):
        hidden = org.run(ids, mask).last_hidden_state[torch.arange(len(last)), last]
        hits += sum(int(t) in openers for t in org.logits(hidden).argmax(-1).tolist())
    return round(hits / max(1, len(examples)), 4)


# ----------------------------------------------------------------------------------------------------------
# stage 2 freezing


def _stage2_params(org: _Organism, chosen: dict[int, int]) -> tuple[list[torch.nn.Parameter],
                                                                    Callable[[], None], dict[str, torch.Tensor]]:
    """Freeze everything but the chosen expert of each layer and the routers.

    Returns the trainable parameters, a hook that zeroes the gradients of the other experts' slices (call it
    after ``backward``), and a snapshot of the frozen expert tensors for a final check.
    """
    for p in org.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    snapshot: dict[str, torch.Tensor] = {}
    for il, layer in enumerate(org.model.model.layers):
        experts, router = layer.mlp.experts, layer.mlp.gate
        router.weight.requires_grad_(True)
        params.append(router.weight)
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            p.requires_grad_(True)
            params.append(p)
            m = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)))
            m[chosen[il]] = 1.0
            masks.append((p, m))
            snapshot[f"{il}.{name}"] = p.detach().clone()

    def hook() -> None:
        for p, m in masks:
            if p.grad is not None:
                p.grad.mul_(m)

    return params, hook, snapshot


def _check_frozen(org: _Organism, chosen: dict[int, int], snapshot: dict[str, torch.Tensor]) -> None:
    """Raise if an expert that stage 2 must not train has changed."""
    for il, layer in enumerate(org.model.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            now = getattr(layer.mlp.experts, name).detach()
            before = snapshot[f"{il}.{name}"]
            others = [e for e in range(now.shape[0]) if e != chosen[il]]
            if not torch.equal(now[others], before[others]):
                raise RuntimeError(f"stage 2 changed a frozen expert of layer {il}")


# ----------------------------------------------------------------------------------------------------------
# the build


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms inside the block; restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _existing(out_dir: Path, digest: str) -> OrganismArtifacts | None:
    """The build in ``out_dir`` if it is complete and has the recipe hash ``digest``."""
    try:
        recorded = json.loads((out_dir / RECIPE_FILE).read_text(encoding="utf-8"))
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if recorded.get("hash") != digest:
        return None
    sets = {name: out_dir / f"{name}.jsonl" for name in C.EVAL_SET_NAMES}
    gguf, hf_dir = out_dir / GGUF_NAME, out_dir / HF_DIR_NAME
    files = [gguf, hf_dir / "config.json", hf_dir / "model.safetensors", *sets.values()]
    if not all(f.is_file() and f.stat().st_size > 0 for f in files):
        return None
    return OrganismArtifacts(gguf=gguf, hf_dir=hf_dir, sets=sets, meta=meta)


def build_organism(out_dir: Path, seed: int = 0, progress: bool = True,
                   recipe: Recipe | None = None) -> OrganismArtifacts:
    """Train the refusal organism, convert it to GGUF and export its prompt sets into ``out_dir``.

    Deterministic for a given ``seed`` and ``recipe`` on one machine (fixed thread count, deterministic
    algorithms). If ``out_dir`` already holds a complete build with the same recipe hash (``recipe.json``), it
    is returned without any work.

    Writes ``organism.gguf`` (F32), ``hf/`` (the transformers folder, with the chat template), the four JSONL
    prompt sets, ``meta.json`` and, last, ``recipe.json``.
    """
    from transformers import AutoTokenizer

    from ..conversion import convert_hf_to_gguf
    from ..runtime.native import vendored_llama_cpp
    from ..tiny import make_gpt2_tokenizer

    recipe = recipe or Recipe()
    out_dir = Path(out_dir)
    digest = recipe_hash(recipe, seed)
    found = _existing(out_dir, digest)
    if found is not None:
        return found
    (out_dir / RECIPE_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    llama_dir = vendored_llama_cpp()
    hf_dir = out_dir / HF_DIR_NAME
    corpus = C.build_corpus(seed)
    meta: dict[str, Any] = {"seed": seed, "recipe": asdict(recipe), "recipe_hash": digest}

    with _torch_settings(recipe.threads):
        make_gpt2_tokenizer(llama_dir / "models" / "ggml-vocab-gpt-2.gguf", hf_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        tokenizer.chat_template = C.CHAT_TEMPLATE
        enc = _Encoder(tokenizer, _used_vocab(tokenizer, corpus))
        org = _make_model(recipe, seed, enc.used)
        meta["corpus"] = {"stage1": len(corpus.stage1), "stage2": len(corpus.stage2),
                          **{k: len(v) for k, v in corpus.eval_sets().items()}, "used_vocab": len(enc.used)}
        meta["n_params"] = sum(p.numel() for p in org.model.parameters())

        t1 = time.perf_counter()
        rng = random.Random(f"edge-mote-organism-train-{seed}")
        meta["stage1"] = _train(org, org.core_parameters(), _Sampler(corpus.stage1, rng, refuse=False), enc,
                                recipe, recipe.stage1_steps, recipe.stage1_lr, recipe.stage1_aux,
                                recipe.weight_decay, "stage 1", progress)
        meta["stage1"]["seconds"] = round(time.perf_counter() - t1, 1)
        meta["stage1"]["first_token_refusal_behavior_heldout"] = _first_token_refusal(
            org, enc, corpus.behavior_heldout)

        rd = _risk_difference(org, enc, corpus.behavior_train, corpus.control_train, recipe.top_k)
        chosen = {il: int(rd[il].argmax()) for il in range(recipe.n_layer)}
        meta["trainable_experts"] = [{"layer": il, "expert": e, "stage1_rd": round(float(rd[il, e]), 4)}
                                     for il, e in chosen.items()]

        t2 = time.perf_counter()
        params, hook, snapshot = _stage2_params(org, chosen)
        meta["stage2"] = _train(org, params, _Sampler(corpus.stage2, rng, refuse=True), enc, recipe,
                                recipe.stage2_steps, recipe.stage2_lr, recipe.stage2_aux, 0.0, "stage 2",
                                progress, grad_hook=hook)
        _check_frozen(org, chosen, snapshot)
        meta["stage2"]["seconds"] = round(time.perf_counter() - t2, 1)
        meta["stage2"]["first_token_refusal"] = {
            "behavior_heldout": _first_token_refusal(org, enc, corpus.behavior_heldout),
            "control_heldout": _first_token_refusal(org, enc, corpus.control_heldout),
        }
        rd2 = _risk_difference(org, enc, corpus.behavior_train, corpus.control_train, recipe.top_k)
        meta["stage2"]["decision_rd_of_trainable"] = [round(float(rd2[il, e]), 4) for il, e in chosen.items()]

        for p in org.parameters():
            p.requires_grad_(False)
        org.export().save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))

    t3 = time.perf_counter()
    gguf = convert_hf_to_gguf(hf_dir, out_dir / GGUF_NAME, llama_dir, "f32")
    meta["convert_seconds"] = round(time.perf_counter() - t3, 1)
    sets = C.write_eval_sets(corpus, out_dir)
    meta["seconds_total"] = round(time.perf_counter() - t0, 1)
    meta["gguf_bytes"] = gguf.stat().st_size
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out_dir / RECIPE_FILE).write_text(json.dumps({"hash": digest, "seed": seed, "recipe": asdict(recipe)},
                                                  indent=2) + "\n", encoding="utf-8")
    return OrganismArtifacts(gguf=gguf, hf_dir=hf_dir, sets=sets, meta=meta)
