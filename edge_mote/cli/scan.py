"""``edge-mote scan MODEL --behavior B --control C -o scan.json`` (the fTRI "brain scan")."""

from __future__ import annotations

import click

from .options import echo_json, json_option, load_kwargs, load_options, model_argument

_WINDOWS = ("prompt", "decision", "response", "all")  # edge_mote.ftri.scan.WINDOWS (not imported: --help stays fast)


@click.command(help="Find the experts that carry a behaviour: route a behaviour and a control prompt set, rank "
                    "experts by risk difference (p1 - p2; ties: z, then gate-weight contrast dw) and write "
                    "scan.json. Prompt files: .jsonl "
                    '({"prompt": ...} or {"messages": [...]}), .json (templates + slots) or .txt (one per line).')
@model_argument
@click.option("-b", "--behavior", required=True, metavar="FILE", help="Prompts that show the behaviour.")
@click.option("-c", "--control", required=True, metavar="FILE", help="Prompts that do not.")
@click.option("-o", "--output", "out", required=True, metavar="SCAN.json", help="Where to write the scan.")
@click.option("--tokens", type=click.Choice(_WINDOWS), default="decision", show_default=True,
              help="Window: all prompt tokens, the decision position (last prompt token), the greedy response "
                   "(from the decision position on), or prompt + response.")
@click.option("--max-new", type=click.IntRange(1), default=16, show_default=True,
              help="Response tokens to generate (response/all windows).")
@click.option("--heatmap", default=None, metavar="PNG", help="Also write a layers x experts heatmap (PNG).")
@click.option("--html", default=None, metavar="HTML", help="Also write a self-contained HTML heatmap (hover a cell).")
@click.option("--raw", is_flag=True, help="Use the prompts as raw text (no chat template).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Experts to show.")
@click.option("--causal", type=click.IntRange(0), default=0, show_default=True, metavar="K",
              help="Causal check: re-rank the top K candidates by rd x the measured effect of switching each one "
                   "OFF on the decision (KL at the decision position, behaviour minus control prompts).")
@json_option
@load_options
def scan(model, behavior, control, out, tokens, max_new, heatmap, html, raw, top, causal, as_json, n_ctx, n_threads,
         n_gpu_layers, rpc):
    from ..cluster import call
    from ..ftri.scan import scan_and_write

    result = call(scan_and_write, model, behavior, control, out, tokens=tokens, max_new=max_new, raw=raw, heatmap=heatmap,
                            html=html, top=top, progress=not as_json, causal=causal,
                            **load_kwargs(n_ctx, n_threads, n_gpu_layers, rpc))
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    rows = result.top(top)
    stab = result.stability
    if as_json:
        echo_json({
            "scan": str(out), "heatmap": heatmap, "html": html, "window": result.window,
            "sets": {"behavior": vars(result.behavior), "control": vars(result.control)},
            "stability": {"n_boot": stab.n_boot, "jaccard_mean": {str(n): round(v, 4) for n, v in stab.jaccard_mean.items()}},
            "top": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "seconds": round(result.seconds, 3),
        })
        return
    b, c = result.behavior, result.control
    click.echo(f"scanned {b.n_prompts} behaviour + {c.n_prompts} control prompts, window '{result.window}' "
               f"({b.n_window_tokens} + {c.n_window_tokens} tokens) in {result.seconds:.1f}s", err=True)
    click.echo(f"{'rank':>4}  {'expert':<9} {'p1':>6} {'p2':>6} {'rd':>7} {'z':>7} {'dw':>7} {'stab':>5}")
    for r in rows:
        click.echo(f"{r['rank']:>4}  {str(r['layer']) + ':' + str(r['expert']):<9} {r['p1']:>6.3f} {r['p2']:>6.3f} "
                   f"{r['rd']:>+7.3f} {r['z']:>7.2f} {r['dw']:>+7.3f} {r['stability']:>5.2f}"
                   + (f"  causal score {r['score']:+.3f}" if "score" in r else ""))
    jac = ", ".join(f"top-{n} {v:.2f}" for n, v in stab.jaccard_mean.items())
    click.echo(f"stability: mean Jaccard vs full ranking over {stab.n_boot} bootstrap resamples: {jac}; "
               f"stab = share of resamples with the expert in the top-{stab.freq_top}", err=True)
    written = ", ".join(str(p) for p in (out, heatmap, html) if p)
    click.echo(f"wrote {written}", err=True)
