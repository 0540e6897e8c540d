"""Model resolution: local paths never reach the Hub; hf:// uses huggingface-hub's cache and honours HF_HUB_OFFLINE.

No network: the Hub is a local cache folder in huggingface-hub's own layout (refs/, snapshots/, blobs/), or, for
the online code path, huggingface-hub's functions replaced by fakes that record their calls.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_mote.errors import UserError
from edge_mote.runtime import resolve as R

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(root: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main") -> Path:
    """A Hugging Face hub cache holding ``files`` of ``repo`` at ``commit`` (blobs + snapshot symlinks + ref)."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = d / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = d / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return d / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface-hub whose cache is tmp_path/hub."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def gguf_bytes(n: int) -> bytes:
    return b"GGUF" + bytes(n)


# -- local paths ---------------------------------------------------------------------------------------------------

def test_missing_local_path_is_not_found_never_a_hub_lookup(tmp_path, monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the Hub was asked about a local path")

    for fn in ("hf_hub_download", "list_repo_files", "get_paths_info"):
        monkeypatch.setattr(huggingface_hub, fn, boom)
    monkeypatch.chdir(tmp_path)
    for spec in ("models/qwen3-moe.gguf", "owner/repo", "owner/repo:file.gguf", str(tmp_path / "nope.gguf"),
                 "~/nope.gguf", "./x.gguf"):
        with pytest.raises(UserError, match="model file not found") as ei:
            R.resolve_model(spec)
        assert "\n" not in str(ei.value)
    with pytest.raises(UserError) as ei:
        R.resolve_model("owner/repo:file.gguf")
    assert "hf://owner/repo:file.gguf" in ei.value.hint


def test_local_file_folder_and_split(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(gguf_bytes(8))
    assert R.resolve_model(f) == f
    assert R.resolve_model(str(f)) == f
    with pytest.raises(UserError, match="is a folder"):
        R.resolve_model(tmp_path)
    parts = [tmp_path / f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    parts[0].write_bytes(gguf_bytes(4))
    parts[1].write_bytes(gguf_bytes(4))
    with pytest.raises(UserError, match="1 of its 3 parts are missing"):
        R.resolve_model(parts[0])
    parts[2].write_bytes(gguf_bytes(4))
    assert R.resolve_model(parts[0]) == parts[0]
    with pytest.raises(UserError, match="load its first part") as ei:
        R.resolve_model(parts[1])
    assert ei.value.hint.endswith(parts[0].name)


# -- hf:// references ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, repo, filename, revision", [
    ("hf://o/r", "o/r", None, None),
    ("hf://Org-1/Re.po_2:m-Q4_K_M.gguf", "Org-1/Re.po_2", "m-Q4_K_M.gguf", None),
    ("hf://o/r:sub/dir/m.gguf@v1.0", "o/r", "sub/dir/m.gguf", "v1.0"),
    ("hf://o/r@" + COMMIT, "o/r", None, COMMIT),
    ("hf://o/r@main/m.gguf", "o/r", "m.gguf", "main"),
    ("hf://o/r/q/m.gguf", "o/r", "q/m.gguf", None),
])
def test_parse_hf_uri(text, repo, filename, revision):
    spec = R.parse_hf_uri(text)
    assert (spec.repo, spec.filename, spec.revision) == (repo, filename, revision)
    assert R.parse_hf_uri(str(spec)) == spec


@pytest.mark.parametrize("text", ["hf://", "hf://onlyname", "hf://o/r:model.bin", "hf://o/r:../x.gguf",
                                  "hf://o/r@a:m.gguf@b", "hf://o r/x", "hf://o/r:"])
def test_bad_hf_uri(text):
    with pytest.raises(UserError, match="bad Hugging Face model reference"):
        R.resolve_model(text)


def test_split_and_grouping():
    assert R.split_parts("a/x-00002-of-00003.gguf") == [f"a/x-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert R.split_parts("x.gguf") is None
    with pytest.raises(UserError):
        R.split_parts("x-00004-of-00003.gguf")
    g = R.group_ggufs(["README.md", "m-Q8_0.gguf", "mmproj-f16.gguf", "big-00002-of-00002.gguf",
                       "big-00001-of-00002.gguf", "config.json"])
    assert g == {"big-00001-of-00002.gguf": ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf"],
                 "m-Q8_0.gguf": ["m-Q8_0.gguf"]}
    assert R.human_size(1_500_000_000) == "1.5 GB" and R.human_size(999) == "999 B" and R.human_size(None) == "size unknown"


def test_offline_cache_single_gguf(hub_cache):
    snap = make_hf_cache(hub_cache, "owner/tiny", {"model.gguf": gguf_bytes(64), "README.md": b"hi"})
    p = R.resolve_model("hf://owner/tiny")
    assert p == snap / "model.gguf" and p.read_bytes() == gguf_bytes(64)
    assert R.resolve_model("hf://owner/tiny:model.gguf@main") == p
    assert R.resolve_model(f"hf://owner/tiny:model.gguf@{COMMIT}") == p


def test_offline_several_ggufs_lists_them_with_sizes(hub_cache):
    make_hf_cache(hub_cache, "owner/multi", {"m-Q4_K_M.gguf": gguf_bytes(2996), "m-Q8_0.gguf": gguf_bytes(5996),
                                            "m-F16-00001-of-00002.gguf": gguf_bytes(1996),
                                            "m-F16-00002-of-00002.gguf": gguf_bytes(1996)})
    with pytest.raises(UserError) as ei:
        R.resolve_model("hf://owner/multi")
    msg = str(ei.value)
    assert "\n" not in msg and "has 3 GGUF models, choose one" in msg
    assert "m-Q4_K_M.gguf (3.0 KB)" in msg and "m-Q8_0.gguf (6.0 KB)" in msg
    assert "m-F16-00001-of-00002.gguf (4.0 KB, 2 parts)" in msg
    assert ei.value.hint.startswith("e.g. hf://owner/multi:")


def test_offline_split_model_loads_first_part(hub_cache):
    names = [f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    snap = make_hf_cache(hub_cache, "owner/split", {n: gguf_bytes(i) for i, n in enumerate(names)})
    for ref in ("hf://owner/split", f"hf://owner/split:{names[0]}", f"hf://owner/split:{names[2]}"):
        p = R.resolve_model(ref)
        assert p == snap / names[0] and all((p.parent / n).exists() for n in names)


def test_offline_missing_things_are_one_line_errors(hub_cache):
    make_hf_cache(hub_cache, "owner/tiny", {"model.gguf": gguf_bytes(8)})
    make_hf_cache(hub_cache, "owner/split", {"m-00001-of-00002.gguf": gguf_bytes(8)})
    make_hf_cache(hub_cache, "owner/nogguf", {"model.safetensors": b"x"})
    cases = [("hf://owner/tiny:other.gguf", "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
             ("hf://owner/absent", "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
             ("hf://owner/tiny@v2", "not in the local Hugging Face cache"),
             ("hf://owner/split", "m-00002-of-00002.gguf is not in the local Hugging Face cache"),
             ("hf://owner/nogguf", "has no GGUF file in the local cache")]
    for ref, msg in cases:
        with pytest.raises(UserError, match=msg) as ei:
            R.resolve_model(ref)
        assert "\n" not in str(ei.value)


def test_environment_variables_reach_huggingface_hub(tmp_path):
    """The real thing: HF_HUB_CACHE / HF_HUB_OFFLINE set in the environment of a fresh interpreter."""
    cache = tmp_path / "hub"
    snap = make_hf_cache(cache, "owner/tiny", {"model.gguf": gguf_bytes(8)})
    code = "from edge_mote.runtime.resolve import resolve_model; print(resolve_model('hf://owner/tiny'))"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snap / "model.gguf"


# -- online code path (huggingface-hub functions faked: no network here) ---------------------------------------

class FakeHub:
    def __init__(self, files: dict[str, int], cache: Path):
        self.files, self.cache, self.downloads, self.listed = files, cache, [], 0

    def list_repo_files(self, repo, revision=None, **k):
        self.listed += 1
        return sorted(self.files)

    def get_paths_info(self, repo, paths, revision=None, **k):
        from types import SimpleNamespace

        return [SimpleNamespace(path=p, size=self.files[p]) for p in paths if p in self.files]

    def hf_hub_download(self, repo, filename, revision=None, **k):
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in self.files:
            raise EntryNotFoundError(f"404 {filename}")
        self.downloads.append(filename)
        p = self.cache / repo / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(gguf_bytes(8))
        return str(p)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub = FakeHub({"m-Q4_K_M.gguf": 4_200_000_000, "m-Q8_0.gguf": 8_100_000_000, "README.md": 10,
                   "s-00001-of-00002.gguf": 2_000_000_000, "s-00002-of-00002.gguf": 1_000_000_000}, tmp_path / "dl")
    for fn in ("list_repo_files", "get_paths_info", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, fn, getattr(hub, fn))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    return hub


def test_online_lists_sizes_downloads_parts_and_says_the_size_first(fake_hub, capsys):
    with pytest.raises(UserError) as ei:
        R.resolve_model("hf://o/r")
    assert "m-Q4_K_M.gguf (4.2 GB)" in str(ei.value) and "s-00001-of-00002.gguf (3.0 GB, 2 parts)" in str(ei.value)
    assert fake_hub.downloads == []
    p = R.resolve_model("hf://o/r:s-00001-of-00002.gguf")
    assert fake_hub.downloads == ["s-00001-of-00002.gguf", "s-00002-of-00002.gguf"]
    assert p.name == "s-00001-of-00002.gguf"
    err = capsys.readouterr().err
    assert "downloading o/r:s-00001-of-00002.gguf and 1 more part(s) from the Hugging Face Hub (3.0 GB)" in err
    with pytest.raises(UserError, match="has no file nope.gguf"):
        R.resolve_model("hf://o/r:nope.gguf")
