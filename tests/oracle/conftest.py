"""Fixtures of the oracle tests: tiny models of the architectures in edge_mote/tiny_archs.py, built once and cached."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _key() -> str:
    import transformers

    h = hashlib.sha256()
    for f in ("edge_mote/tiny.py", "edge_mote/tiny_archs.py", "edge_mote/conversion.py", "native/LLAMA_CPP_PYTHON"):
        h.update((REPO / f).read_bytes())
    h.update(transformers.__version__.encode())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def arch_model(vendor_dir, tiny_model):
    """arch_model(arch) -> (hf_dir, gguf_path) for any arch of TINY_ARCHS or EXTRA_ARCHS, cached on disk."""
    from edge_mote.tiny import TINY_ARCHS
    from edge_mote.tiny_archs import convert_arch_model, make_arch_model

    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    models = root / "test-models" / f"archs-{_key()}"

    def make(arch: str) -> tuple[Path, Path]:
        if arch in TINY_ARCHS:
            return tiny_model(arch)
        d = models / arch
        hf, gguf = d / "hf", d / "model-f32.gguf"
        if not gguf.exists():
            if hf.exists():
                shutil.rmtree(hf)
            make_arch_model(arch, hf, vendor_dir / "models" / "ggml-vocab-gpt-2.gguf", seed=0)
            convert_arch_model(arch, hf, gguf, vendor_dir)
        return hf, gguf

    return make


def make_pair_fixture(archs: tuple[str, ...]):
    """A module-scoped ``pair`` fixture over ``archs`` (for the modules that star-import tests/oracle/suite.py)."""
    from .suite import Pair

    @pytest.fixture(scope="module", params=archs)
    def pair(request, arch_model, native):
        hf, gguf = arch_model(request.param)
        p = Pair(request.param, hf, gguf)
        yield p
        p.model.close()

    return pair
