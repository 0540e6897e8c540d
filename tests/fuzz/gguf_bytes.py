"""Raw GGUF v3 bytes, written by hand so that they can be wrong in every way (types, counts, lengths, strings).

gguf-py's writer only writes well-formed files; a fuzzer needs declared counts that lie, strings that are not UTF-8,
keys that repeat and files that stop half-way. Little-endian, no tensors unless given.
"""

from __future__ import annotations

import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B", U64: "Q", I64: "q", F64: "d"}
RANGES = {U8: (0, 2**8 - 1), I8: (-2**7, 2**7 - 1), U16: (0, 2**16 - 1), I16: (-2**15, 2**15 - 1),
          U32: (0, 2**32 - 1), I32: (-2**31, 2**31 - 1), U64: (0, 2**64 - 1), I64: (-2**63, 2**63 - 1), BOOL: (0, 1)}


def s(b: bytes | str, declared: int | None = None) -> bytes:
    """A GGUF string: uint64 length (``declared`` may lie) and the bytes."""
    b = b.encode("utf-8") if isinstance(b, str) else b
    return struct.pack("<Q", len(b) if declared is None else declared) + b


def scalar(vtype: int, value) -> bytes:
    if vtype == STR:
        return s(value)
    if vtype in (F32, F64):
        return struct.pack("<" + FMT[vtype], float(value))
    lo, hi = RANGES[vtype]
    return struct.pack("<" + FMT[vtype], min(max(int(value), lo), hi))


def array(itype: int, items, declared: int | None = None) -> bytes:
    """Payload of an ARRAY value: item type, count (``declared`` may lie), the items."""
    body = b"".join(scalar(itype, v) for v in items) if itype != ARR else b"".join(items)
    return struct.pack("<IQ", itype, len(items) if declared is None else declared) + body


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One key-value pair; ``payload`` is the already encoded value (``scalar`` / ``array`` output)."""
    return s(key) + struct.pack("<I", vtype) + payload


def kv_value(key: str, vtype: int, value, itype: int | None = None) -> bytes:
    return kv(key, vtype, array(itype, value) if vtype == ARR else scalar(vtype, value))


def gguf(kvs: list[bytes], n_kv: int | None = None, version: int = 3, tensors: bytes = b"", n_tensors: int = 0,
         alignment: int = 32, data: bytes = b"") -> bytes:
    """A whole file: header, key-values, tensor infos (raw), padding, tensor data (raw)."""
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + tensors
    if data:
        body += b"\0" * (-len(body) % alignment) + data
    return body


def typed_value(vtype: int, itype: int | None, value) -> bytes:
    """A value payload of any declared type from a Python value (what a type confusion looks like on disk)."""
    if vtype == ARR:
        items = value if isinstance(value, (list, tuple)) else [value]
        if itype == STR:
            items = [v if isinstance(v, (bytes, str)) else str(v) for v in items]
        elif itype in (F32, F64):
            items = [float(v) if isinstance(v, (int, float)) else 0.0 for v in items]
        else:
            items = [int(v) if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else 0 for v in items]
        return array(itype, items)
    if vtype == STR:
        return s(value if isinstance(value, (bytes, str)) else str(value))
    if vtype in (F32, F64):
        return scalar(vtype, value if isinstance(value, (int, float)) else 0.0)
    return scalar(vtype, value if isinstance(value, (int, float)) and value == value and abs(value) != float("inf") else 0)
