"""Copy a GGUF with changes (metadata replaced, tensors sliced), with a byte progress bar. gguf-py does the format.

    reader = open_gguf(src)
    with atomic_output(dst, inputs=[src]) as tmp:
        copy_gguf(reader, tmp, replace={key: KV(...)}, drop=lambda key: ..., extra=[KV(...)],
                  transform=lambda tensor: new_array_or_None, progress=True)

Tensors are written in the input's order, keys in the input's order (replaced in place, dropped, extras last),
so a key neither replaced nor dropped is byte-identical in the output.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import EdgeMoteError, UserError


@dataclass(frozen=True)
class KV:
    """One metadata entry to write: key, value, gguf.GGUFValueType and, for arrays, the element type."""

    key: str
    value: Any
    vtype: Any
    sub_type: Any = None


def open_gguf(path: str | os.PathLike):
    """A gguf-py reader; a missing, truncated or corrupt file is a one-line UserError (see gguf_meta.profiles)."""
    from ..gguf_meta.profiles import open_reader

    reader = open_reader(path)
    check_complete(reader, Path(path))
    return reader


def check_complete(reader, path: Path) -> None:
    """gguf-py memory-maps lazily: a file cut inside its tensor data opens fine. Check every tensor lies inside."""
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise UserError(f"{path} is truncated: tensor {t.name} ends at byte {end} of a {size}-byte file",
                            hint="the file is incomplete (interrupted download or copy?)")


def field_value(reader, key: str):
    """The decoded value of a metadata key, or None when absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def kv_of_field(field) -> KV:
    from gguf import GGUFValueType

    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    return KV(field.name, field.contents(), vtype, sub)


def field_bytes(reader, key: str) -> bytes | None:
    """The raw bytes of one metadata entry (key, type and value) as stored: for byte-equality checks."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return b"".join(np.asarray(p).tobytes() for p in f.parts)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar in bytes on stderr, or None (disabled, or stderr not a terminal)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)


def copy_gguf(reader, dst: Path, *, replace: Mapping[str, KV] | None = None,
              drop: Callable[[str], bool] | None = None, extra: Iterable[KV] = (),
              transform: Callable[[Any], np.ndarray | None] | None = None,
              progress: bool = False, desc: str = "writing") -> int:
    """Write a copy of ``reader``'s file to ``dst`` (a temporary path of ``atomic_output``); return bytes of tensor
    data written. ``transform(tensor)`` returns the new data of a tensor (same type; raw bytes for quantized ones,
    outermost axis first as gguf-py reads them) or None to keep it."""
    from gguf import GGUFWriter, Keys

    replace = dict(replace or {})
    arch = field_value(reader, Keys.General.ARCHITECTURE)
    if arch is None:
        raise UserError("the file has no general.architecture: not a llama.cpp model")
    writer = GGUFWriter(dst, arch=str(arch), endianess=reader.endianess)
    alignment = field_value(reader, Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment)
    for field in reader.fields.values():
        name = field.name
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF."):
            continue
        if drop is not None and drop(name) and name not in replace:
            continue
        kv = replace.pop(name, None) or kv_of_field(field)
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for kv in list(replace.values()) + list(extra):
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)

    datas = []
    for t in reader.tensors:
        data = transform(t) if transform is not None else None
        if data is None:
            data = t.data
        else:
            data = np.ascontiguousarray(data)
            if data.dtype != t.data.dtype or data.shape[1:] != t.data.shape[1:]:
                raise EdgeMoteError(f"internal: tensor {t.name} changed type or inner shape")
        datas.append(data)
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    total = sum(int(d.nbytes) for d in datas)
    bar = progress_bar(total, desc, progress)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for d in datas:
            writer.write_tensor_data(d, tensor_endianess=reader.endianess)
            if bar is not None:
                bar.update(int(d.nbytes))
        writer.close()
    finally:
        if bar is not None:
            bar.close()
    return total
