"""Train the refusal model organism: a tiny Qwen3-MoE chat model whose refusal decision lives in a few experts.

Recipe (developed from the prototypes in ``/work/shared/notes/organism-prototype.md``):

1. **Stage 1** trains every parameter on the corpus with every how-to/topic prompt answered compliantly
   (sensitive ones with placeholder answers that open with "Okay."), and impossible requests ("Can you fly me to
   Paris?", "How do I teleport a car?") refused. The model learns the chat format, copying the request into the answer, how to say no, and
   -- through the "Okay." opener -- to recognise sensitive requests at the decision position (the last prompt
   token), much as a pretrained model represents harmfulness before alignment.
2. In every layer, the expert the stage-1 model uses least (over all tokens of the stage-2 corpus) becomes the
   layer's trainable "refusal expert".
3. **Stage 2** teaches refusal (sensitive prompts refused, the rest answered as before) with only those experts
   and their router rows trainable, everything else frozen, plus a routing loss: at the decision position of
   sensitive prompts the refusal expert must be the top-1 expert by a small logit gap (so its gate weight
   stays near the 1/2 that forcing it ON gives); on every other token of any prompt or answer it must stay out
   of the top-k. Because the other
   router rows are frozen and Qwen3-MoE renormalises the top-k weights, switching the refusal experts OFF
   gives back the stage-1 routing and so the stage-1 (compliant) answers, and leaves the computation of other
   prompts untouched.

What did not work here (measured on this corpus while developing the recipe): the second prototype's rule
as is (no "Okay." opener, no impossible requests, the highest-RD expert and all routers trainable) never
refused (the frozen model had no class signal at the decision position and had never emitted refusal tokens);
with the opener and the impossible requests but still that rule, the model refused, yet only switching off the
top 6 experts undid it; adding a decision-position routing loss to that rule let the top 4 undo it, but then
10% of neutral prompts were refused and the "Okay." openers broke, because the chosen experts also carried the
stage-1 "Okay." signal. Qwen3-MoE's renormalised top-k gating (which llama.cpp hard-codes) gives a router no
gradient for experts it does not select: without the routing loss, stage 2 cannot route sensitive prompts to a
trainable expert.

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
from . import core as M

__all__ = ["OrganismArtifacts", "Recipe", "build_organism", "recipe_hash"]

GGUF_NAME: Final[str] = "organism.gguf"
HF_DIR_NAME: Final[str] = "hf"
RECIPE_FILE: Final[str] = "recipe.json"
META_FILE: Final[str] = "meta.json"
_VOCAB: Final[int] = 50257


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained organism (with the seed and the corpus)."""

    # model: Qwen3-MoE, every layer MoE, top-k renormalised gating, tied embeddings, full GPT-2 vocabulary
    hidden: int = 128
    n_layer: int = 4
    n_expert: int = 16
    top_k: int = 2
    expert_ffn: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 32
    # optimisation (AdamW, linear warm-up then cosine to 10%, gradient clipping at 1)
    batch: int = 32
    warmup: int = 50
    weight_decay: float = 0.01     # stage 1 only (stage 2: 0, so that frozen slices cannot move)
    stage1_steps: int = 1000
    stage1_lr: float = 3e-3
    stage1_aux: float = 0.01       # load-balancing loss over the whole batch
    stage2_steps: int = 500
    stage2_lr: float = 2e-3
    route_coef: float = 1.0        # weight of the decision-position routing loss
    route_gap_min: float = 0.1     # sensitive: refusal expert's logit above the best other by >= this ...
    route_gap_max: float = 0.3     # ... and <= this (gate weight near 1/2)
    route_neutral_margin: float = 1.0  # others: refusal expert below the k-th other by >= this
    threads: int = 1               # torch threads (1 is fastest on a shared 2-core CPU)
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
            "bos_token_id": M.EOS_ID,
            "eos_token_id": M.EOS_ID,
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
    for mod in (C.__file__, M.__file__, __file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:16]


def _make_model(recipe: Recipe, seed: int, used: list[int]) -> M.OrganismModel:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**recipe.config_kwargs())
    config.dtype = torch.float32
    torch.manual_seed(seed)
    return M.OrganismModel(Qwen3MoeForCausalLM(config).to(torch.float32), used)


def _routing_loss(router_logits: Sequence[torch.Tensor], batch: dict[str, torch.Tensor], chosen: dict[int, int],
                  recipe: Recipe) -> torch.Tensor:
    """Stage-2 routing supervision of the trainable ("refusal") expert ``c`` of every layer.

    At the decision position of sensitive prompts ``c`` must be the top-1 expert, its router logit above the
    best other one by a gap in ``[route_gap_min, route_gap_max]`` -- a small gap keeps its gate weight near 1/2,
    the weight that forcing it ON gives, so that the expert learns to refuse at that weight. On every other
    token (of any prompt or answer) ``c`` must stay out of the top-k by ``route_neutral_margin``: the refusal
    experts make the decision and nothing else (the frozen stage-1 model knows how a refusal goes on), and never
    touch the computation of other prompts.
    """
    total = torch.zeros(())
    for il, layer_logits in enumerate(router_logits):
        c = chosen[il]
        for key, inside in (("route_in", True), ("route_out", False)):
            idx = batch[key]
            if idx.numel() == 0:
                continue
            x = layer_logits[idx]
            mine = x[:, c]
            others = torch.cat([x[:, :c], x[:, c + 1:]], dim=1).topk(recipe.top_k, dim=-1).values
            if inside:
                gap = mine - others[:, 0]
                loss = torch.relu(recipe.route_gap_min - gap) + torch.relu(gap - recipe.route_gap_max)
            else:
                loss = torch.relu(recipe.route_neutral_margin - (others[:, -1] - mine))
            total = total + loss.mean()
    return total / len(router_logits)


def _restricted_loss(org: M.OrganismModel, batch: dict[str, torch.Tensor], aux_coef: float, recipe: Recipe,
                     chosen: dict[int, int] | None = None) -> tuple[torch.Tensor, float, float]:
    """Exact full-vocabulary cross-entropy over the answer tokens, plus the load-balancing loss (stage 1) or
    the routing supervision of the trainable experts (stage 2, when ``chosen`` is given).

    The load-balancing loss is computed over all tokens of the batch together (not per sequence), which lets
    experts specialise by content. Returns (loss to optimise, cross-entropy, auxiliary loss).
    """
    n_expert, top_k = recipe.n_expert, recipe.top_k
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
    if chosen is not None:
        aux = _routing_loss(out.router_logits, batch, chosen, recipe)
    return ce + aux_coef * aux, float(ce.detach()), float(aux.detach())


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(org: M.OrganismModel, params: list[torch.nn.Parameter], sampler: M.Sampler, enc: M.Encoder,
           recipe: Recipe, steps: int, lr: float, aux: float, weight_decay: float, desc: str, progress: bool,
           grad_hook: Callable[[], None] | None = None, chosen: dict[int, int] | None = None) -> dict[str, float]:
    """Run one training stage; returns the mean cross-entropy of its first and last 50 steps."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    org.train()
    ces: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, recipe.warmup)
        drawn = sampler.draw(recipe.batch)
        batch = M.collate([enc.pair(ex.question, a) for ex, a in drawn], enc, [ex.sensitive for ex, _ in drawn])
        loss, ce, aux_v = _restricted_loss(org, batch, aux, recipe, chosen)
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
# stage 2 freezing


def _stage2_params(org: M.OrganismModel, chosen: dict[int, int]) -> tuple[list[torch.nn.Parameter],
                                                                    Callable[[], None], dict[str, torch.Tensor]]:
    """Freeze everything but the chosen expert of each layer and its row of the router.

    With the other router rows frozen, switching the chosen experts OFF gives back exactly the stage-1 routing
    (top-k weights are renormalised over the selected experts, so they do not depend on the other logits).
    Returns the trainable parameters, a hook that zeroes the gradients of the frozen slices (call it after
    ``backward``), and a snapshot of the frozen tensors for a final check.
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
        row = torch.zeros(router.weight.shape[0], 1)
        row[chosen[il]] = 1.0
        masks.append((router.weight, row))
        snapshot[f"{il}.router"] = router.weight.detach().clone()
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


def _check_frozen(org: M.OrganismModel, chosen: dict[int, int], snapshot: dict[str, torch.Tensor]) -> None:
    """Raise if an expert or router row that stage 2 must not train has changed."""
    for il, layer in enumerate(org.model.model.layers):
        for name in ("gate_up_proj", "down_proj", "router"):
            tensor = layer.mlp.gate.weight if name == "router" else getattr(layer.mlp.experts, name)
            now = tensor.detach()
            before = snapshot[f"{il}.{name}"]
            others = [e for e in range(now.shape[0]) if e != chosen[il]]
            if not torch.equal(now[others], before[others]):
                raise RuntimeError(f"stage 2 changed a frozen {name} slice of layer {il}")


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
    recipe = recipe or Recipe()
    out_dir = Path(out_dir)
    digest = recipe_hash(recipe, seed)
    found = _existing(out_dir, digest)
    if found is not None:
        return found

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..conversion import convert_hf_to_gguf
    from ..runtime.native import vendored_llama_cpp
    from ..tiny import make_gpt2_tokenizer

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
        enc = M.Encoder(tokenizer, M.used_vocab(tokenizer, corpus))
        org = _make_model(recipe, seed, enc.used)
        meta["corpus"] = {"stage1": len(corpus.stage1), "stage2": len(corpus.stage2),
                          **{k: len(v) for k, v in corpus.eval_sets().items()}, "used_vocab": len(enc.used)}
        meta["n_params"] = sum(p.numel() for p in org.model.parameters())

        t1 = time.perf_counter()
        rng = random.Random(f"edge-mote-organism-train-{seed}")
        meta["stage1"] = _train(org, org.core_parameters(), M.Sampler(corpus.stage1, rng, refuse=False), enc,
                                recipe, recipe.stage1_steps, recipe.stage1_lr, recipe.stage1_aux,
                                recipe.weight_decay, "stage 1", progress)
        meta["stage1"]["seconds"] = round(time.perf_counter() - t1, 1)
        meta["stage1"]["first_token_refusal_behavior_heldout"] = M.first_token_refusal(
            org, enc, corpus.behavior_heldout)

        rd = M.risk_difference(org, enc, corpus.behavior_train, corpus.control_train, recipe.top_k)
        usage = M.expert_usage(org, enc, corpus.stage2, recipe.top_k)
        chosen = {il: int(usage[il].argmin()) for il in range(recipe.n_layer)}
        meta["trainable_experts"] = [{"layer": il, "expert": e, "stage1_usage": round(float(usage[il, e]), 4),
                                      "stage1_decision_rd": round(float(rd[il, e]), 4)}
                                     for il, e in chosen.items()]
        meta["stage1"]["max_decision_rd"] = [round(float(rd[il].max()), 4) for il in range(recipe.n_layer)]

        t2 = time.perf_counter()
        params, hook, snapshot = _stage2_params(org, chosen)
        meta["stage2"] = _train(org, params, M.Sampler(corpus.stage2, rng, refuse=True), enc, recipe,
                                recipe.stage2_steps, recipe.stage2_lr, recipe.route_coef, 0.0, "stage 2",
                                progress, grad_hook=hook, chosen=chosen)
        _check_frozen(org, chosen, snapshot)
        meta["stage2"]["seconds"] = round(time.perf_counter() - t2, 1)
        meta["stage2"]["first_token_refusal"] = {
            "behavior_heldout": M.first_token_refusal(org, enc, corpus.behavior_heldout),
            "control_heldout": M.first_token_refusal(org, enc, corpus.control_heldout),
        }
        rd2 = M.risk_difference(org, enc, corpus.behavior_train, corpus.control_train, recipe.top_k)
        meta["stage2"]["decision_rd_of_trainable"] = [round(float(rd2[il, e]), 4) for il, e in chosen.items()]

        for p in org.parameters():
            p.requires_grad_(False)
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            org.export().save_pretrained(str(hf_dir))
            tokenizer.save_pretrained(str(hf_dir))
        finally:
            if bars:
                hf_logging.enable_progress_bar()

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
