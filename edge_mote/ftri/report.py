"""scan.json, and heatmaps of a scan (PNG with matplotlib, self-contained HTML).

scan.json, schema ``edge-mote.scan/1`` (a JSON object; numbers are plain JSON numbers, never NaN/Infinity)::

    schema        "edge-mote.scan/1"
    created       UTC time, ISO 8601 ("2026-11-23T10:00:00Z")
    generator     {"name": "edge-mote", "version": "0.1.0"}
    model         path (as given), file_bytes, sha256 (hex), sha256_scope, arch, name, n_layer, moe_layers [ints],
                  n_expert (routed experts per MoE layer), n_expert_used {"<layer>": k}, top_k (k if every MoE
                  layer has the same, else null), steering (the steering in effect during the scan, "" = none)
                  sha256_scope is "full" (sha256 of the whole file; always so for files up to 32 MiB) or
                  "head-tail-16MiB" (fast: sha256 of the first 16 MiB, then the last 16 MiB, then the file size
                  as ASCII decimal)
    window        tokens ("prompt" | "decision" | "response" | "all"), max_new (null for prompt/decision),
                  raw (bool: no chat template asked for), chat_template (bool: the template was applied),
                  unit ("token": a/d count window tokens, as SteerMoE)
    sets          behavior / control: path, n_prompts, n_prompt_tokens, n_window_tokens
    experts       every (layer, expert), layer-major: layer, expert, a1, n1, a2, n2, p1, p2, rd, z, p_value,
                  log_odds, ci_low, ci_high, w1, w2, dw (see edge_mote.ftri.stats: rd = p1 - p2, pooled
                  two-proportion z with a two-sided p-value, log odds ratio with the 0.5 continuity correction and
                  its Wald 95% CI; w1 / w2 = the expert's mean gate weight per behaviour / control window token,
                  0 where not selected; dw = w1 - w2)
    ranking       order ("rd desc, z desc, dw desc, layer asc, expert asc"), n_total (all experts), entries: the
                  best max(100, --top) experts (all if fewer), best first: rank (1-based), layer, expert, p1, p2,
                  rd, z, dw, stability (fraction of bootstrap resamples with the expert in their top-10);
                  with the causal check (``--causal K``): its top-K candidates come first, ordered by score (rd x
                  effect), their entries carry ``effect`` and ``score``, the order string says so, and ``causal``
                  holds k, n_behavior, n_control, measure and per candidate layer, expert, score, effect,
                  kl_behavior, kl_control
    stability     n_boot, seed, unit ("prompt": prompts are resampled), top_n [N...], jaccard_mean {"N": mean
                  Jaccard overlap of the bootstrap top-N with the full-data top-N}, jaccard_std {"N": ...},
                  freq_top (10), top_frequency [{layer, expert, frequency}] for experts that reached a bootstrap
                  top-10, most often first
    prompts       per prompt: set ("behavior" | "control"), id, source ("file:line"), n_prompt_tokens,
                  n_window_tokens, and for response/all windows response (the greedy text) and n_response_tokens
    warnings      [strings] (e.g. no chat template in the GGUF)
    timing        seconds, tokens_evaluated

Fields are only ever added within ``edge-mote.scan/1``: w1, w2, dw (and dw in the ranking entries) came later,
and files without them still load (their ranking was "rd desc, z desc, layer asc, expert asc"). Readers take the
ranking from the order of ``ranking.entries``, never re-sort it.

Every writer writes through ``edge_mote.fileio.atomic_output`` (a temporary file in the same directory, fsync'd,
then renamed; an ``OSError`` is a one-line ``UserError`` and leaves no partial file) and refuses to write over one
of the scan's inputs. :func:`load_scan` checks the schema and raises ``UserError`` on a bad file.
"""

from __future__ import annotations

import hashlib
import html as _html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..fileio import atomic_output, same_file, umask_mode

__all__ = ["SCHEMA", "EXPERT_FIELDS", "OPTIONAL_EXPERT_FIELDS", "RANKING_ORDER", "file_identity", "scan_document",
           "write_scan", "load_scan", "rd_grid", "heatmap_png", "heatmap_html"]

SCHEMA = "edge-mote.scan/1"
EXPERT_FIELDS = ("layer", "expert", "a1", "n1", "a2", "n2", "p1", "p2", "rd", "z", "p_value", "log_odds",
                 "ci_low", "ci_high")
OPTIONAL_EXPERT_FIELDS = ("w1", "w2", "dw")  # added within edge-mote.scan/1; checked when present
RANKING_ORDER = "rd desc, z desc, dw desc, layer asc, expert asc"
_CHUNK = 16 * 2**20
_N_MARK = 10


def file_identity(path: str | os.PathLike, full: bool = False) -> dict[str, Any]:
    """``{"file_bytes", "sha256", "sha256_scope"}`` of a file (fast head+tail hash unless ``full``)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if full or size <= 2 * _CHUNK:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            scope = "full"
        else:
            h.update(fh.read(_CHUNK))
            fh.seek(size - _CHUNK)
            h.update(fh.read(_CHUNK))
            h.update(str(size).encode("ascii"))
            scope = "head-tail-16MiB"
    return {"file_bytes": size, "sha256": h.hexdigest(), "sha256_scope": scope}


def _r(x: float) -> float:
    """A finite float rounded for the file (9 significant digits)."""
    x = float(x)
    if not np.isfinite(x):
        raise ValueError(f"non-finite statistic {x}")
    return float(f"{x:.9g}")


def scan_document(result: Any, *, top: int = 100, full_hash: bool = False) -> dict[str, Any]:
    """The scan.json document of a ``ScanResult``."""
    from .. import __version__

    info, st = result.info, result.stats
    ks = sorted(set(info.n_expert_used.values()))
    experts = []
    for li in range(len(st.layers)):
        for e in range(st.n_expert):
            rec = st.record(li, e)
            experts.append({k: (_r(v) if isinstance(v, float) else v) for k, v in rec.items()})
    entries = [{"rank": r["rank"], "layer": r["layer"], "expert": r["expert"], "p1": _r(r["p1"]), "p2": _r(r["p2"]),
                "rd": _r(r["rd"]), "z": _r(r["z"]), "dw": _r(r["dw"]), "stability": _r(r["stability"]),
                **({"effect": _r(r["effect"]), "score": _r(r["score"])} if "effect" in r else {})}
               for r in result.top(max(100, int(top)))]
    causal = getattr(result, "causal", None)
    order = RANKING_ORDER if causal is None else (
        f"causal score (rd x effect) desc for the top {len(causal.candidates)} by {RANKING_ORDER} "
        f"(edge_mote.ftri.causal), "
        f"then {RANKING_ORDER}")
    prompts = []
    for pr in result.prompts:
        d = {"set": pr.set, "id": pr.id, "source": pr.source, "n_prompt_tokens": pr.n_prompt_tokens,
             "n_window_tokens": pr.n_window_tokens}
        if pr.response is not None:
            d["response"] = pr.response
            d["n_response_tokens"] = pr.n_response_tokens
        prompts.append(d)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": {"name": "edge-mote", "version": __version__},
        "model": {
            "path": info.path, **file_identity(info.path, full=full_hash), "arch": info.arch, "name": info.name,
            "n_layer": info.n_layer, "moe_layers": list(info.moe_layers), "n_expert": info.n_expert,
            "n_expert_used": {str(k): v for k, v in info.n_expert_used.items()},
            "top_k": ks[0] if len(ks) == 1 else None, "steering": result.steering,
        },
        "window": {"tokens": result.window, "max_new": result.max_new if result.window in ("response", "all") else None,
                   "raw": result.raw, "chat_template": result.templated, "unit": "token"},
        "sets": {name: {"path": s.path, "n_prompts": s.n_prompts, "n_prompt_tokens": s.n_prompt_tokens,
                        "n_window_tokens": s.n_window_tokens}
                 for name, s in (("behavior", result.behavior), ("control", result.control))},
        "experts": experts,
        "ranking": {"order": order, "n_total": len(experts), "entries": entries,
                    **({"causal": causal.to_dict()} if causal is not None else {})},
        "stability": result.stability.to_dict(result.layers),
        "prompts": prompts,
        "warnings": list(result.warnings),
        "timing": {"seconds": round(result.seconds, 3), "tokens_evaluated": result.tokens_evaluated},
    }


def _atomic_write(path: str | os.PathLike, data: bytes, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``data`` through ``fileio.atomic_output`` (never over an input; mode: the umask's default, as for any
    new file -- a report is not a copy of its inputs)."""
    for i in inputs:
        if i is not None and same_file(path, i):
            raise UserError(f"{path} is an input of the scan; refusing to overwrite it")
    with atomic_output(path, mode=umask_mode()) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _doc(scan: Any) -> dict[str, Any]:
    return scan if isinstance(scan, dict) else scan_document(scan)


def write_scan(scan: Any, path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write scan.json (from a ``ScanResult`` or a document) atomically; never over one of ``inputs``."""
    doc = _doc(scan)
    model_path = doc.get("model", {}).get("path")
    sets = doc.get("sets", {})
    all_inputs = [*inputs, *(x for x in [model_path, *(s.get("path") for s in sets.values())] if x)]
    data = json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False).encode("utf-8") + b"\n"
    return _atomic_write(path, data, all_inputs)


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str, name: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{name}: not a valid scan file: {where}{key} is missing")
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise UserError(f"{name}: not a valid scan file: {where}{key} has the wrong type")
    return v


def _finite(v, where: str, name: str):
    if not math.isfinite(v):
        raise UserError(f"{name}: not a valid scan file: {where} is {v}")
    return v


def load_scan(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a scan.json; a missing, malformed or foreign file raises ``UserError``."""
    p = Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"scan file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read scan file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{name}: not a scan file (JSON nested too deeply)") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise UserError(f"{name}: not an edge-mote scan file (no \"schema\")", hint="make one with edge-mote scan")
    if doc["schema"] != SCHEMA:
        raise UserError(f"{name}: unsupported scan schema {doc['schema']!r} (this edge-mote reads {SCHEMA})")
    model = _need(doc, "model", dict, "", name)
    layers = _need(model, "moe_layers", list, "model.", name)
    n_expert = _need(model, "n_expert", int, "model.", name)
    n_layer = _need(model, "n_layer", int, "model.", name)
    used = _need(model, "n_expert_used", dict, "model.", name)

    def bad(what: str) -> UserError:
        return UserError(f"{name}: not a valid scan file: {what}")

    if not 1 <= n_layer <= 1 << 16 or not 1 <= n_expert <= 1 << 16:
        raise bad(f"model.n_layer {n_layer} / model.n_expert {n_expert} out of range")
    if any(type(x) is not int or not 0 <= x < n_layer for x in layers) or len(set(layers)) != len(layers):
        raise bad("model.moe_layers must be distinct layer numbers below model.n_layer")
    for k, v in used.items():
        if not k.isdigit() or int(k) not in layers or type(v) is not int or not 1 <= v <= n_expert:
            raise bad(f"model.n_expert_used has a bad entry {k[:20]!r}")
    if "file_bytes" in model:
        _need(model, "file_bytes", int, "model.", name)
    window = _need(doc, "window", dict, "", name)
    tokens = _need(window, "tokens", str, "window.", name)
    if tokens not in ("prompt", "decision", "response", "all"):
        raise UserError(f"{name}: not a valid scan file: unknown window {tokens!r}")
    sets = _need(doc, "sets", dict, "", name)
    for s in ("behavior", "control"):
        _need(_need(sets, s, dict, "sets.", name), "n_prompts", int, f"sets.{s}.", name)
    experts = _need(doc, "experts", list, "", name)
    if len(experts) != len(layers) * n_expert:
        raise UserError(f"{name}: not a valid scan file: {len(experts)} experts for {len(layers)} layers × {n_expert}")
    for i, rec in enumerate(experts):
        for f in EXPERT_FIELDS:
            _finite(_need(rec, f, (int, float), f"experts[{i}].", name), f"experts[{i}].{f}", name)
        for f in OPTIONAL_EXPERT_FIELDS:
            if isinstance(rec, dict) and f in rec:
                _finite(_need(rec, f, (int, float), f"experts[{i}].", name), f"experts[{i}].{f}", name)
    ranking = _need(doc, "ranking", dict, "", name)
    known = set(layers)
    for what, recs in (("experts", experts), ("ranking.entries", _need(ranking, "entries", list, "ranking.", name))):
        for i, rec in enumerate(recs):
            for f in ("layer", "expert"):
                _need(rec, f, int, f"{what}[{i}].", name)
            _finite(_need(rec, "rd", (int, float), f"{what}[{i}].", name), f"{what}[{i}].rd", name)
            if rec["layer"] not in known or not 0 <= rec["expert"] < n_expert:
                raise UserError(f"{name}: not a valid scan file: {what}[{i}] names expert "
                                f"{rec['layer']}:{rec['expert']}, not one of the model's")
    _need(doc, "stability", dict, "", name)
    return doc


def rd_grid(doc: dict[str, Any]) -> tuple[list[int], int, np.ndarray]:
    """(MoE layer ids, n_expert, [n_layers, n_expert] risk differences) of a scan document."""
    layers = [int(x) for x in doc["model"]["moe_layers"]]
    n_expert = int(doc["model"]["n_expert"])
    row = {l: i for i, l in enumerate(layers)}
    grid = np.zeros((len(layers), n_expert))
    for rec in doc["experts"]:
        grid[row[int(rec["layer"])], int(rec["expert"])] = float(rec["rd"])
    return layers, n_expert, grid


def _title(doc: dict[str, Any]) -> str:
    m, s, w = doc["model"], doc["sets"], doc["window"]
    label = m.get("name") or Path(m["path"]).name
    return (f"{label} ({m['arch']}) — risk difference, {w['tokens']} window — "
            f"{Path(s['behavior']['path']).name} ({s['behavior']['n_prompts']}) vs "
            f"{Path(s['control']['path']).name} ({s['control']['n_prompts']})")


def _wrap_title(title: str, width_px: float, fontsize: float) -> str:
    """``title`` broken into lines that fit ``width_px`` (at ~0.6 em per character), first at " — "."""
    import textwrap

    chars = max(20, int(width_px * 0.9 / (fontsize * 100 / 72 * 0.6)))
    lines = []
    for part in title.split(" — "):
        lines += textwrap.wrap(part, chars, break_on_hyphens=False) or [""]
    return "\n".join(lines)


def heatmap_png(scan: Any, path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (),
                n_mark: int = _N_MARK) -> Path:
    """Layers × experts heatmap of the risk difference (diverging, centred on 0), the top ``n_mark`` marked."""
    import io

    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is needed for --heatmap", hint="pip install matplotlib, or use --html") from None
    doc = _doc(scan)
    layers, n_expert, grid = rd_grid(doc)
    lim = max(float(np.abs(grid).max()), 1e-9)
    width = min(40.0, max(6.0, 2.5 + 0.12 * n_expert))
    height = min(30.0, max(3.0, 1.8 + 0.28 * len(layers)))
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        row = {l: i for i, l in enumerate(layers)}
        marks = doc["ranking"]["entries"][:n_mark]
        if marks:
            xs = [m["expert"] for m in marks]
            ys = [row[m["layer"]] for m in marks]
            ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="black", linewidths=1.5)
            if n_expert <= 64 and len(layers) <= 48:
                for m in marks:
                    ax.annotate(str(m["rank"]), (m["expert"], row[m["layer"]]), xytext=(4, 4),
                                textcoords="offset points", fontsize=7)
        ystep = max(1, len(layers) // 30)
        ax.set_yticks(range(0, len(layers), ystep), [str(l) for l in layers[::ystep]])
        xstep = max(1, n_expert // 32)
        ax.set_xticks(range(0, n_expert, xstep))
        ax.set_xlabel("expert" + (f"   (circled: the top {len(marks)}, by rank)" if marks else ""))
        ax.set_ylabel("layer")
        # the title is long (model, window, both prompt sets): wrapped to the figure's width, and the saved
        # image grown to whatever the text needs, so that it is never clipped
        ax.set_title(_wrap_title(_title(doc), width * fig.dpi, fontsize=9), fontsize=9)
        fig.colorbar(im, ax=ax, label="risk difference p1 − p2", fraction=0.04, pad=0.02)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)
    return _atomic_write(path, buf.getvalue(), [*inputs, doc["model"]["path"]])


def _colour(v: float, lim: float) -> str:
    """Diverging blue (negative) – white (0) – red (positive)."""
    t = max(-1.0, min(1.0, v / lim)) if lim > 0 else 0.0
    neg, pos = (33, 102, 172), (178, 24, 43)
    end = pos if t >= 0 else neg
    a = abs(t)
    rgb = [round(255 + (c - 255) * a) for c in end]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def heatmap_html(scan: Any, path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (),
                 n_mark: int = _N_MARK) -> Path:
    """A self-contained HTML page (inline SVG, no scripts or external resources): one cell per (layer, expert)
    coloured by risk difference with a hover title (layer, expert, p1, p2, rd, z), the top ``n_mark`` outlined,
    and a table of the ranking."""
    doc = _doc(scan)
    layers, n_expert, grid = rd_grid(doc)
    lim = max(float(np.abs(grid).max()), 1e-9)
    rank = {(m["layer"], m["expert"]): m["rank"] for m in doc["ranking"]["entries"][:n_mark]}
    cw = max(4, min(20, 1400 // max(1, n_expert)))
    ch = max(6, min(20, 800 // max(1, len(layers))))
    left, top = 44, 24
    w, h = left + cw * n_expert + 10, top + ch * len(layers) + 30
    e = _html.escape
    cells, marks = [], []
    for rec in doc["experts"]:
        li, x = layers.index(int(rec["layer"])), int(rec["expert"])
        px, py = left + x * cw, top + li * ch
        key = (int(rec["layer"]), x)
        tip = (f"layer {key[0]}, expert {x}" + (f" (rank {rank[key]})" if key in rank else "")
               + f"\np1 = {rec['p1']:.4f}  p2 = {rec['p2']:.4f}\nrd = {rec['rd']:+.4f}  z = {rec['z']:.2f}")
        cells.append(f'<rect x="{px}" y="{py}" width="{cw}" height="{ch}" fill="{_colour(rec["rd"], lim)}">'
                     f"<title>{e(tip)}</title></rect>")
        if key in rank:
            marks.append(f'<rect x="{px + 0.75}" y="{py + 0.75}" width="{cw - 1.5}" height="{ch - 1.5}" fill="none" '
                         f'stroke="#000" stroke-width="1.5" pointer-events="none"/>')
    ystep = max(1, len(layers) // 40)
    labels = [f'<text x="{left - 4}" y="{top + i * ch + ch / 2 + 4}" text-anchor="end">{l}</text>'
              for i, l in enumerate(layers) if i % ystep == 0]
    xstep = max(1, n_expert // 32)
    labels += [f'<text x="{left + x * cw + cw / 2}" y="{top - 6}" text-anchor="middle">{x}</text>'
               for x in range(0, n_expert, xstep)]
    labels.append(f'<text x="{left}" y="{h - 8}">expert →   layer ↓   (hover a cell for its numbers)</text>')
    legend = "".join(f'<rect x="{i * 3}" y="0" width="3" height="12" fill="{_colour((i - 50) / 50 * lim, lim)}"/>'
                     for i in range(101))
    rows = "".join(
        f"<tr><td>{m['rank']}</td><td>{m['layer']}:{m['expert']}</td><td>{m['p1']:.4f}</td><td>{m['p2']:.4f}</td>"
        f"<td>{m['rd']:+.4f}</td><td>{m['z']:.2f}</td><td>{m.get('stability', 0):.2f}</td></tr>"
        for m in doc["ranking"]["entries"][:30])
    stab = doc.get("stability", {})
    jac = ", ".join(f"top-{n}: {v:.2f}" for n, v in stab.get("jaccard_mean", {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(_title(doc))}</title>
<style>body{{font:14px system-ui,sans-serif;margin:16px;color:#222}} svg text{{font:10px monospace;fill:#333}}
table{{border-collapse:collapse;margin-top:12px}} td,th{{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}}
.muted{{color:#666}}</style></head><body>
<h2>{e(_title(doc))}</h2>
<p class="muted">model {e(doc['model']['path'])} · sha256 {e(doc['model']['sha256'][:16])}… ({e(doc['model']['sha256_scope'])})
· window <b>{e(doc['window']['tokens'])}</b> · {doc['sets']['behavior']['n_window_tokens']} behaviour and
{doc['sets']['control']['n_window_tokens']} control window tokens · created {e(doc['created'])}</p>
<p>rd = p1 − p2 <svg width="303" height="12" style="vertical-align:middle">{legend}</svg>
&nbsp;−{lim:.3f} … 0 … +{lim:.3f}; outlined: the top {len(rank)}.</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">
{''.join(cells)}{''.join(marks)}{''.join(labels)}
</svg>
<p>Ranking stability (bootstrap over prompts, {stab.get('n_boot', '?')} resamples, mean Jaccard with the full
ranking): {e(jac)}. "stability" = fraction of resamples with the expert in their top-{stab.get('freq_top', 10)}.</p>
<table><tr><th>rank</th><th>layer:expert</th><th>p1</th><th>p2</th><th>rd</th><th>z</th><th>stability</th></tr>
{rows}</table>
</body></html>
"""
    return _atomic_write(path, page.encode("utf-8"), [*inputs, doc["model"]["path"]])
