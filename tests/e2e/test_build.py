"""The set-up's native build is cached by patch hash: a second run with an unchanged patch is a quick no-op."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_second_build_is_a_no_op(native):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(REPO / "native" / "build.py")], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    assert "up to date" in res.stdout, res.stdout[-2000:]
    assert elapsed < 30
    man = native.manifest()
    assert man["patches"] == sorted(p.name for p in (REPO / "native" / "patches").glob("*.patch"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("edge_mote_build", REPO / "native" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert man["key"].endswith("-patch-" + build.patch_hash()), "the installed build is not the current patch"
    for tool in ("ggml-rpc-server", "llama-quantize", "llama-server", "llama-cli"):
        assert Path(man["tools"][tool]).exists(), tool
