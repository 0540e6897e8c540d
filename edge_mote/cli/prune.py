"""``edge-mote prune IN.gguf OUT.gguf (--drop L:E,... | --keep-ratio R --calib P [--protect-profile NAME])``"""

from __future__ import annotations

import click

from .options import echo_json, json_option


@click.command(help="Physically remove routed experts (bit-exact slicing, also of quantized tensors; router rows, "
                    "expert biases and expert_count follow; stored profiles are renumbered). The same number of "
                    "experts goes from every MoE layer. Invalid requests are refused before anything is written.")
@click.argument("model", metavar="IN.gguf")
@click.argument("output", metavar="OUT.gguf")
@click.option("--drop", multiple=True, metavar="L:E,...", help="Experts to remove (as many from each MoE layer).")
@click.option("--keep-ratio", type=float, default=None, metavar="R",
              help="Keep this share of each layer's experts, the most salient on --calib.")
@click.option("--calib", default=None, type=click.Path(dir_okay=False, exists=True), metavar="PROMPTS",
              help="Prompts the saliency is measured on (with --keep-ratio).")
@click.option("--saliency", type=click.Choice(["reap", "frequency", "random"]), default="reap",
              show_default=True, help="reap: mean gate weight x expert output norm over the tokens routed to the "
                                      "expert (REAP; kept quality best on the organism, BENCHMARKS.md); frequency: "
                                      "routing frequency x gate weight; random: a baseline.")
@click.option("--protect-profile", "protect", multiple=True, metavar="NAME",
              help="Never remove the experts this stored profile steers.")
@click.option("--raw", is_flag=True, help="Calibration prompts as raw text (no chat template).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --saliency random.")
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help="Threads (saliency).")
@json_option
def prune(model, output, drop, keep_ratio, calib, saliency, protect, raw, seed, n_threads, as_json):
    from ..ship.prune import prune_model
    from ..steering import Steering

    experts = None
    if drop:
        experts = sorted(Steering.parse(";".join(f"off={d}" for d in drop)).off)
    r = prune_model(model, output, drop=experts, keep_ratio=keep_ratio, calib=calib, protect=protect,
                    saliency=saliency, raw=raw, seed=seed, n_threads=n_threads, progress=not as_json)
    if as_json:
        echo_json(r.to_dict())
        return
    n_drop = r.n_expert_before - r.n_expert_after
    click.echo(f"wrote {r.output}: {r.n_expert_before} -> {r.n_expert_after} experts per MoE layer "
               f"({n_drop} removed from each of {len(r.dropped)} layers"
               + (f", by {r.saliency} saliency" if r.saliency else "") + ")")
    click.echo(f"size {r.bytes_before / 2**20:.1f} -> {r.bytes_after / 2**20:.1f} MiB "
               f"({1 - r.bytes_after / r.bytes_before:.1%} smaller); expert tensors "
               f"{r.expert_bytes_before / 2**20:.1f} -> {r.expert_bytes_after / 2**20:.1f} MiB")
    for l, es in r.dropped.items():
        click.echo(f"  layer {l}: removed {','.join(map(str, es))}")
    if r.profiles:
        click.echo("profiles kept (renumbered): " + ", ".join(r.profiles))
