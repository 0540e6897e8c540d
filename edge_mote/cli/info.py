"""``edge-mote info MODEL``"""

from __future__ import annotations

import click

from .options import echo_json, json_option, load_options, load_kwargs, model_argument


@click.command(help="Show a model's architecture, MoE layers, experts and stored steering profiles. --tensors: "
                    "its quantization mix (bytes per type, tensor family, layer), expert tensors, router precision "
                    "(read from the file, no model load).")
@model_argument
@click.option("--tensors", is_flag=True, help="Show what the file is made of, tensor by tensor family.")
@json_option
@load_options
def info(model, tensors, as_json, n_ctx, n_threads, n_gpu_layers, rpc):
    if tensors:
        return _tensors(model, as_json)
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


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB"


def _tensors(model, as_json):
    from ..ship.inspect import inspect_tensors
    from ..steering import format_ranges

    r = inspect_tensors(model)
    if as_json:
        echo_json(r.to_dict())
        return
    t = r.total
    click.echo(f"model        {r.path}")
    click.echo(f"architecture {r.arch}")
    click.echo(f"size         {r.file_bytes / 2**20:.2f} MiB, {t.tensors} tensors, {t.params:,} parameters, "
               f"{t.bits_per_weight:.2f} bits/weight")
    click.echo("\nby type")
    for name, b in r.by_type.items():
        click.echo(f"  {name:<8} {b.tensors:>5} tensors {_mib(b.bytes)} {b.bytes / t.bytes:7.1%}  "
                   f"{b.bits_per_weight:5.2f} bpw")
    click.echo("\nby tensor family")
    for name, b in r.by_family.items():
        types = ", ".join(f"{k} {v / b.bytes:.0%}" if len(b.types) > 1 else k for k, v in b.types.items())
        click.echo(f"  {name:<22} {b.tensors:>4} {_mib(b.bytes)} {b.bytes / t.bytes:7.1%}  {types}")
    click.echo("\nby layer")
    for layer, b in r.by_layer.items():
        types = ", ".join(f"{k} {v / b.bytes:.0%}" for k, v in sorted(b.types.items(), key=lambda kv: -kv[1]))
        click.echo(f"  blk.{layer:<4} {_mib(b.bytes)}  {b.bits_per_weight:5.2f} bpw  {types}")
    if r.n_expert:
        e = r.experts
        click.echo(f"\nexperts      {r.n_expert} routed per layer, top-{r.n_expert_used}, MoE layers "
                   f"{format_ranges(list(r.moe_layers))}: {_mib(e.bytes).strip()} ({e.bytes / t.bytes:.1%} of the "
                   f"tensor bytes), {e.bits_per_weight:.2f} bits/weight")
        for fam, d in r.expert_tensors.items():
            types = ", ".join(f"{k} x{v}" for k, v in d["types"].items())
            click.echo(f"  {fam:<22} {types:<24} {d['bytes_per_expert'] / 1024:10.1f} KiB per expert per layer")
        router = "; ".join(f"{k} (layers {format_ranges(sorted(v))})" for k, v in r.router_types.items())
        click.echo(f"router       {router}")
    else:
        click.echo("\nexperts      none: not a Mixture-of-Experts model")
    if r.profiles:
        for n, st in r.profiles.items():
            click.echo(f"profile      {n}{'  (default)' if n == r.default_profile else ''}: {st}")
    else:
        click.echo("profiles     none")
