"""Convert transformers model folders to GGUF with llama.cpp's own converter.

The conversion runs llama.cpp's ``convert_hf_to_gguf.py`` (from a llama.cpp source tree, e.g. the
one vendored in the llama-cpp-python sdist) in a subprocess with the current interpreter. The
converter writes to a temporary file next to the destination (``edge_mote.fileio.atomic_output``),
which is then fsync'd and moved into place, so the destination is either the complete new file or
untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from .fileio import atomic_output, check_output

__all__ = ["OUTTYPES", "convert_hf_to_gguf"]

#: Output types accepted by llama.cpp's ``convert_hf_to_gguf.py --outtype``.
OUTTYPES: Final[tuple[str, ...]] = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")

# Files of a transformers folder that a GGUF output must never replace.
_INPUT_SUFFIXES: Final[frozenset[str]] = frozenset(
    {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".py", ".jinja", ".tiktoken"}
)


def _last_nonempty_line(text: str) -> str:
    """Return the last non-blank line of ``text`` (stripped), or ``""``."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def _check_destination(hf_dir: Path, out_path: Path) -> None:
    """Refuse destinations that would overwrite the model folder or one of its input files."""
    src = hf_dir.resolve()
    dst = out_path.resolve()
    if dst == src:
        raise ValueError(f"output path {out_path} is the input folder")
    if dst.is_dir():
        raise ValueError(f"output path {out_path} is a folder")
    if dst.parent == src and dst.suffix.lower() in _INPUT_SUFFIXES:
        raise ValueError(f"output path {out_path} would overwrite an input file of {hf_dir}")


def convert_hf_to_gguf(
    hf_dir: Path, out_path: Path, llama_cpp_dir: Path, outtype: str = "f32", extra_args: Sequence[str] = ()
) -> Path:
    """Convert the transformers folder ``hf_dir`` to the GGUF file ``out_path``.

    Runs ``<llama_cpp_dir>/convert_hf_to_gguf.py`` with :data:`sys.executable`, offline
    (``HF_HUB_OFFLINE=1``), writing to a temporary file in ``out_path``'s folder that is moved onto
    ``out_path`` atomically once the converter succeeds. An existing ``out_path`` is only replaced
    on success.

    Args:
        hf_dir: folder holding ``config.json``, the weights and the tokenizer.
        out_path: GGUF file to write.
        llama_cpp_dir: root of a llama.cpp source tree (holds ``convert_hf_to_gguf.py`` and
            ``gguf-py``).
        outtype: converter ``--outtype`` (one of :data:`OUTTYPES`).
        extra_args: further converter options (e.g. ``("--no-mtp",)``).

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: if ``hf_dir``, its ``config.json`` or the converter is missing.
        ValueError: for an unknown ``outtype`` or a destination that would overwrite the input.
        RuntimeError: if the converter fails; the message ends with its last stderr line.
    """
    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    llama_cpp_dir = Path(llama_cpp_dir)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a transformers model folder (no config.json)")
    script = llama_cpp_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"llama.cpp converter not found: {script}")
    _check_destination(hf_dir, out_path)

    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output(out_path)  # a read-only folder fails now, not after the conversion

    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    # the converter writes a temporary file next to the output (fileio.atomic_output: fsync'd, renamed into
    # place with the umask's default mode, removed on failure, an OSError is a one-line UserError)
    with atomic_output(out_path) as tmp_path:
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp_path), "--outtype", outtype, *extra_args]
        proc = subprocess.run(cmd, cwd=str(llama_cpp_dir), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors="replace", check=False)
        if proc.returncode != 0:
            last = _last_nonempty_line(proc.stderr) or _last_nonempty_line(proc.stdout) or "(no output)"
            raise RuntimeError(
                f"convert_hf_to_gguf.py failed on {hf_dir} (exit status {proc.returncode}): {last}"
            )
        if not tmp_path.is_file() or tmp_path.stat().st_size == 0:
            raise RuntimeError(f"convert_hf_to_gguf.py wrote no output for {hf_dir}")
    return out_path
