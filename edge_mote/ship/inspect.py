"""What a GGUF is made of, read from its header (no model load): ``edge-mote info MODEL --tensors``.

Bytes and parameters per quantization type, per tensor family (``attn_q``, ``ffn_down_exps``, ...), per layer; the
routed-expert tensors (type, bytes per expert), the router's precision and the stored steering profiles.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .gguf_copy import open_gguf
from .prune import EXPERT_TENSOR_RE, ROUTER_RE, moe_shape

_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def family_of(name: str) -> tuple[int | None, str]:
    """(layer or None, family): ``blk.3.ffn_down_exps.weight`` -> (3, ``ffn_down_exps``); biases keep ``.bias``."""
    m = _BLK_RE.match(name)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return layer, rest


@dataclass
class Bucket:
    tensors: int = 0
    bytes: int = 0
    params: int = 0
    types: dict[str, int] = field(default_factory=dict)   # type -> bytes

    def add(self, type_name: str, nbytes: int, n_params: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        self.params += n_params
        self.types[type_name] = self.types.get(type_name, 0) + nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_weight"] = round(self.bits_per_weight, 3)
        return d


@dataclass
class TensorReport:
    path: str
    arch: str
    file_bytes: int
    total: Bucket
    by_type: dict[str, Bucket]
    by_family: dict[str, Bucket]
    by_layer: dict[int, Bucket]
    experts: Bucket                 # every *_exps tensor
    expert_tensors: dict[str, dict]  # family -> {types, bytes_per_expert, shape}
    n_expert: int
    n_expert_used: int
    moe_layers: tuple[int, ...]
    router_types: dict[str, list[int]]   # ffn_gate_inp type -> layers
    profiles: dict[str, str]         # name -> steering text
    default_profile: str | None

    def to_dict(self) -> dict:
        return {
            "path": self.path, "arch": self.arch, "file_bytes": self.file_bytes, "total": self.total.to_dict(),
            "by_type": {k: v.to_dict() for k, v in self.by_type.items()},
            "by_family": {k: v.to_dict() for k, v in self.by_family.items()},
            "by_layer": {str(k): v.to_dict() for k, v in self.by_layer.items()},
            "experts": {**self.experts.to_dict(), "n_expert": self.n_expert, "n_expert_used": self.n_expert_used,
                        "moe_layers": list(self.moe_layers), "share_of_tensor_bytes":
                            round(self.experts.bytes / self.total.bytes, 4) if self.total.bytes else 0.0,
                        "tensors": self.expert_tensors},
            "router": self.router_types,
            "profiles": self.profiles, "default_profile": self.default_profile,
        }


def inspect_tensors(path: str | os.PathLike) -> TensorReport:
    """Read the tensor layout and profiles of a GGUF (a corrupt or truncated file is a one-line UserError)."""
    from ..gguf_meta.profiles import read_profiles

    path = Path(path)
    reader = open_gguf(path)
    shape = moe_shape(reader)
    total = Bucket()
    by_type: dict[str, Bucket] = defaultdict(Bucket)
    by_family: dict[str, Bucket] = defaultdict(Bucket)
    by_layer: dict[int, Bucket] = defaultdict(Bucket)
    experts = Bucket()
    expert_tensors: dict[str, dict] = {}
    router: dict[str, list[int]] = defaultdict(list)
    for t in reader.tensors:
        tname = t.tensor_type.name
        nb, npar = int(t.n_bytes), int(t.n_elements)
        layer, fam = family_of(t.name)
        total.add(tname, nb, npar)
        by_type[tname].add(tname, nb, npar)
        by_family[fam].add(tname, nb, npar)
        if layer is not None:
            by_layer[layer].add(tname, nb, npar)
        m = EXPERT_TENSOR_RE.match(t.name)
        if m and "_exps" in fam:
            experts.add(tname, nb, npar)
            e = expert_tensors.setdefault(fam, {"types": {}, "bytes_per_expert": None,
                                                "shape": [int(x) for x in t.shape]})
            e["types"][tname] = e["types"].get(tname, 0) + 1
            if shape.n_expert:
                e["bytes_per_expert"] = nb // shape.n_expert
        if ROUTER_RE.match(t.name):
            router[tname].append(layer)
    profiles, default = read_profiles(reader)
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1].bytes))  # noqa: E731
    return TensorReport(
        path=str(path), arch=shape.arch, file_bytes=path.stat().st_size, total=total, by_type=order(by_type),
        by_family=order(by_family), by_layer=dict(sorted(by_layer.items())), experts=experts,
        expert_tensors=expert_tensors, n_expert=shape.n_expert, n_expert_used=shape.n_expert_used,
        moe_layers=shape.moe_layers, router_types=dict(router),
        profiles={n: str(p.steering) for n, p in profiles.items()}, default_profile=default)
