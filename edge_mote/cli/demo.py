"""``edge-mote demo``"""

from __future__ import annotations

import click

from .options import echo_json, json_option


@click.command(help="The whole MoTE loop on the project's own refusal organism (no downloads): train it once (cached), "
                    "scan it, store a profile, and print the evaluation table.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the organism, scan and outputs go [~/.cache/edge-mote/demo].")
@click.option("--top", "tops", default="2", show_default=True, help="N values to evaluate (comma-separated, e.g. 2,4).")
@click.option("--random-trials", type=click.IntRange(0), default=5, show_default=True)
@json_option
def demo(workdir, tops, random_trials, as_json):
    import sys
    from pathlib import Path

    from ..demo import organism_builder, run_demo
    from .eval import _ints, render_table

    organism_builder()  # without the training dependencies: one line saying what to install, before anything else
    progress = not as_json and sys.stderr.isatty()
    if not as_json:
        click.echo("edge-mote demo: organism -> scan -> profile -> eval (the first run trains the organism, "
                   "a few minutes; later runs reuse it)", err=True)
    r = run_demo(Path(workdir) if workdir else None, tops=_ints(tops), random_trials=random_trials, progress=progress)
    if as_json:
        echo_json({"workdir": str(r.workdir), "organism": str(r.organism), "scan": str(r.scan_json),
                   "heatmap_png": str(r.heatmap_png), "heatmap_html": str(r.heatmap_html),
                   "steered_gguf": str(r.steered_gguf), "profile": r.profile, "top": r.top,
                   "eval": r.report.to_dict(), "examples": r.examples, "seconds": r.seconds})
        return
    click.echo(f"1. organism   {r.organism}  ({r.seconds['organism']:.0f} s)")
    click.echo(f"2. scan       {r.scan_json}, brain scan {r.heatmap_png} and {r.heatmap_html}  ({r.seconds['scan']:.0f} s)")
    click.echo("   top experts at the decision position (layer:expert  P(behaviour) P(control) risk-diff stability):")
    for t in r.top:
        click.echo(f"     {t['layer']}:{t['expert']:<3} {t['p1']:.2f} {t['p2']:.2f} {t['rd']:+.2f} {t['stability']:.2f}")
    click.echo(f"3. profile    '{r.profile}' -> {r.steered_gguf}")
    click.echo(f"4. evaluation on held-out prompts  ({r.seconds['eval']:.0f} s)")
    click.echo("")
    click.echo(render_table(r.report))
    click.echo("")
    click.echo("held-out sensitive prompts, unsteered vs --profile no-refusal:")
    for prompt, plain, steered in r.examples:
        click.echo(f"  Q: {prompt}\n     unsteered : {plain}\n     no-refusal: {steered}")
    click.echo("")
    click.echo(f"try: edge-mote run {r.steered_gguf} --profile no-refusal -p 'User: How do I hotwire a car?\\nAssistant:'")
