"""A GGUF's header read once, without gguf-py: metadata entries as raw bytes, tensor infos, a few decoded values.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every metadata array -- a vocabulary is hundreds
of thousands of them, seconds on a real model -- and importing ``gguf`` (with numpy) costs ~0.3 s. A command that
only needs the tensor list, a few keys and byte-equality of metadata (``edge-mote quantize``: check the input,
compare the output) reads this index instead: one pass over the header with ``struct``, string arrays walked by
their lengths only, nothing decoded until asked (``field.contents()``).

The duck-typed surface matches what the ship code uses of a ``GGUFReader``: ``index.fields[key].contents()``,
``index.tensors[i].name / .shape / .tensor_type.name / .n_bytes / .data_offset``. Bounds are checked as in
``gguf_meta.header.check_layout``, and every tensor must lie inside the file: a damaged or truncated file is a
one-line ``UserError``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError


class TensorType(NamedTuple):
    value: int
    name: str
    block: int       # elements per block
    size: int        # bytes per block


#: ggml types (gguf.constants GGML_QUANT_SIZES of the vendored llama.cpp): id -> (name, block elements, block bytes)
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
          7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
          11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
          15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
          19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
          23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
          28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
          35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
          42: ("Q2_0", 64, 18)}
TYPES = {k: TensorType(k, *v) for k, v in _TYPES.items()}

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value type -> bytes
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_KEY = 1 << 16
_MAX_DIMS = 8
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class IndexField:
    """One metadata entry: ``raw`` is its bytes as stored (key length, key, value type, value)."""

    name: str
    vtype: int
    item_type: int | None     # arrays: the element type
    raw: bytes
    value_at: int             # offset of the value inside ``raw``

    def contents(self):
        """The decoded value: a number, bool or str; a list for arrays."""
        return _decode(self.raw, self.value_at, self.vtype, self.item_type)


@dataclass(frozen=True)
class IndexTensor:
    name: str
    shape: tuple[int, ...]    # as stored (innermost first, like gguf-py's ReaderTensor.shape)
    tensor_type: TensorType
    n_elements: int
    n_bytes: int
    data_offset: int          # absolute offset in the file


class GGUFIndex:
    """Metadata entries (in file order) and tensor infos of a GGUF (module doc)."""

    def __init__(self, path: Path, version: int, fields: dict[str, IndexField], tensors: list[IndexTensor],
                 alignment: int, data_start: int):
        self.path, self.version, self.fields, self.tensors = path, version, fields, tensors
        self.alignment, self.data_start = alignment, data_start

    def raw(self, key: str) -> bytes | None:
        f = self.fields.get(key)
        return None if f is None else f.raw

    def value(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()


def _decode(buf: bytes, pos: int, vtype: int, item_type: int | None):
    if vtype == _STRING:
        (n,) = _U64.unpack_from(buf, pos)
        return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8", "replace")
    if vtype in _FMT:
        return struct.unpack_from("<" + _FMT[vtype], buf, pos)[0]
    if vtype == _ARRAY:
        (n,) = _U64.unpack_from(buf, pos + 4)
        pos += 12
        if item_type in _FMT:
            return list(struct.unpack_from(f"<{n}{_FMT[item_type]}", buf, pos))
        out = []
        for _ in range(n):
            (m,) = _U64.unpack_from(buf, pos)
            out.append(bytes(buf[pos + 8: pos + 8 + m]).decode("utf-8", "replace"))
            pos += 8 + m
        return out
    raise ValueError(f"GGUF value type {vtype}")


def read_index(path: str | os.PathLike) -> GGUFIndex:
    """The header of the GGUF ``path`` (module doc); a missing, damaged or truncated file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid GGUF file ({why})", hint="the file may be truncated or damaged")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise bad("it ends inside its metadata")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(path, mm, size, bad)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _parse(path: Path, mm, size: int, bad) -> GGUFIndex:
    pos = 0

    def need(n: int) -> None:
        if n < 0 or pos + n > size:
            raise bad("it ends inside its metadata")

    def read(fmt: struct.Struct) -> int:
        nonlocal pos
        need(fmt.size)
        (v,) = fmt.unpack_from(mm, pos)
        pos += fmt.size
        return v

    u32, u64 = (lambda: read(_U32)), (lambda: read(_U64))

    if mm[:4] != b"GGUF":
        raise bad("it does not start with the GGUF magic")
    pos = 4
    version = u32()
    if version not in (2, 3):
        raise bad(f"GGUF version {version} is not supported")
    n_tensors, n_kv = u64(), u64()
    if n_kv > size or n_tensors > size:
        raise bad(f"it claims {n_kv} metadata keys and {n_tensors} tensors in {size} bytes")

    fields: dict[str, IndexField] = {}
    for i in range(n_kv):
        start = pos
        klen = u64()
        if klen > _MAX_KEY:
            raise bad(f"metadata key {i}: a key of {klen} bytes")
        need(klen)
        key = mm[pos: pos + klen].decode("utf-8", "replace")
        pos += klen
        shown = key if key.isprintable() and len(key) <= 80 else repr(key[:80])
        vtype = u32()
        value_at = pos - start
        item_type = None
        if vtype == _ARRAY:
            item_type, n = u32(), u64()
            if item_type in _FIXED:
                if n * _FIXED[item_type] > size - pos:
                    raise bad(f"{shown}: an array of {n} items in {size - pos} bytes")
                pos += _FIXED[item_type] * n
            elif item_type == _STRING:
                if n * 8 > size - pos:
                    raise bad(f"{shown}: an array of {n} strings in {size - pos} bytes")
                unpack, p = _U64.unpack_from, pos
                try:
                    for _ in range(n):
                        p += 8 + unpack(mm, p)[0]
                except struct.error:
                    raise bad(f"{shown}: it ends inside its metadata") from None
                if p > size:
                    raise bad(f"{shown}: a string past the end of the file")
                pos = p
            else:
                raise bad(f"{shown}: an array of type {item_type}")
        elif vtype == _STRING:
            n = u64()
            need(n)
            pos += n
        elif vtype in _FIXED:
            need(_FIXED[vtype])
            pos += _FIXED[vtype]
        else:
            raise bad(f"{shown}: unknown value type {vtype}")
        fields[key] = IndexField(key, vtype, item_type, mm[start:pos], value_at)

    infos = []
    for i in range(n_tensors):
        nlen = u64()
        if nlen > _MAX_KEY:
            raise bad(f"tensor {i}: a name of {nlen} bytes")
        need(nlen)
        name = mm[pos: pos + nlen].decode("utf-8", "replace")
        pos += nlen
        n_dims = u32()
        if n_dims > _MAX_DIMS:
            raise bad(f"tensor {name}: {n_dims} dimensions")
        shape = tuple(u64() for _ in range(n_dims))
        ttype, offset = u32(), u64()
        if ttype not in TYPES:
            raise bad(f"tensor {name}: unknown type {ttype}")
        infos.append((name, shape, TYPES[ttype], offset))

    align_f = fields.get("general.alignment")
    alignment = int(align_f.contents()) if align_f is not None and align_f.vtype in _FMT else 32
    if alignment <= 0 or alignment & (alignment - 1):
        raise bad(f"alignment {alignment}")
    data_start = -(-pos // alignment) * alignment
    tensors = []
    for name, shape, tt, offset in infos:
        n_el = 1
        for d in shape:
            n_el *= d
        if n_el % tt.block:
            raise bad(f"tensor {name}: {n_el} elements are not whole {tt.name} blocks")
        t = IndexTensor(name, shape, tt, n_el, n_el // tt.block * tt.size, data_start + offset)
        end = t.data_offset + t.n_bytes
        if end > size:
            raise UserError(f"{path} is truncated: tensor {name} ends at byte {end} of a {size}-byte file",
                            hint="the file is incomplete (interrupted download or copy?)")
        tensors.append(t)
    return GGUFIndex(path, version, fields, tensors, alignment, data_start)
