"""Fuzz the patched llama.cpp's default-profile reader (``llama_moe_steer_read_default``, run while llama.cpp loads
a model) with damaged edge-mote metadata in a real tiny model, loaded through ``edge_mote.load`` in a child process.

Each case is the tiny model's own metadata and tensor infos plus generated edge-mote keys (tests/fuzz/generators.py);
the tensor data are a sparse hole (zeros, nothing written). The child loads the file, and when edge-mote accepts it
evaluates two tokens; it reports one line per case. A case passes when the child survives it (no crash, no abort)
and the outcome is a load, or a one-line UserError; when edge-mote loads the file, the steering llama.cpp applied
must be the default profile edge-mote's Python reader read (or nothing, when llama.cpp refused it with a warning).
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import generators as Gen

CHILD = r"""
import json, math, sys
import edge_mote
from edge_mote.errors import UserError
for line in sys.stdin:
    path = line.strip()
    try:
        with edge_mote.load(path, n_ctx=32, n_threads=1) as m:
            native = str(m.steering)
            profiles = m.profiles
            default = m.info.default_profile
            expect = str(profiles[default].steering) if default else ""
            logits = m.logits(m.tokenize("hi"))
            finite = bool(__import__("numpy").isfinite(logits).all())
        out = {"outcome": "loaded", "native": native, "python_default": expect, "finite": finite}
    except UserError as e:
        out = {"outcome": "rejected", "message": str(e)}
    except Exception as e:
        out = {"outcome": "exception", "message": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


@dataclass
class NativeReport:
    n: int = 0
    loaded: int = 0
    rejected: int = 0
    applied_default: int = 0
    crashes: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{'GGUF profiles (C)':<22} {self.n:>6} inputs: {self.loaded:>6} loaded ({self.applied_default} with a "
                f"default profile applied natively), {self.rejected:>6} rejected (UserError), {len(self.crashes)} "
                f"crashes/aborts, {len(self.failures)} failures, {self.seconds:6.1f} s")


def _layout(model: Path) -> tuple[bytes, int, bytes, int, int, int]:
    """(key-value bytes, n_kv, tensor-info bytes, n_tensors, alignment, data bytes) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(model, "r")
    raw = model.read_bytes()[: r.data_offset]
    kv_fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    kv_start = min(f.offset for f in kv_fields)
    kv_end = max(f.offset + sum(p.nbytes for p in f.parts) for f in kv_fields)
    ti_start = min(t.field.offset for t in r.tensors)
    ti_end = max(t.field.offset + sum(p.nbytes for p in t.field.parts) for t in r.tensors)
    assert kv_end == ti_start, "unexpected GGUF layout"
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32
    data = model.stat().st_size - r.data_offset
    return raw[kv_start:kv_end], len(kv_fields), raw[ti_start:ti_end], len(r.tensors), align, data


def write_case(path: Path, layout, extra: list[bytes]) -> None:
    kv, n_kv, ti, n_t, align, data = layout
    head = b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv + len(extra)) + kv + b"".join(extra) + ti
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + data)  # a sparse hole: the weights read as zeros


def _child(log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, text=True, bufsize=1)


def run_native(model: Path, n: int, seed: int, workdir: Path, timeout: float = 60.0) -> NativeReport:
    workdir.mkdir(parents=True, exist_ok=True)
    layout = _layout(model)
    rep, rng, t0 = NativeReport(), random.Random(seed + 5), time.perf_counter()
    log = open(workdir / "native-child.log", "w")
    child = _child(log)
    case = workdir / "case.gguf"
    try:
        for i in range(n):
            kvs, meta = Gen.profile_kvs(rng, n_layer=3, n_expert=8)
            write_case(case, layout, kvs)
            rep.n += 1
            child.stdin.write(str(case) + "\n")
            child.stdin.flush()
            ready, _, _ = select.select([child.stdout], [], [], timeout)
            line = child.stdout.readline() if ready else ""
            if not line:
                if ready:
                    child.wait(timeout=10)
                else:
                    child.kill()
                saved = workdir / f"crash-{i}.gguf"
                os.replace(case, saved)
                rep.crashes.append({"case": i, "file": str(saved), "returncode": child.poll(), "meta": repr(meta),
                                    "hang": not ready})
                child = _child(log)
                continue
            out = json.loads(line)
            if out["outcome"] == "rejected":
                msg = out["message"]
                if "\n" in msg or not msg.strip():
                    rep.failures.append({"case": i, "error": f"unclear message {msg!r}"})
                else:
                    rep.rejected += 1
            elif out["outcome"] == "loaded":
                rep.loaded += 1
                rep.applied_default += bool(out["native"])
                if out["native"] not in ("", out["python_default"]):
                    rep.failures.append({"case": i, "error": f"llama.cpp applied {out['native']!r}, edge-mote read "
                                                             f"{out['python_default']!r}", "meta": repr(meta)})
                if not out["finite"]:
                    rep.failures.append({"case": i, "error": "non-finite logits", "meta": repr(meta)})
            else:
                rep.failures.append({"case": i, "error": out["message"], "meta": repr(meta)})
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        log.close()
    rep.seconds = time.perf_counter() - t0
    return rep
