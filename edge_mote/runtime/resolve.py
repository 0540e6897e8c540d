"""Where a model comes from: a local GGUF path, or -- only when asked explicitly -- the Hugging Face Hub.

    resolve_model("models/qwen3-moe.gguf")                      # a local file; missing -> "model file not found"
    resolve_model("hf://owner/repo")                            # the repo's only GGUF model (else: list them)
    resolve_model("hf://owner/repo:model-Q4_K_M.gguf")          # one file of the repo
    resolve_model("hf://owner/repo:sub/model-Q4_K_M.gguf@main") # a file in a folder, at a revision (branch, tag, sha)

A path that does not exist is always an error, never a Hub lookup: nothing is downloaded unless the model is
named with ``hf://``. Downloads go through huggingface-hub's own functions (``hf_hub_download``,
``list_repo_files``, ``get_paths_info``), so its cache (``HF_HUB_CACHE`` / ``HF_HOME``), token and
``HF_HUB_OFFLINE=1`` apply: offline, files are taken from the local cache only. A split GGUF
(``name-00001-of-00003.gguf``) is downloaded whole and its first part is returned (llama.cpp loads the other
parts from the same folder). The size of what is about to be downloaded is printed first, and huggingface-hub
shows its progress bar.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

HF_SCHEME = "hf://"
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_URI_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev1>[^:/\s@]+))?(?:[:/](?P<file>[^@\s]+))?"
                     r"(?:@(?P<rev2>[^\s@]+))?$")
_HINT_LOCAL = "pass the path of a .gguf file, or hf://OWNER/REPO[:FILE.gguf][@REVISION] to use the Hugging Face Hub"


@dataclass(frozen=True)
class HfSpec:
    """A model on the Hugging Face Hub: ``hf://repo[:filename][@revision]``."""

    repo: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return HF_SCHEME + self.repo + (f":{self.filename}" if self.filename else "") + \
            (f"@{self.revision}" if self.revision else "")


def parse_hf_uri(text: str) -> HfSpec:
    """``hf://owner/repo[:file.gguf][@revision]`` (also ``hf://owner/repo[@revision]/path/file.gguf``)."""
    if not text.startswith(HF_SCHEME):
        raise UserError(f"not a Hugging Face model reference: {text}", hint=_HINT_LOCAL)
    m = _URI_RE.match(text[len(HF_SCHEME):])
    if m is None or (m["rev1"] and m["rev2"]):
        raise UserError(f"bad Hugging Face model reference: {text}",
                        hint="expected hf://OWNER/REPO, hf://OWNER/REPO:FILE.gguf or hf://OWNER/REPO:FILE.gguf@REVISION")
    filename = m["file"]
    if filename is not None:
        filename = filename.strip("/")
        if not filename.endswith(".gguf") or ".." in filename.split("/"):
            raise UserError(f"bad Hugging Face model reference: {text}: the file must be a .gguf file of the repo")
    return HfSpec(m["repo"], filename or None, m["rev1"] or m["rev2"])


def split_parts(filename: str) -> list[str] | None:
    """All part names of a split GGUF (``x-00001-of-00003.gguf`` -> 3 names), or None for a single file."""
    m = SPLIT_RE.match(filename)
    if m is None:
        return None
    n = int(m["n"])
    if n < 1 or not 1 <= int(m["i"]) <= n:
        raise UserError(f"bad split GGUF name {filename}: part {int(m['i'])} of {n}")
    return [f"{m['stem']}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def group_ggufs(files: list[str]) -> dict[str, list[str]]:
    """GGUF model files of a repo listing: name shown to the user -> its files (the parts of a split model, in
    order). Multimodal projector files (``mmproj*.gguf``) are not models and are left out."""
    groups: dict[str, list[str]] = {}
    for f in sorted(files):
        base = f.rsplit("/", 1)[-1]
        if not f.endswith(".gguf") or base.lower().startswith("mmproj"):
            continue
        m = SPLIT_RE.match(f)
        if m is None:
            groups[f] = [f]
        else:
            first = f"{m['stem']}-00001-of-{m['n']}.gguf"
            groups.setdefault(first, []).append(f)
    return groups


def human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def resolve_model(spec: str | os.PathLike) -> Path:
    """The local GGUF file ``spec`` names: a path (must exist), or ``hf://...`` (downloaded or taken from the
    cache). For a split GGUF, the first part (the others are next to it)."""
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(HF_SCHEME):
        return _resolve_hf(parse_hf_uri(text))
    if not text.strip():
        raise UserError("no model given", hint=_HINT_LOCAL)
    p = Path(text).expanduser()
    if not p.exists():
        hint = _HINT_LOCAL
        if re.match(r"^[\w.-]+/[\w.-]+(:[^/].*\.gguf)?$", text) and not p.parent.exists():
            hint = f"to download it from the Hugging Face Hub, write hf://{text}"
        raise UserError(f"model file not found: {text}", hint=hint)
    if p.is_dir():
        raise UserError(f"{text} is a folder, not a GGUF file",
                        hint="convert a transformers folder with convert/hf_to_gguf.py, or give the .gguf file in it")
    _check_local_split(p)
    return p


def _check_local_split(p: Path) -> None:
    parts = split_parts(p.name)
    if parts is None:
        return
    if p.name != parts[0]:
        raise UserError(f"{p} is part of a split GGUF: load its first part", hint=f"{p.parent / parts[0]}")
    missing = [name for name in parts if not (p.parent / name).exists()]
    if missing:
        raise UserError(f"split GGUF {p.name}: {len(missing)} of its {len(parts)} parts are missing, e.g. {missing[0]}",
                        hint="all parts must be in the same folder")


def open_model(spec: str | os.PathLike, **load_kwargs):
    """``edge_mote.load`` as the commands use it: ``spec`` resolved (``resolve_model``), ``n_ctx`` checked against
    the context the model was trained with before llama.cpp allocates it (None or the default 2048: capped at the
    training context), and a chat template that does not compile a one-line error."""
    from ..gguf_meta.header import check_context
    from .model import load

    path = resolve_model(spec)
    load_kwargs["n_ctx"] = check_context(path, load_kwargs.get("n_ctx"))
    try:
        return load(path, **load_kwargs)
    except Exception as e:
        # llama-cpp-python compiles every tokenizer.chat_template* with jinja2 while loading
        if type(e).__module__.split(".")[0] != "jinja2":
            raise
        why = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path.name}: the chat template failed to compile: {type(e).__name__}: {why}",
                        hint="the GGUF's tokenizer.chat_template is broken (llama-cpp-python compiles it when "
                             "loading): fix it, e.g. with gguf-py's gguf_new_metadata.py") from None


# -- the Hub ----------------------------------------------------------------------------------------------------

def _hub():
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a dependency of edge-mote
        raise UserError("huggingface-hub is needed for hf:// models", hint="pip install huggingface-hub") from None
    return huggingface_hub


def _constants():
    _hub()
    import huggingface_hub.constants as C

    return C


def _offline() -> bool:
    return bool(_constants().HF_HUB_OFFLINE)


def _hub_error(e: Exception, spec: HfSpec, what: str) -> UserError:
    """One line for what huggingface-hub raised."""
    from huggingface_hub import errors as E

    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, UserError):
        return e
    if isinstance(e, getattr(E, "GatedRepoError", ())):
        return UserError(f"{spec.repo} is a gated repo: accept its terms on huggingface.co and log in",
                         hint="hf auth login (or set HF_TOKEN)")
    if isinstance(e, getattr(E, "RepositoryNotFoundError", ())):
        return UserError(f"no such model repo on the Hugging Face Hub: {spec.repo} (or it is private)",
                         hint="check the name; for a private repo log in first (hf auth login or HF_TOKEN)")
    if isinstance(e, getattr(E, "RevisionNotFoundError", ())):
        return UserError(f"{spec.repo} has no revision '{spec.revision}'", hint="a branch, tag or commit sha")
    if isinstance(e, getattr(E, "LocalEntryNotFoundError", ())) or isinstance(e, getattr(E, "OfflineModeIsEnabled", ())):
        if _offline():
            return UserError(f"{spec}: {what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                             hint="download it once with network access (unset HF_HUB_OFFLINE), or pass a local path")
        return UserError(f"cannot reach the Hugging Face Hub for {spec}: {first}",
                         hint="check your network, or set HF_HUB_OFFLINE=1 to use the local cache only")
    if isinstance(e, getattr(E, "EntryNotFoundError", ())) or name in ("RemoteEntryNotFoundError",):
        return UserError(f"{spec.repo} has no file {what}", hint=f"list its GGUF files: hf://{spec.repo}")
    if isinstance(e, OSError) and not isinstance(e, getattr(E, "HfHubHTTPError", ())):
        return UserError(f"cannot download {spec}: {e.strerror or first}")
    return UserError(f"cannot download {spec} from the Hugging Face Hub: {name}: {first}",
                     hint="check the reference and your network, or pass a local .gguf path")


def _cached_files(spec: HfSpec) -> list[str] | None:
    """Files of the repo's revision present in the local cache (offline listing), or None if none is cached."""
    hub = _hub()
    try:
        info = hub.scan_cache_dir(_constants().HF_HUB_CACHE)
    except Exception:  # CacheNotFound (no cache folder yet), CorruptedCacheException
        return None
    revision = spec.revision or "main"
    for repo in info.repos:
        if repo.repo_id != spec.repo or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if revision in rev.refs or rev.commit_hash == revision or (
                    len(revision) >= 7 and rev.commit_hash.startswith(revision)):
                return sorted(Path(f.file_path).relative_to(rev.snapshot_path).as_posix() for f in rev.files)
    return None


def _list_repo(spec: HfSpec) -> list[str]:
    hub = _hub()
    if _offline():
        files = _cached_files(spec)
        if files is None:
            raise UserError(f"{spec.repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                            hint="download it once with network access, or pass a local path")
        return files
    try:
        return list(hub.list_repo_files(spec.repo, revision=spec.revision))
    except Exception as e:
        raise _hub_error(e, spec, "files") from None


def _sizes(spec: HfSpec, files: list[str]) -> dict[str, int | None]:
    """Size in bytes of each file (from the Hub; from the cache when offline; None where unknown)."""
    hub = _hub()
    out: dict[str, int | None] = {f: None for f in files}
    if _offline():
        for f in files:
            p = _in_cache(spec, f)
            out[f] = p.stat().st_size if p is not None else None
        return out
    try:
        for info in hub.get_paths_info(spec.repo, files, revision=spec.revision):
            out[info.path] = getattr(info, "size", None)
    except Exception:  # sizes are informative only
        pass
    return out


def _in_cache(spec: HfSpec, filename: str) -> Path | None:
    p = _hub().try_to_load_from_cache(spec.repo, filename, revision=spec.revision)
    return Path(p) if isinstance(p, (str, os.PathLike)) and Path(p).exists() else None


def _choose(spec: HfSpec) -> list[str]:
    """The files of the model ``spec`` names (the parts of a split model, in order)."""
    if spec.filename is not None:
        return split_parts(spec.filename) or [spec.filename]
    files = _list_repo(spec)
    groups = group_ggufs(files)
    if not groups:
        raise UserError(f"{spec.repo} has no GGUF file" + (" in the local cache" if _offline() else ""),
                        hint="edge-mote loads GGUF models; convert a transformers model with convert/hf_to_gguf.py")
    if len(groups) == 1:
        (name,) = groups
        return split_parts(name) or [name]  # every part of a split model, also those the listing lacks
    sizes = _sizes(spec, [f for parts in groups.values() for f in parts])
    listing = ", ".join(f"{name} ({human_size(_total(sizes, parts))}"
                        + (f", {len(parts)} parts" if len(parts) > 1 else "") + ")"
                        for name, parts in groups.items())
    raise UserError(f"{spec.repo} has {len(groups)} GGUF models, choose one: {listing}",
                    hint=f"e.g. hf://{spec.repo}:{next(iter(groups))}")


def _total(sizes: dict[str, int | None], parts: list[str]) -> int | None:
    vals = [sizes.get(p) for p in parts]
    return None if any(v is None for v in vals) else sum(vals)


def _notify(message: str) -> None:
    """Tell the user what is downloaded (stderr; huggingface-hub's progress bar follows)."""
    print(message, file=sys.stderr, flush=True)


def _resolve_hf(spec: HfSpec) -> Path:
    hub = _hub()
    parts = _choose(spec)
    missing = [f for f in parts if _in_cache(spec, f) is None]
    if missing and not _offline():
        sizes = _sizes(spec, missing)
        what = parts[0] if len(parts) == 1 else f"{parts[0]} and {len(parts) - 1} more part(s)"
        _notify(f"downloading {spec.repo}:{what} from the Hugging Face Hub ({human_size(_total(sizes, missing))})"
                f" into the Hugging Face cache")
    paths = []
    for f in parts:
        try:
            paths.append(Path(hub.hf_hub_download(spec.repo, f, revision=spec.revision)))
        except Exception as e:
            raise _hub_error(e, spec, f) from None
    first = paths[0]
    if len(paths) > 1 and any(p.parent != first.parent for p in paths):  # pragma: no cover - the cache keeps a folder
        raise UserError(f"the parts of {spec} are not in one folder of the cache")
    return first
