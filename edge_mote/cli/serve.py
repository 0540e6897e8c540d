"""``edge-mote serve MODEL``"""

from __future__ import annotations

import click

from .options import model_argument, plan_option, plan_from_context


@click.command(help="Serve a model over an OpenAI-compatible HTTP API; each request may carry its own steering "
                    "(profiles as models MODEL:PROFILE, or the extra body field 'mote').")
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to the network (a warning says why).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--parallel", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Sequences decoded together; more requests wait in a queue.")
@click.option("--ctx", "n_ctx", type=click.IntRange(16), default=2048, show_default=True,
              help="Tokens per sequence (prompt + completion).")
@click.option("--prompt-cache", "prompt_cache_mib", type=click.IntRange(0), default=1024, show_default=True,
              metavar="MIB", help="Host memory for the KV cells of finished prompts whose slot was needed, put back "
                                  "for a request that starts the same way (0: off; not with --rpc).")
@click.option("--profile", default=None, metavar="NAME",
              help="The server's steering: a profile stored in the GGUF ('none': not even the default profile).")
@click.option("--api-key", default=None, envvar="EDGE_MOTE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes (also $EDGE_MOTE_API_KEY).")
@click.option("--name", default=None, help="The model name clients use (default: the file name without .gguf).")
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
@click.option("--gpu-layers", "n_gpu_layers", type=int, default=None,
              help="Layers to offload to GPU/RPC devices (-1: all; default 0, or all with --rpc).")
@click.option("--rpc", default=None, metavar="HOST:PORT,...",
              help="RPC workers to place layers on. The model then runs in a child process: a worker that fails "
                   "mid-generation fails the requests in flight (502), not the server, which answers 503 until the "
                   "model is loaded again (when the worker is back, or per --rpc-fallback).")
@click.option("--rpc-fallback", default="10", metavar="SECONDS|off", show_default=True,
              help="With --rpc: after a worker is lost this long, serve on the workers that still answer (this "
                   "machine alone if none does) when the model fits their free memory, until it is back; "
                   "off: always wait for every worker.")
@plan_option
def serve(model, host, port, parallel, n_ctx, prompt_cache_mib, profile, api_key, name, n_threads, n_gpu_layers, rpc,
          rpc_fallback):
    from ..errors import UserError
    from ..serve import ServeConfig, serve as run_server

    servers = [s.strip() for s in (rpc or "").split(",") if s.strip()]
    plan = plan_from_context()
    if plan and not servers:
        raise UserError("--plan needs RPC workers (--rpc HOST:PORT,...)")
    if rpc_fallback.strip().lower() in ("off", "never", "none"):
        fallback = None
    else:
        try:
            fallback = float(rpc_fallback)
        except ValueError:
            fallback = -1.0
        if not fallback >= 0:
            raise UserError(f"--rpc-fallback must be a number of seconds >= 0 or 'off', got '{rpc_fallback}'")
    cfg = ServeConfig(model=model, host=host, port=port, parallel=parallel, n_ctx=n_ctx, profile=profile,
                      rpc_servers=servers or None, n_threads=n_threads, n_gpu_layers=n_gpu_layers, api_key=api_key,
                      name=name, rpc_fallback=fallback, plan=plan, prompt_cache_mib=prompt_cache_mib)
    run_server(cfg, on_ready=lambda line: click.echo(line))
