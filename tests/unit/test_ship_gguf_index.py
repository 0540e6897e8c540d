"""``ship.gguf_index``: the header read without gguf-py agrees with gguf-py entry for entry (raw bytes, decoded
values, tensor infos), and damaged files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mote.errors import UserError
from edge_mote.ship.gguf_copy import field_bytes, open_gguf
from edge_mote.ship.gguf_index import read_index
from edge_mote.ship.quantize import check_metadata_kept, output_types

from .test_ship_prune import write_synthetic


def with_arrays(path):
    """The synthetic MoE plus a vocabulary-like string array, a float array, a bool and an alignment key."""
    import gguf

    src = write_synthetic(path.with_suffix(".src.gguf"))
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.data_alignment = 64
    w.add_uint32("general.alignment", 64)
    w.add_string("tokenizer.chat_template", "{{ messages }} \u00e9\u4e2d")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}\u0120" for i in range(300)] + [""])
    w.add_array("tokenizer.ggml.scores", [float(i) / 3 for i in range(301)])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_index_agrees_with_gguf_py(tmp_path):
    path = with_arrays(tmp_path / "m.gguf")
    ix, r = read_index(path), open_gguf(path)
    assert list(ix.fields) == [k for k in r.fields if not k.startswith("GGUF.")]
    for key, f in ix.fields.items():
        assert f.raw == field_bytes(r, key), key
        a, b = r.fields[key].contents(), f.contents()
        assert (np.allclose(a, b) if key == "tokenizer.ggml.scores" else a == b), key
    assert ix.alignment == 64
    assert [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.n_bytes), int(t.data_offset))
            for t in r.tensors] == [(t.name, t.shape, t.tensor_type.name, t.n_bytes, t.data_offset) for t in ix.tensors]
    assert output_types(path) == {"F16": 2, "F32": 7, "Q4_K": 2, "Q8_0": 5}
    check_metadata_kept(ix, path)


def test_metadata_change_is_refused(tmp_path):
    from edge_mote.errors import EdgeMoteError

    a = with_arrays(tmp_path / "a.gguf")
    b = write_synthetic(tmp_path / "b.gguf")
    with pytest.raises(EdgeMoteError, match="changed metadata key general.alignment"):
        check_metadata_kept(read_index(a), read_index(b))


@pytest.mark.parametrize("cut,msg", [(10, "it ends inside its metadata"), (200, "ends inside"),
                                     (-100, "is truncated: tensor")])
def test_damaged_files(tmp_path, cut, msg):
    path = with_arrays(tmp_path / "m.gguf")
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(UserError, match=msg):
        read_index(bad)
    bad.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(UserError, match="GGUF magic"):
        read_index(bad)
    with pytest.raises(UserError, match="not found"):
        read_index(tmp_path / "missing.gguf")
