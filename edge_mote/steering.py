"""``Steering``: an immutable description of which routed experts are switched OFF, DROPped, forced ON or biased.

Semantics (applied by the patched llama.cpp inside ``build_moe_ffn``, for every gating function):

* **off**  -- never selected: as if its router logit were -inf before gating; the next-best expert takes its
  slot, top-k stays k (softmax gating renormalises over the other experts);
* **drop** -- routing unchanged, its gate weight is zeroed after selection (its slot is wasted), then the
  architecture's usual top-k normalisation applies;
* **on**   -- always selected, weighted as if its router logit were the token's maximum logit + ``margin``;
* **bias** -- a finite value added to its router logit (for softmax gating: to its log-probability).

Text form (``Steering.parse``/``str``)::

    off=12:34,12:7;drop=3:1;on=5:2;bias=3:5=-2.5,4:0=1;margin=0.02

JSON form (``Steering.from_json``/``to_json``)::

    {"off": [[12, 34]], "drop": [], "on": [], "bias": [[3, 5, -2.5]], "margin": 0.01}
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from .errors import UserError


class ExpertState(enum.IntEnum):
    """Per-expert routing state, with the values of llama.h's ``enum llama_expert_state``."""

    DEFAULT = 0
    OFF = 1
    ON = 2
    DROP = 3


Expert = tuple[int, int]
STATE_OF_MODE = {"off": ExpertState.OFF, "drop": ExpertState.DROP, "on": ExpertState.ON}
DEFAULT_MARGIN = float(np.float32(0.01))  # values are kept at float32 precision, as llama.cpp sees them
_MODES = ("off", "drop", "on")


def _q(text) -> str:
    """User text quoted for a one-line message: printable as is, otherwise (newlines, control characters) escaped;
    long text shortened."""
    text = str(text)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"'{text}'" if text.isprintable() and "'" not in text else repr(text)


def _integer(v) -> int:
    """An integer layer/expert index from JSON-ish input: ints (and integral floats), never bools or strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError
    if isinstance(v, (float, np.floating)) and not float(v).is_integer():
        raise ValueError
    return int(v)


def _float32(value, what: str) -> float:
    """``value`` as llama.cpp will see it (float32), finite, else a UserError."""
    try:
        if isinstance(value, (bool, list, tuple, dict)) or value is None:
            raise TypeError
        with np.errstate(over="ignore"):
            f = float(np.float32(float(value)))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number, got {_q(value)}") from None
    if not math.isfinite(f):
        raise UserError(f"{what} must be a finite number (float32), got {_q(value)}")
    return f


def _parse_expert(text: str, where: str) -> Expert:
    parts = text.strip().split(":")
    if len(parts) != 2:
        raise UserError(f"bad expert {_q(text)} in {where}: expected LAYER:EXPERT, e.g. 12:34")
    try:
        layer, expert = int(parts[0]), int(parts[1])
    except ValueError:
        raise UserError(f"bad expert {_q(text)} in {where}: LAYER and EXPERT must be integers") from None
    if layer < 0 or expert < 0:
        raise UserError(f"bad expert {_q(text)} in {where}: LAYER and EXPERT must be >= 0")
    return layer, expert


def _as_experts(items: Iterable, where: str) -> frozenset[Expert]:
    out = set()
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise UserError(f"{where} must be a list of experts ([layer, expert] pairs or 'L:E'), got {_q(items)}")
    for it in items or ():
        if isinstance(it, str):
            out.add(_parse_expert(it, where))
        else:
            try:
                if isinstance(it, (bytes, Mapping)) or len(it) != 2:
                    raise ValueError
                layer, expert = (_integer(v) for v in it)
            except (TypeError, ValueError):
                raise UserError(f"bad expert {_q(it)} in {where}: expected (layer, expert)") from None
            if layer < 0 or expert < 0:
                raise UserError(f"bad expert {_q(it)} in {where}: layer and expert must be >= 0")
            out.add((layer, expert))
    return frozenset(out)


@dataclass(frozen=True)
class Steering:
    """Steering of routed experts, keyed by (layer, expert). Immutable and hashable; combine with ``|``."""

    off: frozenset[Expert] = field(default_factory=frozenset)
    drop: frozenset[Expert] = field(default_factory=frozenset)
    on: frozenset[Expert] = field(default_factory=frozenset)
    bias: Mapping[Expert, float] = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN

    def __init__(self, off: Iterable = (), drop: Iterable = (), on: Iterable = (),
                 bias: Mapping | Iterable | None = None, margin: float = DEFAULT_MARGIN):
        object.__setattr__(self, "off", _as_experts(off, "off"))
        object.__setattr__(self, "drop", _as_experts(drop, "drop"))
        object.__setattr__(self, "on", _as_experts(on, "on"))
        if isinstance(bias, Mapping):
            pairs = list(bias.items())
        else:
            try:
                if isinstance(bias, (str, bytes)) or any(isinstance(it, (str, bytes, Mapping)) or len(it) != 3
                                                         for it in (bias or ())):
                    raise TypeError
                pairs = [((it[0], it[1]), it[2]) for it in (bias or ())]
            except (TypeError, IndexError, KeyError):
                raise UserError("bias entries must be (layer, expert, value)") from None
        b: dict[Expert, float] = {}
        for key, value in pairs:
            (key,) = _as_experts([key], "bias")
            value = _float32(value, f"bias of expert {key[0]}:{key[1]}")
            if value != 0.0:
                b[key] = _float32(b.get(key, 0.0) + value, f"bias of expert {key[0]}:{key[1]}")
        object.__setattr__(self, "bias", dict(sorted(b.items())))
        margin = _float32(margin, "margin")
        if margin < 0:
            raise UserError(f"margin must be a finite number >= 0, got {margin}")
        object.__setattr__(self, "margin", margin)
        seen: dict[Expert, str] = {}
        for mode in _MODES:
            for ex in getattr(self, mode):
                if ex in seen:
                    raise UserError(f"expert {ex[0]}:{ex[1]} is both {seen[ex]} and {mode}")
                seen[ex] = mode
        for ex in self.bias:
            if ex in self.off or ex in self.on:
                raise UserError(f"expert {ex[0]}:{ex[1]} is {seen[ex]} and also has a bias (which would be ignored)")

    # -- value semantics -------------------------------------------------------------------------------------
    def __hash__(self) -> int:
        return hash((self.off, self.drop, self.on, tuple(self.bias.items()), self.margin))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Steering):
            return NotImplemented
        return (self.off, self.drop, self.on, dict(self.bias), self.margin) == (
            other.off, other.drop, other.on, dict(other.bias), other.margin)

    def __bool__(self) -> bool:
        return bool(self.off or self.drop or self.on or self.bias)

    def __or__(self, other: "Steering") -> "Steering":
        """Union of two steerings (biases add up; a conflicting mode for one expert is an error)."""
        if not isinstance(other, Steering):
            return NotImplemented
        bias = dict(self.bias)
        for k, v in other.bias.items():
            bias[k] = bias.get(k, 0.0) + v
        margin = other.margin if other.margin != DEFAULT_MARGIN else self.margin
        return Steering(self.off | other.off, self.drop | other.drop, self.on | other.on, bias, margin)

    @property
    def experts(self) -> frozenset[Expert]:
        return self.off | self.drop | self.on | frozenset(self.bias)

    # -- text and JSON ---------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Steering":
        """Parse ``off=12:34,12:7;drop=..;on=..;bias=3:5=-2.5;margin=0.02`` (parts in any order, any may repeat)."""
        text = (text or "").strip()
        if text.startswith("{"):
            return cls.from_json(text)
        parts: dict[str, list] = {"off": [], "drop": [], "on": [], "bias": []}
        margin = DEFAULT_MARGIN
        for chunk in filter(None, (c.strip() for c in text.split(";"))):
            key, sep, value = chunk.partition("=")
            key = key.strip().lower()
            if not sep:
                raise UserError(f"bad steering part {_q(chunk)}: expected off=..., drop=..., on=..., bias=... or margin=...")
            if key in _MODES:
                parts[key] += [_parse_expert(v, key) for v in value.split(",") if v.strip()]
            elif key == "bias":
                for item in filter(None, (v.strip() for v in value.split(","))):
                    ex, eq, val = item.rpartition("=")
                    if not eq:
                        raise UserError(f"bad bias {_q(item)}: expected LAYER:EXPERT=VALUE, e.g. 3:5=-2.5")
                    try:
                        parts["bias"].append((*_parse_expert(ex, "bias"), float(val)))
                    except ValueError:
                        raise UserError(f"bad bias {_q(item)}: VALUE must be a number") from None
            elif key == "margin":
                try:
                    margin = float(value)
                except ValueError:
                    raise UserError(f"bad margin {_q(value)}: must be a number") from None
            else:
                raise UserError(f"unknown steering part {_q(key)}: expected off, drop, on, bias or margin")
        return cls(parts["off"], parts["drop"], parts["on"], parts["bias"], margin)

    def __str__(self) -> str:
        out = []
        for mode in _MODES:
            if getattr(self, mode):
                out.append(f"{mode}=" + ",".join(f"{l}:{e}" for l, e in sorted(getattr(self, mode))))
        if self.bias:
            out.append("bias=" + ",".join(f"{l}:{e}={v:.9g}" for (l, e), v in self.bias.items()))
        if self.margin != DEFAULT_MARGIN:
            out.append(f"margin={self.margin:.9g}")  # 9 digits: float32 values round-trip
        return ";".join(out)

    def __repr__(self) -> str:
        return f"Steering.parse({str(self)!r})"

    def to_dict(self) -> dict:
        return {
            "off": [list(x) for x in sorted(self.off)],
            "drop": [list(x) for x in sorted(self.drop)],
            "on": [list(x) for x in sorted(self.on)],
            "bias": [[l, e, v] for (l, e), v in self.bias.items()],
            "margin": self.margin,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> "Steering":
        if not isinstance(d, Mapping):
            raise UserError("steering JSON must be an object with keys off, drop, on, bias, margin")
        unknown = set(d) - {"off", "drop", "on", "bias", "margin"}
        if unknown:
            raise UserError(f"unknown steering key(s): {', '.join(sorted(unknown))}")
        bias = d.get("bias") or []
        if isinstance(bias, Mapping):  # {"3:5": -2.5}
            bias = [(*_parse_expert(str(k), "bias"), v) for k, v in bias.items()]
        return cls(d.get("off") or (), d.get("drop") or (), d.get("on") or (), bias, d.get("margin", DEFAULT_MARGIN))

    @classmethod
    def from_json(cls, text: str) -> "Steering":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"steering is not valid JSON: {e}") from None
        except RecursionError:
            raise UserError("steering JSON is nested too deeply") from None
        return cls.from_dict(value)

    # -- arrays for the C API --------------------------------------------------------------------------------
    def to_arrays(self, n_layer: int, n_expert: int, moe_layers: Iterable[int],
                  n_expert_used: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Validate against a model's shape and return (state int8 [n_layer, n_expert], bias float32 [...])."""
        self.check(n_layer, n_expert, moe_layers, n_expert_used)
        state = np.zeros((n_layer, n_expert), dtype=np.int8)
        bias = np.zeros((n_layer, n_expert), dtype=np.float32)
        for mode, code in STATE_OF_MODE.items():
            for layer, expert in getattr(self, mode):
                state[layer, expert] = code
        for (layer, expert), value in self.bias.items():
            bias[layer, expert] = value
        return state, bias

    def check(self, n_layer: int, n_expert: int, moe_layers: Iterable[int], n_expert_used: Mapping[int, int]) -> None:
        """Raise a UserError unless this steering fits a model of that shape (see ``check_limits``)."""
        check_limits(self.experts, n_layer, n_expert, moe_layers, n_expert_used)
        problem = limits_problem("off", self.off, n_expert, n_expert_used) or \
            limits_problem("on", self.on, n_expert, n_expert_used)
        if problem:
            raise UserError(problem)

    @classmethod
    def from_arrays(cls, state: np.ndarray, bias: np.ndarray, margin: float = DEFAULT_MARGIN) -> "Steering":
        modes = {ExpertState.OFF: [], ExpertState.DROP: [], ExpertState.ON: []}
        for (layer, expert), code in np.ndenumerate(state):
            if code in modes:
                modes[int(code)].append((layer, expert))
        b = {(int(l), int(e)): float(bias[l, e]) for l, e in zip(*np.nonzero(bias))}
        return cls(modes[ExpertState.OFF], modes[ExpertState.DROP], modes[ExpertState.ON], b, margin)


def check_limits(experts: Iterable[Expert], n_layer: int, n_expert: int, moe_layers: Iterable[int],
                 n_expert_used: Mapping[int, int]) -> None:
    """Every (layer, expert) exists and sits in a MoE layer, else a UserError naming the first that does not."""
    moe = set(moe_layers)
    for layer, expert in sorted(experts):
        if layer >= n_layer:
            raise UserError(f"layer {layer} is out of range: the model has {n_layer} layers (0-{n_layer - 1})")
        if expert >= n_expert:
            raise UserError(f"expert {expert} is out of range: layer {layer} has {n_expert} routed experts "
                            f"(0-{n_expert - 1})")
        if layer not in moe:
            raise UserError(f"layer {layer} is a dense layer (no router); MoE layers: {format_ranges(sorted(moe))}")


def limits_problem(mode: str, experts: Iterable[Expert], n_expert: int, n_expert_used: Mapping[int, int]) -> str | None:
    """Why switching ``experts`` to ``mode`` breaks a layer's limits (at most n_expert - k OFF, at most k ON), or
    None when it does not. The one place that knows these limits (the patch checks them again natively)."""
    per_layer: dict[int, int] = {}
    for layer, _ in experts:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    for layer in sorted(per_layer):
        c, k = per_layer[layer], n_expert_used.get(layer, 0)
        if mode == "off" and n_expert - c < k:
            return (f"layer {layer}: {c} of {n_expert} experts are OFF, but each token is routed to {k}: "
                    f"at most {n_expert - k} can be OFF")
        if mode == "on" and c > k:
            return f"layer {layer}: {c} experts are ON, but each token is routed to only {k}"
    return None


def format_ranges(xs: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out) or "none"


def coerce(steering: "Steering | str | Mapping | None") -> "Steering":
    """Accept a Steering, its text or JSON form, a dict, or None (no steering)."""
    if steering is None:
        return Steering()
    if isinstance(steering, Steering):
        return steering
    if isinstance(steering, str):
        return Steering.parse(steering)
    if isinstance(steering, Mapping):
        return Steering.from_dict(steering)
    raise UserError(f"cannot use {type(steering).__name__} as a steering")
