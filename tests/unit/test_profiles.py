"""Profiles in GGUF metadata: round trip with gguf-py, atomic writes, never over the input, bad files."""

import os

import numpy as np
import pytest

from edge_mote import Steering, UserError
from edge_mote.gguf_meta import keys as K
from edge_mote.gguf_meta.profiles import Profile, open_reader, read_profiles, write_profiles


def _write_tiny_gguf(path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="qwen3moe")
    w.add_block_count(2)
    w.add_uint32("qwen3moe.expert_count", 4)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    return _write_tiny_gguf(tmp_path / "tiny.gguf")


def test_round_trip_keeps_tensors_and_metadata(tiny, tmp_path):
    profiles = {
        "no-refusal": Profile("no-refusal", Steering.parse("off=1:2,1:3;bias=0:1=-0.5"), "top-2 OFF"),
        "refuse": Profile("refuse", Steering.parse("on=1:0;margin=0.2")),
    }
    out = write_profiles(tiny, tmp_path / "out.gguf", profiles, default="refuse")
    got, default = read_profiles(out)
    assert default == "refuse"
    assert list(got) == ["no-refusal", "refuse"]
    assert got["no-refusal"].steering == profiles["no-refusal"].steering
    assert got["no-refusal"].description == "top-2 OFF"
    assert got["refuse"].steering.margin == pytest.approx(0.2)
    r_in, r_out = open_reader(tiny), open_reader(out)
    assert [t.name for t in r_in.tensors] == [t.name for t in r_out.tensors]
    for a, b in zip(r_in.tensors, r_out.tensors):
        assert np.array_equal(a.data, b.data)
    assert r_out.fields["qwen3moe.expert_count"].contents() == 4
    assert r_out.fields[K.VERSION].contents() == K.SCHEMA_VERSION


def test_rewriting_replaces_old_profiles(tiny, tmp_path):
    a = write_profiles(tiny, tmp_path / "a.gguf", {"x": Profile("x", Steering.parse("off=1:1"))}, default="x")
    b = write_profiles(a, tmp_path / "b.gguf", {"y": Profile("y", Steering.parse("off=1:2"))})
    got, default = read_profiles(b)
    assert list(got) == ["y"] and default is None
    assert not any(k.startswith("edge_mote.profile.x") for k in open_reader(b).fields)


def test_never_writes_over_the_input(tiny):
    before = tiny.read_bytes()
    with pytest.raises(UserError, match="is the input file"):
        write_profiles(tiny, tiny, {})
    assert tiny.read_bytes() == before


def test_failed_write_leaves_no_partial_file(tiny, tmp_path):
    with pytest.raises(UserError, match="bad profile name"):
        write_profiles(tiny, tmp_path / "out.gguf", {"bad name!": Profile("bad name!", Steering())})
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_unknown_default_profile(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown profile 'nope'"):
        write_profiles(tiny, tmp_path / "out.gguf", {}, default="nope")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_gguf_is_a_one_line_user_error(tiny, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"not a gguf at all" * 10, "empty": b""}[damage])
    with pytest.raises(UserError, match="is not a valid GGUF file") as e:
        open_reader(bad)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        open_reader(tmp_path / "nope.gguf")
