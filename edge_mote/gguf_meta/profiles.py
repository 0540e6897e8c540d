"""Read and write named steering profiles in a GGUF file's metadata (schema in keys.py), with gguf-py.

Writing copies the whole file (tensors untouched) into a temporary file next to the output, then renames it
into place: the output is complete or absent, and it is never the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..fileio import atomic_output, check_output
from ..steering import DEFAULT_MARGIN, STATE_OF_MODE, Steering
from . import keys as K

_MODE_OF_STATE = {int(v): k for k, v in STATE_OF_MODE.items()}


@dataclass(frozen=True)
class Profile:
    """A named steering stored in a GGUF file."""

    name: str
    steering: Steering
    description: str = ""


def open_reader(path: str | os.PathLike):
    """A gguf-py reader for ``path``; a missing, corrupt or truncated file is a UserError naming it."""
    from gguf import GGUFReader

    from .header import check_layout

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    check_layout(path)  # lying counts and lengths: a one-line error, not minutes of parsing in gguf-py
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, struct/numpy errors, IndexError on damaged files
        raise UserError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})",
                        hint="the file may be truncated or not a GGUF model") from None


def check_gguf_header(path: str | os.PathLike) -> None:
    """Cheap checks before a model is handed to llama.cpp: the file exists and starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a valid GGUF file (it does not start with the GGUF magic)",
                        hint="the file may be truncated or not a GGUF model")


def read_profiles_cached(path: str | os.PathLike) -> tuple[dict[str, Profile], str | None]:
    """``read_profiles`` memoised on disk by (path, size, mtime): gguf-py parses every vocabulary entry on open,
    which takes seconds on real models, and profiles are read on every load."""
    import hashlib
    import json

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0v{K.SCHEMA_VERSION}".encode()).hexdigest()[:24]
    cache = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser() / "meta" / f"{key}.json"
    try:
        return _decode_cache(json.loads(cache.read_text()))
    except Exception:  # a missing or damaged cache entry (it is only a cache): read the file
        pass
    profiles, default = read_profiles(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"default": default, "profiles": {
            n: {"steering": p.steering.to_dict(), "description": p.description} for n, p in profiles.items()}}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return profiles, default


def _decode_cache(d) -> tuple[dict[str, Profile], str | None]:
    """A cache entry of ``read_profiles_cached``, checked as strictly as the file would be (ValueError if damaged)."""
    if not isinstance(d, dict) or not isinstance(d.get("profiles"), dict):
        raise ValueError("bad cache entry")
    profiles = {}
    for n, p in d["profiles"].items():
        if not K.PROFILE_NAME_RE.match(n) or not isinstance(p, dict) or not isinstance(p.get("description"), str):
            raise ValueError("bad cache entry")
        profiles[n] = Profile(n, Steering.from_dict(p["steering"]), p["description"])
    default = d.get("default")
    if default is not None and default not in profiles:
        raise ValueError("bad cache entry")
    return profiles, default


def _field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def check_profile_name(name: str) -> str:
    if not isinstance(name, str) or not K.PROFILE_NAME_RE.match(name):
        raise UserError(f"bad profile name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    return name


def _typed(reader, key: str, vtype, sub=None):
    """The value of ``key`` if it has the schema's type (``vtype``, arrays: items of ``sub``), None if absent; any
    other type, or a string that is not UTF-8, is a UserError naming the key."""
    from gguf import GGUFValueType as T

    field = reader.fields.get(key)
    if field is None:
        return None
    types = list(field.types)
    want = [vtype] + ([sub] if sub is not None else [])
    if types != want:
        got = "/".join(t.name for t in types) or "nothing"
        raise UserError(f"malformed edge-mote metadata: {key} is {got}, expected {'/'.join(t.name for t in want)}",
                        hint="the file's edge-mote profiles are damaged; rewrite them with edge-mote profile add/rm")
    if vtype == T.STRING or sub == T.STRING:
        parts = [field.parts[i] for i in field.data] if field.data else []
        try:
            texts = [bytes(p).decode("utf-8") for p in parts]
        except UnicodeDecodeError:
            raise UserError(f"malformed edge-mote metadata: {key} is not valid UTF-8") from None
        return texts if vtype == T.ARRAY else (texts[0] if texts else "")
    return field.contents()


def read_profiles(path_or_reader) -> tuple[dict[str, Profile], str | None]:
    """All profiles stored in a GGUF file, by name, and the name of the default one (or None).

    Strict about the schema (keys.py): a key of another type, arrays of different lengths, an unknown state,
    a bad name or a non-finite value is a one-line UserError naming the key (the patched llama.cpp ignores such a
    default profile with a warning; edge-mote refuses the file, so that nothing is silently ignored)."""
    import math

    from gguf import GGUFValueType as T

    reader = path_or_reader if hasattr(path_or_reader, "fields") else open_reader(path_or_reader)
    version = _typed(reader, K.VERSION, T.UINT32)
    if version is None:
        if any(name.startswith(K.PREFIX) for name in reader.fields):
            raise UserError(f"malformed edge-mote metadata: {K.VERSION} is missing")
        return {}, None
    if int(version) != K.SCHEMA_VERSION:
        raise UserError(f"edge-mote metadata schema v{version} is not supported (this edge-mote reads v{K.SCHEMA_VERSION})",
                        hint="upgrade edge-mote")
    names = _typed(reader, K.PROFILES, T.ARRAY, T.STRING) or []
    profiles = {}
    for name in names:
        if not K.PROFILE_NAME_RE.match(name):
            raise UserError(f"malformed edge-mote metadata: bad profile name {name[:80]!r}")
        if name in profiles:
            raise UserError(f"malformed edge-mote metadata: profile '{name}' is listed twice")
        cols = [_typed(reader, K.profile_key(name, f), T.ARRAY, t) for f, t in
                ((K.PROFILE_LAYER, T.INT32), (K.PROFILE_EXPERT, T.INT32), (K.PROFILE_STATE, T.INT32),
                 (K.PROFILE_BIAS, T.FLOAT32))]
        if any(c is None for c in cols):
            raise UserError(f"malformed edge-mote metadata: profile '{name}' lacks its layer/expert/state/bias arrays")
        layers, experts, states, biases = cols
        if not (len(layers) == len(experts) == len(states) == len(biases)):
            raise UserError(f"profile '{name}' in the GGUF is malformed: its arrays have different lengths")
        margin = _typed(reader, K.profile_key(name, K.PROFILE_MARGIN), T.FLOAT32)
        desc = _typed(reader, K.profile_key(name, K.PROFILE_DESCRIPTION), T.STRING) or ""
        modes: dict[str, list] = {"off": [], "on": [], "drop": []}
        bias = {}
        for layer, expert, state, b in zip(layers, experts, states, biases):
            if int(state) in _MODE_OF_STATE:
                modes[_MODE_OF_STATE[int(state)]].append((int(layer), int(expert)))
            elif int(state) == 0:
                if not math.isfinite(float(b)):
                    raise UserError(f"profile '{name}' in the GGUF has a non-finite bias for expert {layer}:{expert}")
                bias[(int(layer), int(expert))] = float(b)
            else:
                raise UserError(f"profile '{name}' in the GGUF has an invalid state {state}")
        try:
            steering = Steering(off=modes["off"], drop=modes["drop"], on=modes["on"], bias=bias,
                                margin=float(margin) if margin is not None else DEFAULT_MARGIN)
        except UserError as e:
            raise UserError(f"profile '{name}' in the GGUF is malformed: {e}") from None
        profiles[name] = Profile(name, steering, str(desc))
    default = _typed(reader, K.DEFAULT_PROFILE, T.STRING) or None
    if default is not None and default not in profiles:
        raise UserError(f"the GGUF's default profile {default[:80]!r} is not among its profiles")
    return profiles, default


def profile_metadata(profiles: Mapping[str, Profile], default: str | None) -> list[tuple[str, object, object, object]]:
    """(key, value, GGUFValueType, sub_type) for every edge-mote key describing ``profiles``."""
    from gguf import GGUFValueType as T

    if default is not None and default not in profiles:
        raise UserError(f"unknown profile '{default}'", hint="choose one of: " + ", ".join(profiles) if profiles else None)
    if not profiles:  # no edge-mote keys at all (GGUF has no empty arrays: gguf-py refuses to write one)
        return []
    out: list[tuple[str, object, object, object]] = [(K.VERSION, K.SCHEMA_VERSION, T.UINT32, None)]
    out.append((K.PROFILES, list(profiles), T.ARRAY, T.STRING))
    if default is not None:
        out.append((K.DEFAULT_PROFILE, default, T.STRING, None))
    for name, prof in profiles.items():
        check_profile_name(name)
        s = prof.steering
        rows = []
        for mode, state in STATE_OF_MODE.items():
            rows += [(l, e, state, 0.0) for l, e in sorted(getattr(s, mode))]
        rows += [(l, e, 0, v) for (l, e), v in s.bias.items()]
        rows.sort()
        cols = list(zip(*rows)) if rows else [[], [], [], []]
        out += [
            (K.profile_key(name, K.PROFILE_LAYER), [int(x) for x in cols[0]], T.ARRAY, T.INT32),
            (K.profile_key(name, K.PROFILE_EXPERT), [int(x) for x in cols[1]], T.ARRAY, T.INT32),
            (K.profile_key(name, K.PROFILE_STATE), [int(x) for x in cols[2]], T.ARRAY, T.INT32),
            (K.profile_key(name, K.PROFILE_BIAS), [float(x) for x in cols[3]], T.ARRAY, T.FLOAT32),
            (K.profile_key(name, K.PROFILE_MARGIN), float(s.margin), T.FLOAT32, None),
            (K.profile_key(name, K.PROFILE_DESCRIPTION), prof.description, T.STRING, None),
        ]
    return out


def write_profiles(src: str | os.PathLike, dst: str | os.PathLike, profiles: Mapping[str, Profile],
                   default: str | None = None, progress: bool = False) -> Path:
    """Copy ``src`` to ``dst`` replacing all edge-mote metadata by ``profiles`` (atomic; never over ``src``)."""
    from gguf import GGUFValueType, GGUFWriter, Keys

    src, dst = Path(src), Path(dst)
    check_output(dst, inputs=[src])
    reader = open_reader(src)
    arch = _field_value(reader, K.ARCHITECTURE)
    if arch is None:
        raise UserError(f"{src} has no general.architecture: not a llama.cpp model")
    new_meta = profile_metadata(profiles, default)

    with atomic_output(dst, inputs=[src]) as tmp:
        writer = GGUFWriter(tmp, arch=str(arch), endianess=reader.endianess)
        alignment = _field_value(reader, Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment)
        for field in reader.fields.values():
            name = field.name
            if name == Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name.startswith(K.PREFIX):
                continue
            if name == Keys.General.ALIGNMENT:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        for key, value, vtype, sub in new_meta:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
    return dst

