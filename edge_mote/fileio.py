"""Writing outputs safely: the one place that knows how edge-mote writes a file.

Every output (scan.json, heatmaps, GGUF copies with profiles, converted / quantized / pruned models) goes through
``atomic_output``: the folder is checked *before* the long work starts, the data goes to a temporary file in the
target folder, is fsync'd and renamed into place, so the output is complete or absent; it never replaces the
input; it gets the input's file mode (or the umask's default, as ``open`` would give); an ``OSError`` (permission,
disk full, ...) becomes a one-line ``UserError`` and leaves no partial file behind.

    check_output(out, inputs=[model])                 # early: before minutes of work
    with atomic_output(out, inputs=[model]) as tmp:   # tmp: a Path in out's folder
        write_everything(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import UserError

PathLike = str | os.PathLike


def umask_mode() -> int:
    """The mode ``open`` gives a new file under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (also through links); False when either does not exist."""
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def describe_oserror(e: OSError, path: PathLike) -> str:
    """A one-line description of an OSError met while writing ``path``."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: cannot write {path}"
    if e.errno == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    return f"cannot write {path}: {e.strerror or e}"


def check_output(out: PathLike, inputs: Sequence[PathLike] = ()) -> Path:
    """Fail early (before long work) when ``out`` cannot be written: its folder is missing or not writable, it is a
    folder, or it is one of the ``inputs``. Returns ``out`` as a Path."""
    out = Path(out).expanduser()
    for src in inputs:
        if src is not None and same_file(src, out):
            raise UserError(f"output {out} is the input file: edge-mote never writes over its input",
                            hint="choose another output path")
    if out.is_dir():
        raise UserError(f"output {out} is a folder", hint="give a file name inside it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output folder {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"permission denied: cannot write in {parent}")
    return out


@contextlib.contextmanager
def atomic_output(out: PathLike, inputs: Sequence[PathLike] = (), mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success fsync it, give it the first input's mode (or ``mode``, or
    the umask's default) and rename it to ``out``. On any error the temporary file is removed."""
    out = check_output(out, inputs)
    if mode is None:
        src = next((Path(p) for p in inputs if p is not None and Path(p).is_file()), None)
        mode = (src.stat().st_mode & 0o777) if src is not None else umask_mode()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(describe_oserror(e, out)) from None
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
        with contextlib.suppress(OSError):  # make the rename durable
            dfd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(describe_oserror(e, out)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(out: PathLike, text: str, inputs: Sequence[PathLike] = ()) -> Path:
    """Write a text file atomically (see ``atomic_output``)."""
    with atomic_output(out, inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out)
