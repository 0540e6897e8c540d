"""Where the patched llama.cpp build lives, as recorded by native/build.py in the installed llama_cpp package.

edge-mote does not know how llama.cpp is built (native/build.py does); it only reads the manifest that the
build writes next to the libraries: the vendored llama.cpp sources (for convert_hf_to_gguf.py), the tools
(ggml-rpc-server, llama-quantize, ...) and, when built, an unpatched libllama for comparisons.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path

from ..errors import EdgeMoteError

MANIFEST_NAME = "edge_mote_native.json"


@lru_cache(maxsize=1)
def manifest() -> dict:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeMoteError("llama_cpp is not installed", hint="run the set-up command from the README (./setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / "lib" / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise EdgeMoteError("the installed llama_cpp was not built by edge-mote (no build manifest)",
                            hint="run `python native/build.py` (the README's set-up command)") from None


def vendored_llama_cpp() -> Path:
    """The patched llama.cpp source tree (holds convert_hf_to_gguf.py, gguf-py and models/ggml-vocab-*.gguf)."""
    p = Path(manifest()["vendor_dir"])
    if not (p / "convert_hf_to_gguf.py").exists():
        raise EdgeMoteError(f"llama.cpp sources not found at {p}", hint="rerun `python native/build.py --force`")
    return p


def tool(name: str) -> Path:
    """Path of a llama.cpp tool built with the patch (e.g. ``ggml-rpc-server``, ``llama-quantize``)."""
    tools = manifest().get("tools", {})
    if name in tools and Path(tools[name]).exists():
        return Path(tools[name])
    found = shutil.which(name)
    if found:
        return Path(found)
    raise EdgeMoteError(f"llama.cpp tool '{name}' not found", hint="rerun `python native/build.py`")


def stock_lib_dir() -> Path | None:
    """Folder of an unpatched libllama built from the same sources (``build.py --with-stock``), if any."""
    p = manifest().get("stock_lib_dir")
    return Path(p) if p and (Path(p) / "libllama.so").exists() else None
