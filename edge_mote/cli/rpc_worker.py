"""``edge-mote rpc-worker``: start llama.cpp's RPC worker, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os

import click


@click.command("rpc-worker", help="Start an RPC worker (ggml-rpc-server) so that another machine can place layers "
                                  "here with `edge-mote run --rpc HOST:PORT`. Binds to 127.0.0.1 unless --host is given.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but 127.0.0.1 exposes this machine to the network: see the warning.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads of the worker.")
@click.option("--device", default=None, help="Device(s) to serve, e.g. CUDA0.")
@click.option("--cache", is_flag=True, help="Cache large tensors on this machine's disk (faster reloads).")
def rpc_worker(host, port, threads, device, cache):
    from ..runtime.rpc import EXPOSURE_WARNING, worker_command

    cmd = worker_command(host, port, threads, device, cache)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo("warning: " + EXPOSURE_WARNING.format(endpoint=f"{host}:{port}"), err=True)
    else:
        click.echo(f"RPC worker on 127.0.0.1:{port} (this machine only; to serve other machines of a trusted home "
                   f"network, pass --host with this machine's LAN address)", err=True)
    os.execv(cmd[0], cmd)
