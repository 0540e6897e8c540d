"""Helpers for the `edge-mote serve` tests: the served organism (with a stored profile), a server subprocess on
loopback, and `edge-mote run` as the reference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
EDGE_MOTE = [sys.executable, "-m", "edge_mote"]
PROFILE = "no-refusal"


def organism_with_profile(models_dir: Path, out_dir: Path) -> tuple[Path, list[tuple[int, int]], dict]:
    """The organism GGUF copied with profile ``no-refusal`` (its planted refusal experts OFF) as ``organism.gguf``;
    returns (path, those experts, the organism's meta)."""
    from edge_mote.api import add_profile
    from edge_mote.organism.train import build_organism
    from edge_mote.steering import Steering

    org = build_organism(models_dir / "organism", seed=0, progress=False)
    experts = [(int(d["layer"]), int(d["expert"])) for d in org.meta["trainable_experts"]]
    out = out_dir / "organism.gguf"
    if not out.exists():
        add_profile(org.gguf, out, PROFILE, Steering(off=experts), "the planted refusal experts OFF")
    return out, experts, org.meta


class Server:
    """``edge-mote serve MODEL --port 0 ...`` as a subprocess; ``url`` is its base URL (``http://127.0.0.1:N``)."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, timeout: float = 120):
        cmd = EDGE_MOTE + ["serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = self.proc.stdout.readline()
        m = re.search(r"http://(127\.0\.0\.1:\d+)/v1", line)
        if not m:
            self.close()
            raise RuntimeError(f"the server did not start: {line!r} {''.join(self.stderr)}")
        self.url = f"http://{m.group(1)}"
        self.banner = line
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("the server never answered /health")

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_cli(model: Path, prompt: str, n: int, *steer: str) -> str:
    """The completion ``edge-mote run`` prints for ``prompt`` (greedy), with steering flags ``steer``."""
    out = subprocess.run(EDGE_MOTE + ["run", str(model), "-p", prompt, "-n", str(n), "--json", "--threads", "1",
                                      *steer], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


def chat_text(model: Path, messages: list[dict]) -> str:
    """The chat prompt the server builds for ``messages`` (the GGUF's template, as ``edge-mote scan/eval`` render)."""
    import edge_mote
    from edge_mote.ftri.prompts import PromptItem, render

    with edge_mote.load(model, n_ctx=64, n_threads=1) as m:
        return render(m, PromptItem(id="t", source="t", messages=tuple(messages))).text
