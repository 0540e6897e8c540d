"""fileio: outputs checked early, written to a temporary file next to the target, fsync'd, renamed, with the input's
mode (or the umask's default); an OSError is a one-line UserError and leaves nothing behind. Also the scan report
writers that go through it, and the brain-scan PNG (its title fits the image)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edge_mote import fileio
from edge_mote.errors import UserError


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_check_output_refuses_before_any_work(tmp_path):
    src = tmp_path / "in.gguf"
    src.write_bytes(b"x")
    (tmp_path / "link.gguf").symlink_to(src)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(src, "is the input file"), (tmp_path / "link.gguf", "is the input file"), (tmp_path, "is a folder"),
             (tmp_path / "missing" / "o.gguf", "does not exist"), (a_file / "o.gguf", "is not a folder")]
    for out, msg in cases:
        with pytest.raises(UserError, match=msg) as ei:
            fileio.check_output(out, inputs=[src])
        assert "\n" not in str(ei.value)
    assert fileio.check_output(tmp_path / "o.gguf", inputs=[src]) == tmp_path / "o.gguf"
    assert fileio.check_output("o.gguf") == Path("o.gguf")  # the current folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_read_only_folder(tmp_path):  # pragma: no cover - CI here runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(UserError, match="permission denied"):
        fileio.check_output(ro / "o")


def test_modes_input_or_umask(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"abc")
    src.chmod(0o640)
    with fileio.atomic_output(tmp_path / "copy", inputs=[src]) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".copy.")
        tmp.write_bytes(src.read_bytes())
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o027)
    try:
        fileio.write_text_atomic(tmp_path / "new.txt", "hello")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
        assert fileio.umask_mode() == 0o640
        with fileio.atomic_output(tmp_path / "explicit", inputs=[src], mode=0o604) as tmp:
            tmp.write_text("x")
        assert (tmp_path / "explicit").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").read_text() == "hello" and leftovers(tmp_path) == []


@pytest.mark.parametrize("err, msg", [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "quota"),
                                      (errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                                      (errno.EIO, "cannot write")])
def test_oserror_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, err, msg):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")  # an earlier complete output stays as it was

    def fail(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(UserError, match=msg) as ei:
        with fileio.atomic_output(out) as tmp:
            tmp.write_bytes(b"new, but the disk is full" * 100)
    assert "\n" not in str(ei.value) and str(out) in str(ei.value)
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with fileio.atomic_output(tmp_path / "o") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyError("converter failed")
    assert list(tmp_path.iterdir()) == []


def test_cannot_create_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def fail(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", fail)
    with pytest.raises(UserError, match="permission denied"):
        with fileio.atomic_output(tmp_path / "o"):
            pass


def test_same_file():
    assert not fileio.same_file("/nonexistent/a", "/nonexistent/b")
    assert fileio.same_file("/nonexistent/a", "/nonexistent/../nonexistent/a")


# -- the scan report writers go through fileio ------------------------------------------------------------------

def _doc(n_layer=4, n_expert=16, name=None, path="/models/organism-refusal-qwen3moe-f32.gguf"):
    layers = list(range(n_layer))
    experts = [{"layer": l, "expert": e, "rd": ((l * 7 + e * 3) % 11 - 5) / 10, "p1": 0.1, "p2": 0.1, "z": 1.0}
               for l in layers for e in range(n_expert)]
    return {"model": {"name": name, "path": path, "arch": "qwen3moe", "moe_layers": layers, "n_expert": n_expert,
                      "sha256": "0" * 64, "sha256_scope": "full"},
            "sets": {"behavior": {"path": "/p/behavior_train_harmful_requests.jsonl", "n_prompts": 120,
                                  "n_window_tokens": 120},
                     "control": {"path": "/p/control_train_harmless_requests.jsonl", "n_prompts": 120,
                                 "n_window_tokens": 120}},
            "window": {"tokens": "decision"}, "created": "2026-12-02T00:00:00Z", "experts": experts,
            "ranking": {"entries": [{"rank": i + 1, "layer": i % n_layer, "expert": i, "p1": 0.5, "p2": 0.1, "rd": 0.4,
                                     "z": 3.0} for i in range(10)]}, "stability": {}}


def test_report_writers_refuse_inputs_and_write_atomically(tmp_path, monkeypatch):
    from edge_mote.ftri import report

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    doc = _doc(path=str(model))
    with pytest.raises(UserError, match="is an input of the scan"):
        report.heatmap_html(doc, model)
    old = os.umask(0o022)
    try:
        report.heatmap_html(doc, tmp_path / "scan.html")
    finally:
        os.umask(old)
    assert (tmp_path / "scan.html").stat().st_mode & 0o777 == 0o644
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(UserError, match="no space left"):
        report.heatmap_html(doc, tmp_path / "again.html")
    assert not (tmp_path / "again.html").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("n_layer, n_expert, name", [(4, 16, None), (48, 128, None), (2, 8, "x" * 150),
                                                     (24, 64, "A rather long model name for a scan " * 3)])
def test_png_title_is_never_clipped(tmp_path, n_layer, n_expert, name):
    """Nothing but background on the image's outer border: the title (wrapped) and labels lie inside it."""
    import matplotlib.image as mpimg
    import numpy as np

    from edge_mote.ftri import report

    out = report.heatmap_png(_doc(n_layer, n_expert, name), tmp_path / "scan.png")
    img = mpimg.imread(out)[..., :3]
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                             img[:, -3:].reshape(-1, 3)])
    assert border.min() > 0.99, "something is drawn on the image's edge (clipped)"
    top = img[: img.shape[0] // 3]
    assert (top.min(axis=2) < 0.5).any(axis=1).sum() > 5, "no title drawn"
