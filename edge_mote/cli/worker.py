"""``edge-mote worker``: an RPC worker for a home cluster (``rpc-worker`` is the old name, kept as an alias)."""

from __future__ import annotations

import click


def _command(name: str, hidden: bool = False):
    @click.command(name, hidden=hidden,
                   help="Run an RPC worker so that another machine can place layers here with `edge-mote run --rpc "
                        "HOST:PORT`. Loopback only unless --host says otherwise (then read the warning). Survives "
                        "clients that vanish, caps the memory it offers with --mem, caches weights on disk.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on (IPv4, IPv6 or a host name). Anything but loopback exposes this "
                       "machine to the network.")
    @click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
    @click.option("--mem", "mem_gib", type=float, default=None, metavar="GiB",
                  help="Offer at most this much memory (allocations beyond it fail cleanly).")
    @click.option("--cache", "cache_dir", default=None, metavar="DIR",
                  help="Weight cache folder [~/.cache/edge-mote/worker-cache]: a second load sends hashes only.")
    @click.option("--no-cache", is_flag=True, help="Do not cache weights on this machine's disk.")
    @click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads of the worker.")
    @click.option("--device", default=None, help="Device(s) to serve, e.g. CUDA0 (default: GPUs, else the CPU).")
    def worker(host, port, mem_gib, cache_dir, no_cache, threads, device):
        from pathlib import Path

        from ..cluster.worker import WorkerConfig, default_cache_dir, exposure_warning, serve

        cache = None if no_cache else Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        cfg = WorkerConfig(host=host, port=port, mem_gib=mem_gib, cache_dir=cache, threads=threads, device=device)
        warning = exposure_warning(cfg)
        if warning:
            click.echo("warning: " + warning, err=True)
        else:
            click.echo(f"RPC worker for this machine only ({cfg.endpoint}); to serve other machines of a trusted home "
                       "network, pass --host with this machine's LAN address", err=True)
        serve(cfg, log=lambda msg: click.echo(msg, err=True))

    return worker


worker = _command("worker")
