"""The organism's model wrapper, data batching and PyTorch-side routing analysis (used by ``train.py``).

The model is trained on the corpus vocabulary only: :class:`OrganismModel` keeps a small embedding of the token
ids the corpus uses and computes logits over them plus one constant column standing for every other token (whose
rows in the saved tied embedding are zero, so each gets logit 0): the loss is exactly the full-vocabulary one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Final, Iterator, Sequence

import torch

from . import corpus as C

__all__ = ["EOS_ID", "Encoder", "OrganismModel", "Sampler", "collate", "decision_routing", "expert_usage",
           "first_token_refusal", "prompt_batches", "risk_difference", "used_vocab"]

#: GPT-2's end-of-text token id (also used for padding; padded positions are masked).
EOS_ID: Final[int] = 50256


@dataclass
class Encoder:
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
        return self.ids(C.format_prompt(question)), self.ids(" " + answer) + [EOS_ID]


def used_vocab(tokenizer: Any, corpus: C.Corpus) -> list[int]:
    used: set[int] = {EOS_ID}
    for text in corpus.all_texts():
        used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(used)


class Sampler:
    """Draws training batches: a (class, kind) group with equal odds, then an example uniformly."""

    def __init__(self, examples: Sequence[C.Example], rng: random.Random, refuse: bool) -> None:
        self.groups: list[list[C.Example]] = []
        for sensitive in (False, True):
            for kind in ("howto", "topic", "impossible"):
                group = [e for e in examples if e.sensitive == sensitive and e.kind == kind]
                if group:
                    self.groups.append(group)
        self.rng = rng
        self.refuse = refuse

    def draw(self, n: int) -> list[tuple[C.Example, str]]:
        """``n`` (example, target answer) pairs."""
        out: list[tuple[C.Example, str]] = []
        for _ in range(n):
            ex = self.rng.choice(self.rng.choice(self.groups))
            refused = ex.kind == "impossible" or (self.refuse and ex.sensitive)
            out.append((ex, C.refusal_for(ex, self.rng) if refused else ex.answer))
        return out


def collate(pairs: Sequence[tuple[list[int], list[int]]], enc: Encoder,
            sensitive: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded inputs (corpus-vocabulary indices), attention mask, the (row, position, target index) of
    every answer token, the flat index of every decision position (last prompt token), the class flags, and
    the flat positions of the routing loss: ``route_in`` (the decision position of sensitive prompts) and
    ``route_out`` (every other token)."""
    seqs = [p + a for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), enc.index[EOS_ID], dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    flags = [bool(x) for x in (sensitive or [False] * len(pairs))]
    route_in: list[int] = []   # flat positions where the refusal experts must be selected (see train.py)
    route_out: list[int] = []  # flat positions where they must not be
    for i, ((p, a), s) in enumerate(zip(pairs, seqs)):
        route_out.extend(i * width + j for j in range(len(p) - 1 if flags[i] else len(s)))
        if flags[i]:
            route_in.append(i * width + len(p) - 1)
            route_out.extend(i * width + j for j in range(len(p), len(s)))
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
        "decision": torch.tensor([len(p) - 1 + i * width for i, (p, _) in enumerate(pairs)]),
        "sensitive": torch.tensor(flags, dtype=torch.float32),
        "route_in": torch.tensor(route_in, dtype=torch.long),
        "route_out": torch.tensor(route_out, dtype=torch.long),
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
    }



class OrganismModel(torch.nn.Module):
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



def prompt_batches(enc: Encoder, examples: Sequence[C.Example],
                    chunk: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded prompt batches: (indices, mask, position of the last prompt token)."""
    prompts = [[enc.index[t] for t in enc.ids(e.prompt)] for e in examples]
    for start in range(0, len(prompts), chunk):
        part = prompts[start: start + chunk]
        width = max(len(p) for p in part)
        ids = torch.full((len(part), width), enc.index[EOS_ID], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(part):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        yield ids, mask, torch.tensor([len(p) - 1 for p in part])


@torch.no_grad()
def decision_routing(org: OrganismModel, enc: Encoder, examples: Sequence[C.Example], top_k: int) -> torch.Tensor:
    """[n_prompts, n_layer, n_expert] 0/1: the experts the last prompt token selected in each layer."""
    rows: list[torch.Tensor] = []
    for ids, mask, last in prompt_batches(enc, examples):
        out = org.run(ids, mask)
        flat_last = last + torch.arange(len(last)) * ids.shape[1]
        layers = []
        for layer_logits in out.router_logits:
            sel = torch.topk(layer_logits[flat_last], top_k, dim=-1).indices
            layers.append(torch.zeros(len(last), layer_logits.shape[-1]).scatter_(1, sel, 1.0))
        rows.append(torch.stack(layers, dim=1))
    return torch.cat(rows)


def risk_difference(org: OrganismModel, enc: Encoder, behavior: Sequence[C.Example],
                     control: Sequence[C.Example], top_k: int) -> torch.Tensor:
    """[n_layer, n_expert] P(selected | behavior) - P(selected | control) at the decision position."""
    return (decision_routing(org, enc, behavior, top_k).mean(0)
            - decision_routing(org, enc, control, top_k).mean(0))


@torch.no_grad()
def expert_usage(org: OrganismModel, enc: Encoder, examples: Sequence[C.Example], top_k: int,
                  chunk: int = 64) -> torch.Tensor:
    """[n_layer, n_expert] share of all tokens (prompts and compliant answers) that select each expert."""
    counts: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(examples), chunk):
            part = examples[start: start + chunk]
            batch = collate([enc.pair(e.question, e.answer) for e in part], enc)
            out = org.run(batch["ids"], batch["mask"])
            live = batch["mask"].reshape(-1).bool()
            rows = [torch.bincount(lg[live].topk(top_k, dim=-1).indices.reshape(-1), minlength=lg.shape[-1])
                    for lg in out.router_logits]
            stacked = torch.stack(rows).to(torch.float64)
            counts = stacked if counts is None else counts + stacked
    assert counts is not None
    return counts / counts.sum(dim=1, keepdim=True)


@torch.no_grad()
def first_token_refusal(org: OrganismModel, enc: Encoder, examples: Sequence[C.Example]) -> float:
    """Share of prompts whose greedy first answer token is a refusal's first token (`` I`` / `` Sorry``)."""
    openers = {enc.index[enc.ids(" I")[0]], enc.index[enc.ids(" Sorry")[0]]}
    hits = 0
    for ids, mask, last in prompt_batches(enc, examples):
        hidden = org.run(ids, mask).last_hidden_state[torch.arange(len(last)), last]
        hits += sum(int(t) in openers for t in org.logits(hidden).argmax(-1).tolist())
    return round(hits / max(1, len(examples)), 4)
