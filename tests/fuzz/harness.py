"""Run edge-mote's parsers on generated malformed inputs and collect every failure.

A parser passes an input when it returns a valid result or raises ``UserError`` with a clear message (non-empty,
one line, so that the CLI's ``error: ...`` stays one line). Anything else -- another exception, a crash, a hang,
a result that is not what the input said -- is a failure, recorded with the input that caused it.

    from tests.fuzz.harness import run_all
    report = run_all(n=10_000, seed=0, workdir=Path("/tmp/fuzz"))
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import generators as Gen
from . import gguf_bytes as G


@dataclass
class Report:
    target: str
    n: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    messages: dict[str, int] = field(default_factory=dict)  # rejection message (numbers stripped) -> count

    def line(self) -> str:
        return (f"{self.target:<22} {self.n:>6} inputs: {self.accepted:>6} accepted, {self.rejected:>6} rejected "
                f"(UserError), {len(self.failures):>3} failures, {len(self.messages):>4} distinct messages, "
                f"{self.seconds:6.1f} s")


def _shape(msg: str) -> str:
    import re

    return re.sub(r"'[^']*'|\"[^\"]*\"|-?\d+(\.\d+)?(e[-+]?\d+)?", "#", msg)[:100]


def _check(report: Report, inp, fn: Callable[[], object], validate: Callable[[object], str | None] | None = None):
    from edge_mote.errors import UserError

    report.n += 1
    try:
        out = fn()
    except UserError as e:
        msg = str(e)
        if not msg.strip() or "\n" in msg or "\r" in msg or (e.hint and "\n" in e.hint):
            report.failures.append({"input": _short(inp), "error": f"unclear UserError message: {msg!r}"})
        else:
            report.rejected += 1
            key = _shape(msg)
            report.messages[key] = report.messages.get(key, 0) + 1
        return
    except RecursionError as e:
        report.failures.append({"input": _short(inp), "error": f"RecursionError: {e}"})
        return
    except Exception as e:  # noqa: BLE001 - the point of fuzzing
        report.failures.append({"input": _short(inp), "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc(limit=-4)})
        return
    problem = validate(out) if validate else None
    if problem:
        report.failures.append({"input": _short(inp), "error": f"accepted, but {problem}"})
    else:
        report.accepted += 1


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 400 else r[:400] + f"... ({len(r)} chars)"


# -- targets ---------------------------------------------------------------------------------------------------------

def _valid_steering(s) -> str | None:
    from edge_mote.steering import Steering

    if not isinstance(s, Steering):
        return f"returned {type(s).__name__}"
    if any(l < 0 or e < 0 for l, e in s.experts):
        return "negative layer/expert"
    if not all(math.isfinite(v) for v in s.bias.values()) or not math.isfinite(s.margin) or s.margin < 0:
        return "non-finite bias or margin"
    again = Steering.parse(str(s))
    if again != s:
        return f"does not round-trip through its text form: {str(s)!r}"
    if Steering.from_json(s.to_json()) != s:
        return "does not round-trip through JSON"
    return None


def fuzz_steering_parse(n: int, seed: int = 0) -> Report:
    from edge_mote.steering import Steering

    rep, rng, t = Report("Steering.parse"), random.Random(seed), time.perf_counter()
    for _ in range(n):
        text = Gen.steering_text(rng)
        _check(rep, text, lambda: Steering.parse(text), _valid_steering)
    rep.seconds = time.perf_counter() - t
    return rep


def fuzz_steering_json(n: int, seed: int = 0) -> Report:
    from edge_mote.steering import Steering

    rep, rng, t = Report("Steering.from_dict/json"), random.Random(seed + 1), time.perf_counter()
    for i in range(n):
        value = Gen.steering_json(rng)
        if i % 2:
            _check(rep, value, lambda: Steering.from_dict(value), _valid_steering)
        else:
            text = Gen.json_text(rng, value)
            _check(rep, text, lambda: Steering.from_json(text), _valid_steering)
    rep.seconds = time.perf_counter() - t
    return rep


def fuzz_scan_json(n: int, seed: int, workdir: Path) -> Report:
    """load_scan, then what profile add / eval do with it: scan_ranking and steering_from_ranking."""
    from edge_mote.api import scan_ranking, steering_from_ranking
    from edge_mote.ftri.report import load_scan

    rep, rng, t = Report("scan.json"), random.Random(seed + 2), time.perf_counter()
    base = Gen.valid_scan()
    path = workdir / "scan.json"

    def use():
        doc = load_scan(path)
        ranking, info = scan_ranking(path)
        steering_from_ranking(ranking, min(2, len(ranking)), rng.choice(["off", "on", "drop"]), None, info)
        return doc

    for _ in range(n):
        data = Gen.scan_text(rng, base)
        path.write_bytes(data)
        _check(rep, data, use, lambda d: None if isinstance(d, dict) else "not a dict")
    rep.seconds = time.perf_counter() - t
    return rep


def _profiles_file(kvs: list[bytes], rng: random.Random) -> bytes:
    base = [G.kv_value("general.architecture", G.STR, "qwen3moe"), G.kv_value("qwen3moe.block_count", G.U32, 3)]
    data = G.gguf(base + kvs)
    start = len(G.gguf(base))
    return Gen.damage_bytes(rng, data, start) if rng.random() < 0.25 else data


def _valid_profiles(out) -> str | None:
    from edge_mote.gguf_meta.keys import PROFILE_NAME_RE
    from edge_mote.steering import Steering

    profiles, default = out
    if default is not None and default not in profiles:
        return f"default {default!r} not among the profiles"
    for name, p in profiles.items():
        if not isinstance(name, str) or not PROFILE_NAME_RE.match(name):
            return f"bad profile name {name!r}"
        if not isinstance(p.steering, Steering) or _valid_steering(p.steering):
            return f"profile {name!r}: {_valid_steering(p.steering)}"
        if not isinstance(p.description, str):
            return "description is not a string"
    return None


def fuzz_gguf_profiles(n: int, seed: int, workdir: Path) -> Report:
    """gguf_meta.profiles.read_profiles on GGUF files with damaged edge-mote metadata."""
    from edge_mote.gguf_meta.profiles import read_profiles

    rep, rng, t = Report("GGUF profiles (Python)"), random.Random(seed + 3), time.perf_counter()
    path = workdir / "profiles.gguf"
    for _ in range(n):
        kvs, _ = Gen.profile_kvs(rng)
        data = _profiles_file(kvs, rng)
        path.write_bytes(data)
        _check(rep, data[:2000], lambda: read_profiles(path), _valid_profiles)
    rep.seconds = time.perf_counter() - t
    return rep


def fuzz_profile_cache(n: int, seed: int, workdir: Path) -> Report:
    """read_profiles_cached with a damaged cache entry: it must fall back to the file, never fail or return junk."""
    from edge_mote.gguf_meta import profiles as P
    from edge_mote.steering import Steering

    rep, rng, t = Report("profile cache JSON"), random.Random(seed + 4), time.perf_counter()
    old = os.environ.get("EDGE_MOTE_CACHE")
    os.environ["EDGE_MOTE_CACHE"] = str(workdir / "cache")
    try:
        import shutil

        shutil.rmtree(workdir / "cache", ignore_errors=True)
        gguf = workdir / "cached.gguf"
        kvs = [G.kv_value("edge_mote.version", G.U32, 1), G.kv_value("edge_mote.profiles", G.ARR, ["a", "b"], G.STR),
               G.kv_value("edge_mote.default_profile", G.STR, "b")]
        for name, st in (("a", 1), ("b", 2)):
            kvs += [G.kv_value(f"edge_mote.profile.{name}.layer", G.ARR, [1, 2], G.I32),
                    G.kv_value(f"edge_mote.profile.{name}.expert", G.ARR, [3, 4], G.I32),
                    G.kv_value(f"edge_mote.profile.{name}.state", G.ARR, [st, 0], G.I32),
                    G.kv_value(f"edge_mote.profile.{name}.bias", G.ARR, [0.0, -2.5], G.F32),
                    G.kv_value(f"edge_mote.profile.{name}.margin", G.F32, 0.02)]
        gguf.write_bytes(G.gguf([G.kv_value("general.architecture", G.STR, "qwen3moe")] + kvs))
        truth = P.read_profiles(gguf)
        P.read_profiles_cached(gguf)
        (entry,) = (workdir / "cache" / "meta").glob("*.json")
        good = json.loads(entry.read_text())
        assert truth[1] == "b" and truth[0]["b"].steering == Steering(on=[(1, 3)], bias={(2, 4): -2.5}, margin=0.02)
        for _ in range(n):
            text = Gen.cache_text(rng, good)
            entry.write_text(text)
            # a damaged entry is never an error (the file is read instead) and never yields invalid profiles;
            # an entry that is still valid JSON of valid profiles is trusted (it is edge-mote's own cache)
            _check(rep, text, lambda: P.read_profiles_cached(gguf), _valid_profiles)
    finally:
        if old is None:
            os.environ.pop("EDGE_MOTE_CACHE", None)
        else:
            os.environ["EDGE_MOTE_CACHE"] = old
    rep.seconds = time.perf_counter() - t
    return rep


def run_python(n: int, seed: int, workdir: Path) -> list[Report]:
    workdir.mkdir(parents=True, exist_ok=True)
    return [fuzz_steering_parse(n, seed), fuzz_steering_json(n, seed), fuzz_scan_json(n, seed, workdir),
            fuzz_gguf_profiles(n, seed, workdir), fuzz_profile_cache(n, seed, workdir)]
