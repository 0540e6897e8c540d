"""Quantize a GGUF with llama.cpp's own quantizer (the ``llama-quantize`` tool the set-up builds): ``edge-mote quantize``.

Recipes:

* ``uniform`` -- llama.cpp's own mix for the type (``Q4_K_M`` etc.), unchanged.
* ``moe`` -- an expert-aware mix written as per-tensor overrides (``--tensor-type-file``), after DQ3_K_M and Unsloth's
  dynamic quants: routed experts (``ffn_gate_exps``/``ffn_up_exps``) at the type's base (e.g. q4_k for Q4_K_M, q3_k
  for Q3_K_M); ``ffn_down_exps`` at q6_k in the first MoE layers (one per 29 MoE layers, at least 1) and one step
  up every 4th MoE layer; attention, shared experts and dense layers' FFNs at q6_k (q8_0 when the base is 5 bits or
  more). The router (``ffn_gate_inp``) and DeepSeek's ``exp_probs_b`` are never quantized by llama.cpp: they keep
  the input's precision. Token embeddings and the output head follow llama.cpp's rule for the type.

llama.cpp falls back to another type when a tensor's row is not a multiple of the type's block (256 for K-quants):
``inspect`` shows what each tensor actually got.

Importance matrix: ``imatrix`` (a llama.cpp imatrix file) is passed through; ``calib`` (prompts) first runs
``llama-imatrix`` (linked to the patched library) on the prompts rendered with the model's chat template, then
makes the expert entries routing-aware: an expert routed to by few calibration tokens has a noisy importance
estimate (and llama.cpp treats one never routed to as uniform), so each expert's per-column statistics are shrunk
towards its layer's pooled statistics with a prior of ``prior_tokens`` tokens:
``(sum_j + n0 * pooled_mean) / (count_j + n0)``.

All metadata, edge-mote profiles included, is copied by llama.cpp and checked byte-equal in the output (only
``general.file_type``, ``general.quantization_version`` and ``quantize.imatrix.*`` may change).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import EdgeMoteError, UserError
from ..fileio import atomic_output, check_output
from .gguf_index import read_index

# Imports are lazy (numpy, gguf-py, tqdm): ``edge-mote quantize`` is a thin wrapper around llama-quantize, and its
# fixed cost (start-up, reading the input's and the output's headers) is what it adds to llama-quantize's time.

#: the types llama-quantize accepts, and the base type of each (what most weights get)
BASE_TYPE = {
    "Q2_K": "q2_k", "Q2_K_S": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q3_K": "q3_k",
    "Q4_K_S": "q4_k", "Q4_K_M": "q4_k", "Q4_K": "q4_k", "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q5_K": "q5_k",
    "Q6_K": "q6_k", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1",
    "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "MXFP4_MOE": "mxfp4", "F16": "f16", "BF16": "bf16", "F32": "f32",
}
RECIPES = ("uniform", "moe")
_LADDER = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
_BITS = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5,
         "q5_1": 5, "iq4_nl": 4, "iq4_xs": 4, "mxfp4": 4}
_SAME_META_EXCEPT = ("general.file_type", "general.quantization_version")
_EXPS_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate_exps|ffn_up_exps|ffn_gate_up_exps|ffn_down_exps)\.weight$")
_ATTN_RE = re.compile(r"^blk\.(\d+)\.attn_\w+\.weight$")
_SHARED_RE = re.compile(r"^blk\.(\d+)\.ffn_\w+_shexp\.weight$")
_DENSE_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_PROGRESS_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


def normalise_type(qtype: str) -> str:
    t = qtype.strip().upper()
    if t not in BASE_TYPE:
        raise UserError(f"unknown quantization type '{qtype}'",
                        hint="one of: " + ", ".join(k for k in BASE_TYPE if not k.endswith("_K") or k == "Q6_K"))
    return t


def step_up(t: str, n: int) -> str:
    """A type ``n`` steps up the K-quant ladder q2_k < q3_k < q4_k < q5_k < q6_k < q8_0 (others: to q8_0)."""
    if t in _LADDER:
        return _LADDER[min(len(_LADDER) - 1, _LADDER.index(t) + n)]
    return "q8_0" if n > 0 else t


def moe_recipe(tensor_names: Sequence[str], moe_layers: Sequence[int], qtype: str) -> dict[str, str]:
    """The per-tensor types of recipe ``moe`` for ``qtype`` (tensor name -> ggml type name)."""
    base = BASE_TYPE[normalise_type(qtype)]
    if base in ("f16", "bf16", "f32"):
        raise UserError(f"recipe moe mixes quantized types; {qtype} is not a quantized type")
    hi = "q6_k" if _BITS.get(base, 4) <= 4 else "q8_0"
    moe_rank = {l: i for i, l in enumerate(sorted(moe_layers))}
    n_first = max(1, math.ceil(len(moe_rank) / 29))
    out: dict[str, str] = {}
    for name in tensor_names:
        if m := _EXPS_RE.match(name):
            rank = moe_rank.get(int(m.group(1)), 0)
            if m.group(2) == "ffn_down_exps":
                if rank < n_first:
                    out[name] = hi if _BITS.get(base, 4) < 6 else base
                elif rank % 4 == 3:
                    out[name] = step_up(base, 1)
                else:
                    out[name] = base
            else:
                out[name] = base
        elif _ATTN_RE.match(name) or _SHARED_RE.match(name):
            out[name] = hi
        elif (m := _DENSE_RE.match(name)) and int(m.group(1)) not in moe_rank:
            out[name] = hi
    return out


# -- importance matrix ----------------------------------------------------------------------------------------------

@dataclass
class ImatrixInfo:
    path: str
    computed: bool
    chunks: int | None = None
    rare_experts: int = 0       # (tensor, expert) entries with fewer than prior_tokens calibration tokens
    unseen_experts: int = 0     # ... with none
    expert_entries: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calib_text(src: Path, calib: str | os.PathLike, raw: bool = False) -> tuple[str, bool]:
    """The calibration prompts as one text (chat template from the GGUF unless ``raw``), and whether it holds
    special tokens (the template's markers) that llama-imatrix must parse."""
    from ..ftri.prompts import ChatTemplate, load_prompts, render

    tmpl = read_index(src).value("tokenizer.chat_template")
    template = ChatTemplate(str(tmpl)) if (tmpl and not raw) else None
    parts, special = [], False
    for item in load_prompts(calib):
        r = render(template, item, raw=raw or template is None)
        special |= r.templated
        text = r.text
        if item.answer:
            text += (item.answer if item.answer.startswith((" ", "\n")) else " " + item.answer)
        parts.append(text)
    if not parts:
        raise UserError(f"{calib}: no prompts")
    return "\n".join(parts) + "\n", special


def compute_imatrix(src: Path, calib: str | os.PathLike, out: Path, *, raw: bool = False, n_threads: int | None = None,
                    prior_tokens: int = 32) -> ImatrixInfo:
    """Run llama-imatrix on the calibration prompts, then make the expert entries routing-aware (module doc)."""
    from ..runtime.native import tool

    text, special = calib_text(src, calib, raw)
    exe = tool("llama-imatrix")
    with tempfile.TemporaryDirectory(prefix="edge-mote-imatrix-") as d:
        txt = Path(d) / "calib.txt"
        txt.write_text(text, encoding="utf-8")
        est = max(8, len(text.encode()) // 4)
        ctx = 1 << max(4, min(9, int(math.log2(max(16, est // 3)))))
        last = ""
        for _ in range(4):
            cmd = [str(exe), "-m", str(src), "-f", str(txt), "-o", str(out), "-c", str(ctx), "-b", str(ctx),
                   "--no-ppl", "-ngl", "0", "--output-format", "gguf"]
            if special:
                cmd.append("--parse-special")
            if n_threads:
                cmd += ["-t", str(n_threads)]
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
            if proc.returncode == 0 and out.is_file() and out.stat().st_size > 0:
                break
            last = _last_line(proc.stderr) or _last_line(proc.stdout)
            if "you need at least" in proc.stderr + proc.stdout and ctx > 16:
                ctx //= 2
                continue
            raise EdgeMoteError(f"llama-imatrix failed on {src.name}: {last}")
        else:
            raise EdgeMoteError(f"llama-imatrix failed on {src.name}: {last}",
                                hint="give more calibration prompts")
    info = shrink_rare_experts(out, prior_tokens)
    info.computed = True
    return info


def shrink_rare_experts(path: Path, prior_tokens: int) -> ImatrixInfo:
    """In place: every expert's statistics of a GGUF imatrix shrunk towards its tensor's pooled ones (module doc)."""
    import numpy as np
    from gguf import GGUFReader

    from .gguf_copy import field_value

    reader = GGUFReader(path, "r+")
    tensors = {t.name: t for t in reader.tensors}
    info = ImatrixInfo(str(path), computed=False, chunks=_int_or_none(field_value(reader, "imatrix.chunk_count")))
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        cnt = tensors.get(name[: -len(".in_sum2")] + ".counts")
        if cnt is None:
            continue
        sums = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        counts = cnt.data.reshape(-1)
        if counts.size <= 1 or sums.shape[0] != counts.size:
            continue
        info.expert_entries += int(counts.size)
        info.rare_experts += int((counts < prior_tokens).sum())
        info.unseen_experts += int((counts == 0).sum())
        total = float(counts.sum())
        if total <= 0 or prior_tokens <= 0:
            continue
        pooled = sums.sum(axis=0, dtype=np.float64) / total
        sums[...] = (sums.astype(np.float64) + prior_tokens * pooled[None, :]).astype(np.float32)
        counts[...] = (counts.astype(np.float64) + prior_tokens).astype(np.float32)
    reader.data.flush()
    del reader
    return info


def _int_or_none(v):
    return None if v is None else int(v)


def _last_line(text: str) -> str:
    for line in reversed((text or "").splitlines()):
        if line.strip():
            return line.strip()
    return ""


# -- quantize -------------------------------------------------------------------------------------------------------

@dataclass
class QuantizeResult:
    source: str
    output: str
    type: str
    recipe: str
    bytes_before: int
    bytes_after: int
    overrides: int
    imatrix: ImatrixInfo | None
    types: dict[str, int] = field(default_factory=dict)   # ggml type -> tensors in the output
    seconds: float = 0.0
    quantize_seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["imatrix"] = self.imatrix.to_dict() if self.imatrix else None
        d["seconds"] = round(self.seconds, 3)
        d["quantize_seconds"] = round(self.quantize_seconds, 3)
        return d


def check_not_quantized(reader, path: Path) -> None:
    for t in reader.tensors:
        if len(t.shape) >= 2 and t.tensor_type.name not in ("F32", "F16", "BF16"):
            raise UserError(f"{path.name} is already quantized ({t.name} is {t.tensor_type.name})",
                            hint="quantize the F32/F16/BF16 file (re-quantizing loses quality)")


def run_llama_quantize(src: Path, dst: Path, qtype: str, *, type_file: Path | None = None,
                       imatrix: Path | None = None, n_threads: int | None = None, bar=None,
                       tensor_bytes: dict[str, int] | None = None) -> None:
    """llama-quantize SRC DST TYPE [threads], its per-tensor progress lines fed to ``bar`` (bytes)."""
    from ..runtime.native import tool

    cmd = [str(tool("llama-quantize"))]
    if type_file is not None:
        cmd += ["--tensor-type-file", str(type_file)]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), qtype]
    if n_threads:
        cmd.append(str(n_threads))
    tail: list[str] = []
    stop = threading.Event()
    flusher = threading.Thread(target=_write_back, args=(dst, stop), daemon=True, name="edge-mote-writeback")
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        flusher.start()
        try:
            for line in proc.stdout:
                tail.append(line)
                del tail[:-40]
                if bar is not None and (m := _PROGRESS_RE.match(line.strip())):
                    bar.update((tensor_bytes or {}).get(m.group(3), 0))
            rc = proc.wait()
        finally:
            stop.set()
            flusher.join()
    if rc != 0:
        why = next((l.strip() for l in reversed(tail) if "error" in l.lower() or "failed" in l.lower()), None)
        raise EdgeMoteError(f"llama-quantize failed (exit status {rc}): {why or _last_line(''.join(tail))}")


def _write_back(path: Path, stop: threading.Event, interval: float = 0.5, step: int = 16 << 20) -> None:
    """While llama-quantize writes ``path``, push what it wrote to disk (``fdatasync`` every ``step`` new bytes) so
    that the output's final fsync (atomic_output: the file is durable before it is renamed into place) has little
    left to do: the disk works while the quantizer computes instead of after it. Best effort: errors are ignored
    (the final fsync reports them)."""
    fd = None
    try:
        flushed = 0
        while not stop.wait(interval):
            try:
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                size = os.fstat(fd).st_size
                if size - flushed >= step:
                    os.fdatasync(fd)
                    flushed = size
            except OSError:
                return
    finally:
        if fd is not None:
            os.close(fd)


def check_metadata_kept(src_index, out_index) -> None:
    """Every metadata entry of the input is in the output, byte-equal (except the quantizer's own keys). Both are
    ``gguf_index.GGUFIndex``es (or paths): the entries are compared as stored bytes, nothing decoded."""
    src_index = read_index(src_index) if isinstance(src_index, (str, os.PathLike)) else src_index
    out_index = read_index(out_index) if isinstance(out_index, (str, os.PathLike)) else out_index
    for key, f in src_index.fields.items():
        if key in _SAME_META_EXCEPT or key.startswith("quantize.imatrix."):
            continue
        if out_index.raw(key) != f.raw:
            raise EdgeMoteError(f"llama-quantize changed metadata key {key}: refusing to write the output")


def output_types(path_or_index) -> dict[str, int]:
    index = read_index(path_or_index) if isinstance(path_or_index, (str, os.PathLike)) else path_or_index
    out: dict[str, int] = {}
    for t in index.tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return dict(sorted(out.items()))


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from .gguf_copy import progress_bar

    return progress_bar(total, desc, enabled)


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, recipe: str = "uniform",
                   imatrix: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
                   raw: bool = False, prior_tokens: int = 32, n_threads: int | None = None,
                   progress: bool = False) -> QuantizeResult:
    """Quantize ``src`` (F32/F16/BF16 GGUF) to ``dst`` with llama.cpp's quantizer (module doc)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_output(dst, inputs=[src])
    qtype = normalise_type(qtype)
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}': use {' or '.join(RECIPES)}")
    if imatrix is not None and calib is not None:
        raise UserError("give --imatrix or --calib, not both")
    if imatrix is not None and not Path(imatrix).is_file():
        raise UserError(f"importance matrix not found: {imatrix}")
    reader = read_index(src)   # the header once: tensor infos, the few keys needed, metadata bytes to compare
    check_not_quantized(reader, src)
    overrides: dict[str, str] = {}
    if recipe == "moe":
        from .prune import moe_shape

        shape = moe_shape(reader)
        if not shape.moe_layers:
            raise UserError(f"recipe moe is for Mixture-of-Experts models; {src.name} has no routed experts",
                            hint="use --recipe uniform")
        overrides = moe_recipe([t.name for t in reader.tensors], shape.moe_layers, qtype)
    tensor_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    with tempfile.TemporaryDirectory(prefix=".edge-mote-quantize-", dir=dst.parent) as d:
        type_file = None
        if overrides:
            type_file = Path(d) / "tensor-types.txt"
            type_file.write_text("".join(f"^{re.escape(n)}$={t}\n" for n, t in overrides.items()))
        im_info = None
        im_path = Path(imatrix) if imatrix is not None else None
        if im_path is not None:
            im_info = ImatrixInfo(str(im_path), computed=False)
        if calib is not None:
            im_path = Path(d) / "imatrix.gguf"
            im_info = compute_imatrix(src, calib, im_path, raw=raw, n_threads=n_threads, prior_tokens=prior_tokens)
        bar = _progress_bar(sum(tensor_bytes.values()), f"quantizing {qtype}", progress)
        try:
            with atomic_output(dst, inputs=[src]) as tmp:
                tq = time.perf_counter()
                run_llama_quantize(src, tmp, qtype, type_file=type_file, imatrix=im_path, n_threads=n_threads,
                                   bar=bar, tensor_bytes=tensor_bytes)
                quantize_seconds = time.perf_counter() - tq
                out_index = read_index(tmp)
                check_metadata_kept(reader, out_index)
                types = output_types(out_index)
        finally:
            if bar is not None:
                bar.close()
    if im_info is not None and calib is not None:
        im_info.path = "(computed from " + str(calib) + ")"
    return QuantizeResult(str(src), str(dst), qtype, recipe, src.stat().st_size, dst.stat().st_size, len(overrides),
                          im_info, types, time.perf_counter() - t0, quantize_seconds)
