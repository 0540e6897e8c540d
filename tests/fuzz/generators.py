"""Seeded generators of malformed inputs for edge-mote's parsers (deterministic for a seed; no hypothesis needed).

* ``steering_text(rng)``   -- text for ``Steering.parse`` (mutated valid strings and random grammar soup)
* ``steering_json(rng)``   -- Python values for ``Steering.from_dict`` (and their JSON text for ``from_json``)
* ``scan_text(rng, base)`` -- scan.json texts: a valid document mutated in its structure, values or bytes
* ``profile_kvs(rng)``     -- edge-mote GGUF metadata (schema v1) with wrong types, lengths, values, counts, strings
* ``cache_text(rng, good)``-- the profile cache JSON of ``read_profiles_cached``, damaged

Each returns malformed input most of the time, and sometimes a valid one (a parser must also accept those).
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct

from . import gguf_bytes as G

# -- steering text -------------------------------------------------------------------------------------------------

_ATOMS = ["off", "on", "drop", "bias", "margin", "OFF", "Bias", "=", "==", ":", "::", ",", ";", ";;", " ", "\t", "\n",
          "-", "+", ".", "e", "E", "1e309", "-1e309", "nan", "inf", "-inf", "NaN", "0x10", "1_000", "٣", "²", "½",
          "{", "}", "[", "]", '"', "'", "\\", "\x00", "\ufeff", "é", "🙂", "9" * 40, "-0", "0", "1", "2", "3", "7",
          "12", "99", "2147483648", "-1", "1.5", "3:5", "3:5=-2.5", "0:0", "1:3", "12:34", "=1", "L:E", "None"]
_VALID = ["off=12:34,12:7", "drop=3:1", "on=5:2", "bias=3:5=-2.5,4:0=1", "margin=0.02",
          "off=1:3;bias=3:5=-2.5;margin=0.02", "off=0:1;drop=0:2;on=1:1", ""]


def steering_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:  # a valid string, mutated a few times
        text = rng.choice(_VALID)
        if rng.random() < 0.5:
            text = ";".join(rng.sample(_VALID, rng.randint(1, 3)))
        for _ in range(rng.randint(1, 4)):
            i = rng.randint(0, len(text))
            op = rng.random()
            if op < 0.4:
                text = text[:i] + rng.choice(_ATOMS) + text[i:]
            elif op < 0.7 and text:
                j = min(len(text), i + rng.randint(1, 4))
                text = text[:i] + text[j:]
            else:
                text = text[:i] + chr(rng.choice([rng.randint(0, 127), rng.randint(128, 0x2FFF), 0xFFFD])) + text[i:]
        return text
    if r < 0.9:  # grammar soup
        return "".join(rng.choice(_ATOMS) for _ in range(rng.randint(1, 14)))
    if r < 0.95:  # very long
        return ";".join(f"off={rng.randint(0, 99)}:{rng.randint(0, 99)}" for _ in range(rng.randint(100, 2000)))
    return "{" + "".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 10)))  # starts like JSON


# -- steering JSON -------------------------------------------------------------------------------------------------

def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.45:
        return rng.choice([None, True, False, 0, 1, -1, 3, 2**31, -2**63, 10**30, 1.5, -0.0, 1e308, "", "1", "3:5",
                           "a:b", "-1:2", "12:34", "x", [], {}, rng.randint(-5, 50), rng.uniform(-10, 10)])
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["off", "drop", "on", "bias", "margin", "3:5", "x", "", "1"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _expert_like(rng: random.Random):
    return rng.choice([[rng.randint(-2, 20), rng.randint(-2, 20)], [1, 2, 3], [1], "3:5", "3:x", [True, False],
                       [1.0, 2.0], [1.5, 2], ["1", "2"], [None, 1], (2, 3), {"a": 1}, [[1, 2]], [2**40, 1]])


def steering_json(rng: random.Random):
    """A value for ``Steering.from_dict`` (mostly a dict shaped like a steering, often wrong inside)."""
    if rng.random() < 0.15:
        return random_json(rng)
    d = {}
    for key in ("off", "drop", "on"):
        if rng.random() < 0.6:
            d[key] = [_expert_like(rng) for _ in range(rng.randint(0, 4))] if rng.random() < 0.8 else random_json(rng)
    if rng.random() < 0.6:
        if rng.random() < 0.5:
            d["bias"] = [[rng.randint(-1, 9), rng.randint(-1, 9), rng.choice([1.0, -2.5, 0, "x", None, 1e39, [1]])]
                         + ([] if rng.random() < 0.8 else [5]) for _ in range(rng.randint(0, 3))]
        else:
            d["bias"] = {rng.choice(["3:5", "x", "1:2:3", "-1:0", "7:1"]): rng.choice([1.0, "2", None, [], -1e5])
                         for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.4:
        d["margin"] = rng.choice([0.01, -1, "0.1", None, [], 1e39, 0, True])
    if rng.random() < 0.1:
        d[rng.choice(["extra", "OFF", ""])] = 1
    return d


def json_text(rng: random.Random, value) -> str:
    text = json.dumps(value)
    r = rng.random()
    if r < 0.1:
        return text[: rng.randint(0, len(text))]
    if r < 0.15:
        return "[" * rng.randint(1000, 100_000)  # deep nesting
    if r < 0.2:
        return text.replace("1", "NaN", 1)
    return text


# -- scan.json -----------------------------------------------------------------------------------------------------

def valid_scan(n_layer: int = 4, n_expert: int = 4, k: int = 2) -> dict:
    """A small, valid ``edge-mote.scan/1`` document (what ``load_scan`` and ``scan_ranking`` accept)."""
    layers = list(range(n_layer))
    experts = []
    for l in layers:
        for e in range(n_expert):
            p1, p2 = ((l + e) % 5) / 5, (e % 3) / 5
            experts.append({"layer": l, "expert": e, "a1": 1, "n1": 5, "a2": 1, "n2": 5, "p1": p1, "p2": p2,
                            "rd": p1 - p2, "z": 1.0, "p_value": 0.3, "log_odds": 0.1, "ci_low": -1.0, "ci_high": 1.0,
                            "w1": 0.2, "w2": 0.1, "dw": 0.1})
    ranked = sorted(experts, key=lambda r: -r["rd"])
    return {"schema": "edge-mote.scan/1", "created": "2026-12-02T00:00:00Z",
            "generator": {"name": "edge-mote", "version": "0.1.0"},
            "model": {"path": "m.gguf", "file_bytes": 10, "sha256": "0" * 64, "sha256_scope": "full",
                      "arch": "qwen3moe", "name": None, "n_layer": n_layer, "moe_layers": layers, "n_expert": n_expert,
                      "n_expert_used": {str(l): k for l in layers}, "top_k": k, "steering": ""},
            "window": {"tokens": "decision", "max_new": None, "raw": False, "chat_template": True, "unit": "token"},
            "sets": {"behavior": {"path": "b.jsonl", "n_prompts": 5, "n_prompt_tokens": 50, "n_window_tokens": 5},
                     "control": {"path": "c.jsonl", "n_prompts": 5, "n_prompt_tokens": 50, "n_window_tokens": 5}},
            "experts": experts,
            "ranking": {"order": "rd desc, z desc, dw desc, layer asc, expert asc", "n_total": len(experts),
                        "entries": [{"rank": i + 1, "layer": r["layer"], "expert": r["expert"], "p1": r["p1"],
                                     "p2": r["p2"], "rd": r["rd"], "z": r["z"], "dw": r["dw"], "stability": 0.5}
                                    for i, r in enumerate(ranked)]},
            "stability": {"n_boot": 10, "seed": 0}, "prompts": [], "warnings": [], "timing": {"seconds": 1.0}}


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            yield from _paths(v, prefix + (i,))


_WEIRD = [None, True, False, -1, 0, 1, 3, 2**70, -2**70, 0.5, 1e308, -1e308, "", "x", "3", [], {}, [1, 2], {"a": 1},
          [[1]], [None], ["0"], {"0": "x"}, float("nan"), float("inf"), float("-inf"), 1.000001, 3.0]


def scan_text(rng: random.Random, base: dict | None = None) -> bytes:
    """A damaged scan.json (bytes)."""
    doc = copy.deepcopy(base or valid_scan())
    r = rng.random()
    if r < 0.75:  # structural / value mutations, then JSON (NaN/Infinity allowed: Python's json writes them)
        for _ in range(rng.randint(1, 4)):
            paths = [p for p in _paths(doc) if p]
            path = rng.choice(paths)
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            op = rng.random()
            if op < 0.3:
                del parent[last]
            elif op < 0.85:
                parent[last] = copy.deepcopy(rng.choice(_WEIRD))
            elif isinstance(parent, list):
                parent.append(copy.deepcopy(rng.choice(_WEIRD)))
            else:
                parent[rng.choice(["extra", "ranking", "x"])] = copy.deepcopy(rng.choice(_WEIRD))
        return json.dumps(doc).encode("utf-8")
    text = json.dumps(doc).encode("utf-8")
    if r < 0.85:
        cut = rng.randint(0, len(text))
        return text[:cut]
    if r < 0.9:
        i = rng.randint(0, len(text))
        return text[:i] + bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8))) + text[i:]
    if r < 0.93:
        return b"\xef\xbb\xbf" + text  # BOM
    if r < 0.96:
        return b"[" * rng.randint(1000, 200_000)
    return rng.choice([b"", b"null", b"[]", b"\"edge-mote.scan/1\"", b"{\"schema\": \"edge-mote.scan/1\"}", b"\xff\xfe"])


# -- edge-mote GGUF metadata -----------------------------------------------------------------------------------------

_NAMES = ["p", "no-refusal", "a_b-9", "x" * 64, "x" * 65, "", "bad name", "na\u00efve", "../x", "p.q", "\x00",
          b"\xff\xfe", "p" * 300]
_TYPES = [G.U8, G.I8, G.U16, G.I16, G.U32, G.I32, G.F32, G.BOOL, G.STR, G.U64, G.I64, G.F64]


def _num(rng: random.Random, lo: int, hi: int):
    return rng.choice([rng.randint(lo, hi), -1, 0, hi + 1, 2**31 - 1, -2**31, 2**40, 3])


def _field(rng: random.Random, want_type: int, want_itype: int | None, value) -> bytes:
    """The payload of one field: usually the right type, sometimes another, sometimes a lying array."""
    r = rng.random()
    if r < 0.7:
        vtype, itype = want_type, want_itype
    elif r < 0.85:
        vtype = rng.choice(_TYPES + [G.ARR])
        itype = rng.choice(_TYPES) if vtype == G.ARR else None
    else:
        vtype, itype = G.ARR, rng.choice(_TYPES)
    payload = G.typed_value(vtype, itype, value)
    if vtype == G.ARR and rng.random() < 0.08:  # a count that lies (data follow for fewer items)
        n = struct.unpack("<Q", payload[4:12])[0]
        fake = rng.choice([n + 1, n + 1000, 2**31, 2**62, 2**64 - 1])
        payload = payload[:4] + struct.pack("<Q", fake) + payload[12:]
    return struct.pack("<I", vtype) + payload


def profile_kvs(rng: random.Random, n_layer: int = 3, n_expert: int = 8) -> tuple[list[bytes], dict]:
    """edge-mote keys (raw GGUF key-values) describing 1-3 profiles, mostly damaged; and what was generated."""
    kvs: list[bytes] = []
    names = [rng.choice(_NAMES) if rng.random() < 0.3 else f"p{i}" for i in range(rng.randint(0, 3))]
    version = rng.choice([1] * 6 + [0, 2, 2**32 - 1, -1])
    kvs.append(G.s("edge_mote.version") + _field(rng, G.U32, None, version))
    if rng.random() < 0.9:
        kvs.append(G.s("edge_mote.profiles") + _field(rng, G.ARR, G.STR, names or ["p"]))
    default = rng.choice(names + [None, "missing", ""]) if names else rng.choice([None, "p", ""])
    if default is not None:
        kvs.append(G.s("edge_mote.default_profile") + _field(rng, G.STR, None, default))
    for name in names:
        key = name if isinstance(name, str) else name.decode("latin-1")
        n = rng.choice([0, 1, 2, 3, 5, 8, 40])
        layers = [_num(rng, 0, n_layer - 1) if rng.random() < 0.2 else rng.randint(0, n_layer - 1) for _ in range(n)]
        experts = [_num(rng, 0, n_expert - 1) if rng.random() < 0.2 else rng.randint(0, n_expert - 1) for _ in range(n)]
        states = [rng.choice([0, 1, 1, 2, 3, -1, 4, 127, 2**31 - 1]) if rng.random() < 0.3 else rng.choice([1, 3])
                  for _ in range(n)]
        biases = [rng.choice([0.0, -2.5, 1.0, math.nan, math.inf, -math.inf, 3.4e38, -0.0]) for _ in range(n)]
        cols = {"layer": (G.ARR, G.I32, layers), "expert": (G.ARR, G.I32, experts), "state": (G.ARR, G.I32, states),
                "bias": (G.ARR, G.F32, biases)}
        for fld, (vt, it, vals) in cols.items():
            if rng.random() < 0.1:
                continue  # missing
            if rng.random() < 0.1:
                vals = vals[: max(0, len(vals) - rng.randint(1, 3))] + ([1] if rng.random() < 0.5 else [])
            kvs.append(G.s(f"edge_mote.profile.{key}.{fld}") + _field(rng, vt, it, vals))
        if rng.random() < 0.7:
            kvs.append(G.s(f"edge_mote.profile.{key}.margin")
                       + _field(rng, G.F32, None, rng.choice([0.01, 0.0, -1.0, math.nan, math.inf, 1e30])))
        if rng.random() < 0.5:
            kvs.append(G.s(f"edge_mote.profile.{key}.description")
                       + _field(rng, G.STR, None, rng.choice(["", "top-2 off", b"\xff\xfe\xfd", "x" * 5000])))
    if rng.random() < 0.05 and kvs:
        kvs.append(rng.choice(kvs))  # a repeated key
    rng.shuffle(kvs)
    return kvs, {"names": names, "default": default, "version": version}


def damage_bytes(rng: random.Random, data: bytes, start: int) -> bytes:
    """Flip, cut or splice bytes after ``start`` (the edge-mote part of a file)."""
    r = rng.random()
    if r < 0.4 and len(data) > start:
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(start, len(b))
            b[i] = rng.randrange(256)
        return bytes(b)
    if r < 0.7:
        return data[: rng.randint(start, len(data))]
    return data


# -- the profile cache -----------------------------------------------------------------------------------------------

def cache_text(rng: random.Random, good: dict) -> str:
    """A damaged cache entry of ``read_profiles_cached`` (JSON text)."""
    doc = copy.deepcopy(good)
    r = rng.random()
    if r < 0.7:
        for _ in range(rng.randint(1, 3)):
            paths = [p for p in _paths(doc) if p]
            if not paths:
                break
            path = rng.choice(paths)
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if rng.random() < 0.3:
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(_WEIRD))
        return json.dumps(doc)
    return json_text(rng, doc) if r < 0.9 else rng.choice(["", "{", "null", "[]", "\x00\x01", "{\"default\": 1}"])
