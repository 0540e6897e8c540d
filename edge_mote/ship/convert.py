"""Transformers model (local folder or Hugging Face Hub repo) -> GGUF: ``edge-mote convert``.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` from the vendored (patched build's) sources, through
``edge_mote.conversion``; edge-mote then adds steering profiles (from scan.json files or profile JSON files).
A Hub repo id goes through ``huggingface_hub.snapshot_download`` only when the argument is not a local folder:
``HF_HUB_OFFLINE=1`` (or ``offline=True``) uses the local cache only, ``revision`` pins a branch, tag or commit.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import EdgeMoteError, UserError
from ..fileio import check_output
from .gguf_copy import progress_bar

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ProfileSource:
    """Where a profile comes from: a scan.json (top-N experts, a mode) or a profile JSON file."""

    path: Path
    top: int = 10
    mode: str = "off"
    name: str | None = None


def resolve_source(source: str, revision: str | None = None, offline: bool | None = None) -> Path:
    """A local transformers folder, or the snapshot folder of a Hub repo id (downloaded or from the cache)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if revision is not None:
            raise UserError("--revision is for Hub repos; the source is a local folder")
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a transformers model folder (no config.json)")
        return p
    if p.exists():
        raise UserError(f"{p} is a file; convert needs a transformers model folder or a Hub repo id")
    if not _REPO_RE.match(source) or source.startswith((".", "/", "~")):
        raise UserError(f"model folder not found: {source}", hint="pass a local folder or a Hub repo id owner/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise UserError("huggingface-hub is needed to fetch models from the Hub") from None
    kwargs = {"revision": revision}
    if offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        kwargs["local_files_only"] = True
    try:
        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.tiktoken", "*.jinja", "*.py"], **kwargs))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        offline_now = kwargs.get("local_files_only")
        raise UserError(f"cannot get {source}" + (f"@{revision}" if revision else "") + f" from the Hugging Face Hub"
                        + (" cache (offline)" if offline_now else "") + f": {type(e).__name__}: {first}",
                        hint="check the repo id and revision" + ("; it is not in the local cache" if offline_now
                                                                  else ", your network and HF_TOKEN")) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{source}: the snapshot has no config.json: not a transformers model repo")
    return folder


def _profiles_from(src: ProfileSource) -> tuple[list, dict | None]:
    """(profiles, scan model shape or None) from one file."""
    from ..ftri.report import load_scan
    from ..gguf_meta.profiles import Profile, check_profile_name
    from ..steering import Steering

    try:
        doc = json.loads(Path(src.path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {src.path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{src.path} is not valid JSON: {e}") from None
    if isinstance(doc, dict) and "ranking" in doc:  # a scan
        scan = load_scan(src.path)
        ranking = [(int(e["layer"]), int(e["expert"])) for e in scan["ranking"]["entries"] if e["rd"] > 0]
        if len(ranking) < src.top:
            raise UserError(f"{src.path}: the scan ranks only {len(ranking)} experts above the control, "
                            f"fewer than --top {src.top}")
        picked = ranking[: src.top]
        name = src.name or re.sub(r"[^A-Za-z0-9_-]", "-", Path(src.path).stem)[:64]
        check_profile_name(name)
        steering = Steering(**{src.mode: picked})
        return [Profile(name, steering, f"top-{src.top} {src.mode} from {Path(src.path).name}")], scan["model"]
    items = doc.get("profiles") if isinstance(doc, dict) and "profiles" in doc else doc
    items = items if isinstance(items, list) else [items]
    out = []
    for it in items:
        if not isinstance(it, dict) or "name" not in it or "steering" not in it:
            raise UserError(f"{src.path}: expected a scan.json or profile JSON "
                            '({"name": ..., "steering": "off=L:E,..." or {...}, "description": ...})')
        st = it["steering"]
        steering = Steering.parse(st) if isinstance(st, str) else Steering.from_dict(st)
        out.append(Profile(check_profile_name(str(it["name"])), steering, str(it.get("description", ""))))
    return out, None


@dataclass(frozen=True)
class ConvertResult:
    source: str
    folder: str
    output: str
    outtype: str
    bytes: int
    profiles: tuple[str, ...]
    default_profile: str | None
    seconds: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "profiles": list(self.profiles), "seconds": round(self.seconds, 3)}


def _expected_bytes(folder: Path, outtype: str) -> int:
    """A rough size of the output (for the progress bar): the weights' parameter count x bytes per parameter."""
    total = 0
    for f in folder.glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    count = 1
                    for d in v["shape"]:
                        count *= int(d)
                    total += count
        except (OSError, ValueError, KeyError):
            continue
    return int(total * _BYTES_PER_PARAM.get(outtype, 4.0)) or 1


def _watch(folder: Path, name: str, bar, stop: threading.Event) -> None:
    """Feed the bar with the size of the converter's partial output file until ``stop``."""
    seen = 0
    while not stop.wait(0.5):
        sizes = []
        for p in folder.glob(f".{name}.*"):
            try:
                sizes.append(p.stat().st_size)
            except OSError:
                pass
        if sizes:
            now = max(sizes)
            if now > seen:
                bar.update(now - seen)
                seen = now


def convert_model(source: str, out: str | os.PathLike, *, outtype: str = "f16", revision: str | None = None,
                  offline: bool | None = None, profiles: Sequence[ProfileSource] = (), default_profile: str | None = None,
                  progress: bool = False) -> ConvertResult:
    """Convert ``source`` (folder or Hub repo id) to the GGUF ``out`` with llama.cpp's converter, then store the
    profiles. Atomic; never over an input file."""
    from ..conversion import convert_hf_to_gguf
    from ..gguf_meta.profiles import read_profiles, write_profiles
    from ..runtime.native import vendored_llama_cpp

    t0 = time.perf_counter()
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    out = check_output(Path(out))
    loaded = []
    for ps in profiles:
        loaded.append(_profiles_from(ps))
    names = [p.name for ps, _ in loaded for p in ps]
    if len(set(names)) != len(names):
        raise UserError("two profiles have the same name", hint="name scans with --profile-name")
    if default_profile is not None and default_profile not in names:
        raise UserError(f"--default-profile {default_profile} is not among the profiles: {', '.join(names) or 'none'}")
    folder = resolve_source(source, revision, offline)
    if out.resolve().parent == folder.resolve():
        raise UserError(f"output {out} is inside the model folder", hint="write it elsewhere")
    vendor = vendored_llama_cpp()

    # the converter writes atomically itself (a temporary file next to its output, renamed into place); with
    # profiles it writes a staging file that write_profiles copies atomically onto ``out``
    target = out if not loaded else out.with_name(f".{out.name}.{os.getpid()}.stage.gguf")
    bar = progress_bar(_expected_bytes(folder, outtype), "converting", progress)
    stop = threading.Event()
    if bar is not None:
        threading.Thread(target=_watch, args=(target.parent, target.name, bar, stop), daemon=True).start()
    try:
        try:
            convert_hf_to_gguf(folder, target, vendor, outtype=outtype)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            raise UserError(f"conversion failed: {e}") from None
        finally:
            stop.set()
        if loaded:
            from ..gguf_meta.profiles import open_reader

            _check_profiles_fit(open_reader(target), loaded)
            all_profiles = {p.name: p for ps, _ in loaded for p in ps}
            write_profiles(target, out, all_profiles, default_profile)
    finally:
        stop.set()
        if bar is not None:
            bar.close()
        if target != out:
            target.unlink(missing_ok=True)
    stored, default = read_profiles(out) if loaded else ({}, None)
    return ConvertResult(source, str(folder), str(out), outtype, out.stat().st_size, tuple(stored), default,
                         time.perf_counter() - t0)


def _check_profiles_fit(reader, loaded) -> None:
    """Every profile is valid for the converted model (layers, experts, limits); a scan of another shape is refused."""
    from .prune import moe_shape

    shape = moe_shape(reader)
    if not shape.moe_layers:
        raise UserError("the converted model is not a Mixture-of-Experts model: it cannot carry steering profiles")
    for ps, scan_model in loaded:
        if scan_model is not None and (int(scan_model["n_expert"]) != shape.n_expert or
                                       tuple(scan_model["moe_layers"]) != shape.moe_layers):
            raise UserError(f"a scan was made on a model with {scan_model['n_expert']} experts in layers "
                            f"{scan_model['moe_layers']}, not this one ({shape.n_expert} in {list(shape.moe_layers)})")
        for p in ps:
            try:
                p.steering.check(shape.n_layer, shape.n_expert, shape.moe_layers, shape.used())
            except UserError as e:
                raise UserError(f"profile '{p.name}' does not fit the converted model: {e}") from None
