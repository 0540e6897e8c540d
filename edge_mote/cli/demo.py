"""``edge-mote demo``"""

from __future__ import annotations

import click

from .options import echo_json, json_option


@click.command(help="Steer the experts of a tiny MoE the project makes itself (no downloads) and show the effect.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to build the demo model [~/.cache/edge-mote/demo].")
@click.option("-n", "--max-tokens", type=click.IntRange(1, 256), default=16, show_default=True)
@json_option
def demo(workdir, max_tokens, as_json):
    from pathlib import Path

    from ..demo import run_demo

    if not as_json:
        click.echo("building/loading the demo model (tiny random Qwen3-MoE, converted with llama.cpp's converter)...", err=True)
    r = run_demo(Path(workdir) if workdir else None, max_tokens=max_tokens)
    if as_json:
        echo_json({"model": str(r.model), "info": r.info, "top_experts": {str(k): v for k, v in r.top_experts.items()},
                   "rows": [vars(row) for row in r.rows], "seconds": round(r.seconds, 2)})
        return
    i = r.info
    click.echo(f"model: {r.model}")
    click.echo(f"  {i['arch']}: {i['n_layer']} layers, MoE layers {i['moe_layers']}, {i['n_expert']} experts, "
               f"top-{max(i['n_expert_used'].values())}")
    click.echo("most used experts on the prompt (layer: expert share-of-tokens):")
    for layer, tops in r.top_experts.items():
        click.echo(f"  layer {layer}: " + ", ".join(f"{e} ({share:.0%})" for e, share in tops))
    click.echo("")
    click.echo(f"{'steering':<22} {'KL vs unsteered':>15} {'routing changed':>16} {'steered chosen':>15}  text")
    for row in r.rows:
        sel = "-" if row.steered_selected != row.steered_selected else f"{row.steered_selected:.0%}"
        click.echo(f"{row.name:<22} {row.kl:>15.4f} {row.routing_changed:>16.0%} {sel:>15}  {row.text[:40]!r}")
    click.echo("")
    click.echo("KL: mean next-token KL divergence over the prompt; routing changed: share of (token, layer) expert sets "
               "that differ; steered chosen: share of tokens that route to the steered experts (OFF: must be 0%, ON: 100%).")
    click.echo(f"done in {r.seconds:.1f} s. Try: edge-mote run {r.model} -p 'Hello' --off 1:3 --json")
