"""Shared fixtures: the patched build the set-up made (never rebuilt here) and tiny models built once and cached.

Tiny models are transformers models of real MoE architectures with random weights, converted with llama.cpp's
own convert_hf_to_gguf.py. They are cached under $EDGE_MOTE_CACHE/test-models/<key>/ where the key covers the
code that makes them, so a second test run reuses them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from edge_mote.tiny import TINY_ARCHS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def native():
    """The patched llama.cpp installed by the set-up command; fails (does not skip) when it is missing."""
    from edge_mote.errors import EdgeMoteError
    from edge_mote.runtime import bindings, native as nat

    try:
        bindings.lib()
        return nat
    except EdgeMoteError as e:
        pytest.fail(f"{e} ({e.hint})")


@pytest.fixture(scope="session")
def stock_lib_dir(native, request) -> Path:
    """The unpatched libllama of the same sdist, for tests that compare with stock llama.cpp. Not part of a user's
    set-up: built the first time a test needs it (`native/build.py --stock-only`, ~3 minutes on 2 cores), then cached
    in $EDGE_MOTE_CACHE and recorded next to the installed patched build."""
    import subprocess
    import sys

    d = native.stock_lib_dir()
    if d is None:
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("building the unpatched libllama the stock-compatibility tests compare against "
                          "(once, cached; ~3 minutes on 2 cores) ...")
        res = subprocess.run([sys.executable, str(REPO / "native" / "build.py"), "--stock-only"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.fail("building the stock libllama failed: " + (res.stderr or res.stdout)[-3000:])
        native.manifest.cache_clear()
        d = native.stock_lib_dir()
        if d is None:
            pytest.fail("native/build.py --stock-only did not record a stock libllama: " + res.stdout[-2000:])
    return d


@pytest.fixture(scope="session")
def vendor_dir(native) -> Path:
    return native.vendored_llama_cpp()


def _models_key() -> str:
    import transformers

    h = hashlib.sha256()
    for f in ("edge_mote/tiny.py", "edge_mote/conversion.py", "native/LLAMA_CPP_PYTHON"):
        h.update((REPO / f).read_bytes())
    h.update(transformers.__version__.encode())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    d = root / "test-models" / _models_key()
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_model(models_dir, vendor_dir):
    """tiny_model(arch) -> (hf_dir, gguf_path), built once per key and cached on disk."""
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.tiny import make_tiny_hf_model

    def make(arch: str) -> tuple[Path, Path]:
        d = models_dir / arch
        hf, gguf = d / "hf", d / "model-f32.gguf"
        if not gguf.exists():
            if hf.exists():
                shutil.rmtree(hf)
            make_tiny_hf_model(arch, hf, vendor_dir / "models" / "ggml-vocab-gpt-2.gguf", seed=0)
            convert_hf_to_gguf(hf, gguf, vendor_dir, outtype="f32")
        return hf, gguf

    return make


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny_loaded(request, tiny_model, native):
    """Each tiny architecture's F32 GGUF loaded (n_ctx 256, 2 threads), once per test module that asks for it."""
    import edge_mote

    with edge_mote.load(tiny_model(request.param)[1], n_ctx=256, n_threads=2) as model:
        yield model


@pytest.fixture(scope="session")
def dense_gguf(models_dir, vendor_dir) -> Path:
    """A tiny dense (non-MoE) Qwen3 model, for the 'not a Mixture-of-Experts model' errors."""
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.tiny import make_gpt2_tokenizer

    gguf = models_dir / "dense-qwen3" / "model-f32.gguf"
    if not gguf.exists():
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        hf = models_dir / "dense-qwen3" / "hf"
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)
        Qwen3ForCausalLM(cfg).to(torch.float32).save_pretrained(str(hf))
        make_gpt2_tokenizer(vendor_dir / "models" / "ggml-vocab-gpt-2.gguf", hf)
        convert_hf_to_gguf(hf, gguf, vendor_dir, outtype="f32")
    return gguf


@pytest.fixture(scope="session")
def edge_mote_exe() -> str:
    """The installed console script (end-to-end tests run the real CLI)."""
    import sys

    exe = Path(sys.executable).parent / "edge-mote"
    if not exe.exists():
        found = shutil.which("edge-mote")
        if not found:
            pytest.fail("the edge-mote command is not installed: run ./setup.sh")
        return found
    return str(exe)
