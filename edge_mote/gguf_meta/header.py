"""A fast look at a GGUF's scalar metadata, before llama.cpp (or gguf-py, which parses the whole vocabulary) sees it.

``read_scalars(path, keys)`` streams the key-value section and stops as soon as every wanted key was seen (llama.cpp's
own keys come first, the tokenizer arrays later), skipping arrays without decoding them. It never raises on a
damaged file: what it could not read is simply absent (llama.cpp and gguf-py report damaged files).

``check_context(path, n_ctx)`` uses it so that a context larger than the model was trained for is a one-line error
before llama.cpp allocates its KV cache, and ``default_context(path)`` picks edge-mote's default context size.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

from ..errors import UserError
from . import keys as K

DEFAULT_CTX = 2048  # edge-mote's default context size (capped at the model's training context)

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_KEY = 1 << 16
_MAX_STR = 1 << 26


class _Stop(Exception):
    pass


def read_scalars(path: str | os.PathLike, keys: Iterable[str], arch_keys: Iterable[str] = ()) -> dict[str, object]:
    """The scalar values (numbers, bools, strings) of ``keys`` -- and of ``<arch>.<suffix>`` for each suffix in
    ``arch_keys``, once ``general.architecture`` is known -- found in the GGUF ``path``'s metadata."""
    wanted, suffixes = set(keys), tuple(arch_keys)
    if suffixes:
        wanted.add(K.ARCHITECTURE)
    out: dict[str, object] = {}
    try:
        with open(path, "rb", buffering=1 << 16) as fh:
            def read(n: int) -> bytes:
                b = fh.read(n)
                if len(b) != n:
                    raise _Stop
                return b

            def u(fmt: str):
                return struct.unpack("<" + fmt, read(struct.calcsize(fmt)))[0]

            def string() -> bytes:
                n = u("Q")
                if n > _MAX_STR:
                    raise _Stop
                return read(n)

            if read(4) != b"GGUF":
                return out
            version = u("I")
            if version not in (2, 3):  # v1 is obsolete; a byte-swapped version means a big-endian file
                return out
            u("Q")
            n_kv = u("Q")
            for _ in range(n_kv):
                klen = u("Q")
                if klen > _MAX_KEY:
                    raise _Stop
                key = read(klen).decode("utf-8", "replace")
                vtype = u("I")
                if vtype == _ARRAY:
                    itype, n = u("I"), u("Q")
                    if itype in _FIXED:
                        fh.seek(_FIXED[itype] * n, os.SEEK_CUR)
                    elif itype == _STRING:
                        for _ in range(n):
                            fh.seek(u("Q"), os.SEEK_CUR)
                    else:
                        raise _Stop  # nested arrays: not in llama.cpp's files; stop here
                    continue
                if vtype == _STRING:
                    value: object = string().decode("utf-8", "replace")
                elif vtype in _FMT:
                    value = u(_FMT[vtype])
                else:
                    raise _Stop
                if key in wanted:
                    out[key] = value
                    if key == K.ARCHITECTURE and isinstance(value, str):
                        wanted |= {K.arch_key(value, s) for s in suffixes}
                    if wanted <= out.keys():
                        break
    except (_Stop, OSError, struct.error, OverflowError, ValueError):
        pass
    return out


def training_context(path: str | os.PathLike) -> int | None:
    """``<arch>.context_length``: the context the model was trained with (None if the file does not say)."""
    meta = read_scalars(path, (), (K.CONTEXT_LENGTH,))
    arch = meta.get(K.ARCHITECTURE)
    value = meta.get(K.arch_key(arch, K.CONTEXT_LENGTH)) if isinstance(arch, str) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_context(path: str | os.PathLike, n_ctx: int | None) -> int:
    """The context size to use: ``n_ctx`` if it fits the model's training context (else a one-line UserError);
    edge-mote's default (None, or the CLI's default 2048) is capped at the training context instead."""
    train = training_context(path)
    if n_ctx is None or n_ctx == DEFAULT_CTX:
        return min(DEFAULT_CTX, train) if train else DEFAULT_CTX
    if train is not None and n_ctx > train:
        raise UserError(f"context size {n_ctx} (--ctx) is larger than the context {Path(path).name} was trained "
                        f"with ({train} tokens)", hint=f"use --ctx {train} or less")
    return n_ctx


def check_layout(path: str | os.PathLike) -> None:
    """Walk the whole key-value section with bounds checks (counts and lengths against the file's size), so that a
    damaged file is a one-line ``UserError`` here instead of minutes of parsing -- or a huge allocation -- in
    gguf-py. Cheap: arrays of numbers are skipped with a seek, only string arrays are walked."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid GGUF file ({why})", hint="the file may be truncated or damaged")

    with open(path, "rb", buffering=1 << 16) as fh:
        def read(n: int) -> bytes:
            b = fh.read(n)
            if len(b) != n:
                raise bad("it ends inside its metadata")
            return b

        def u(fmt: str):
            return struct.unpack("<" + fmt, read(struct.calcsize(fmt)))[0]

        def skip_string(what: str) -> None:
            n = u("Q")
            if n > size - fh.tell():
                raise bad(f"{what}: a string of {n} bytes in a file of {size}")
            fh.seek(n, os.SEEK_CUR)

        if read(4) != b"GGUF":
            raise bad("it does not start with the GGUF magic")
        version = u("I")
        if version not in (2, 3):
            raise bad(f"GGUF version {version} is not supported")
        n_tensors, n_kv = u("Q"), u("Q")
        if n_kv > size or n_tensors > size:
            raise bad(f"it claims {n_kv} metadata keys and {n_tensors} tensors in {size} bytes")
        for i in range(n_kv):
            klen = u("Q")
            if klen > min(_MAX_KEY, size - fh.tell()):
                raise bad(f"metadata key {i}: a key of {klen} bytes")
            key = read(klen).decode("utf-8", "replace")
            if not key.isprintable() or len(key) > 80:  # a damaged key: shown escaped, on one line
                key = repr(key[:80])
            vtype = u("I")
            if vtype == _ARRAY:
                itype, n = u("I"), u("Q")
                left = size - fh.tell()
                if itype in _FIXED:
                    if n * _FIXED[itype] > left:
                        raise bad(f"{key}: an array of {n} items in {left} bytes")
                    fh.seek(_FIXED[itype] * n, os.SEEK_CUR)
                elif itype == _STRING:
                    if n * 8 > left:
                        raise bad(f"{key}: an array of {n} strings in {left} bytes")
                    for _ in range(n):
                        skip_string(key)
                else:
                    raise bad(f"{key}: an array of type {itype}")
            elif vtype == _STRING:
                skip_string(key)
            elif vtype in _FIXED:
                read(_FIXED[vtype])
            else:
                raise bad(f"{key}: unknown value type {vtype}")
