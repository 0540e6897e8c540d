"""``edge-mote info MODEL``"""

from __future__ import annotations

import click

from .options import echo_json, json_option, load_options, load_kwargs, model_argument


@click.command(help="Show a model's architecture, MoE layers, experts and stored steering profiles.")
@model_argument
@json_option
@load_options
def info(model, as_json, n_ctx, n_threads, n_gpu_layers, rpc):
    from ..api import describe_model
    from ..cluster import call

    mi = call(describe_model, model, **load_kwargs(min(n_ctx, 256), n_threads, n_gpu_layers, rpc))
    if as_json:
        echo_json(mi.to_dict())
        return
    from ..steering import format_ranges

    click.echo(f"model        {mi.path}")
    click.echo(f"architecture {mi.arch}" + (f" ({mi.name})" if mi.name else ""))
    click.echo(f"layers       {mi.n_layer}")
    if mi.is_moe:
        ks = sorted(set(mi.n_expert_used.values()))
        click.echo(f"MoE layers   {format_ranges(list(mi.moe_layers))} ({len(mi.moe_layers)})")
        click.echo(f"experts      {mi.n_expert} routed per layer, top-{'/'.join(map(str, ks))} per token "
                   f"({mi.n_expert * len(mi.moe_layers)} routed experts in all)")
    else:
        click.echo("experts      none: not a Mixture-of-Experts model")
    click.echo(f"vocabulary   {mi.n_vocab}")
    click.echo(f"size         {mi.file_bytes / 2**20:.1f} MiB")
    if mi.profiles:
        for p in mi.profiles:
            click.echo(f"profile      {p}" + ("  (default)" if p == mi.default_profile else ""))
    else:
        click.echo("profiles     none")
