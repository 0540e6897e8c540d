"""``edge-mote cluster plan MODEL --rpc HOST:PORT,...``: measure the home cluster, choose the layer split."""

from __future__ import annotations

import click

from .options import echo_json, json_option, model_argument


@click.group("cluster", help="Home cluster over RPC workers (`edge-mote worker` on each machine).")
def cluster():
    pass


@cluster.command("plan", help="Measure every node (free memory, a short compute benchmark on the node) and link (RTT, "
                              "bandwidth), then choose the layer split and the node holding the output layer that "
                              "minimise the predicted ms/token. Use it with `run --rpc ... --plan auto` (measures "
                              "again) or save it with -o and pass `--plan PLAN.json`.")
@model_argument
@click.option("--rpc", "rpc", required=True, metavar="HOST:PORT,...", help="The workers (idle: one client at a time).")
@click.option("--ctx", "n_ctx", type=click.IntRange(16), default=2048, show_default=True,
              help="Context size (the KV cache counts against each node's memory).")
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None,
              help="CPU threads this machine will use for its own layers.")
@click.option("--no-local", is_flag=True, help="Keep no layers on this machine (only the embeddings).")
@click.option("-o", "--output", "out", default=None, metavar="PLAN.json", help="Write the plan as JSON.")
@json_option
def plan(model, rpc, n_ctx, n_threads, no_local, out, as_json):
    import json

    from ..cluster.plan import plan_cluster, render
    from ..fileio import atomic_output, check_output

    if out:
        check_output(out)
    endpoints = [s for s in rpc.split(",") if s.strip()]
    best, even = plan_cluster(model, endpoints, n_ctx=n_ctx, n_threads=n_threads, use_local=not no_local)
    if out:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(best.to_dict(), indent=2) + "\n")
    if as_json:
        echo_json({"plan": best.to_dict(), "even": {"predicted_ms": even.predicted_ms}})
        return
    click.echo(render(best, even))
    if out:
        click.echo(f"wrote {out}", err=True)
