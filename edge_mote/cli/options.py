"""Options shared by several commands, defined once."""

from __future__ import annotations

import json as _json

import click


def model_argument(f):
    return click.argument("model", metavar="MODEL")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (no progress output).")(f)


def load_options(f):
    """How to load the model: context size, threads, GPU offload."""
    f = click.option("--ctx", "n_ctx", type=click.IntRange(16), default=2048, show_default=True, help="Context size.")(f)
    f = click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")(f)
    f = click.option("--gpu-layers", "n_gpu_layers", type=int, default=None,
                     help="Layers to offload to GPU/RPC devices (-1: all; default 0, or all with --rpc).")(f)
    f = click.option("--rpc", "rpc", default=None, metavar="HOST:PORT,...",
                     help="RPC workers (edge-mote worker) to place layers on; inference then runs in a child process "
                          "that a failing worker cannot take down ([IPv6]:PORT and host names work).")(f)
    return plan_option(f)


def plan_option(f):
    """``--plan auto|even|PLAN.json`` (``run``, ``scan``, ``eval``, ``serve``): read it with ``plan_from_context``."""
    return click.option("--plan", "plan", default=None, metavar="auto|even|PLAN.json", expose_value=False,
                        callback=_stash_plan,
                        help="With --rpc: how to split layers over the workers (auto: measure nodes and links, "
                             "minimise ms/token; default: llama.cpp's split by free memory).")(f)


def _stash_plan(ctx, param, value):
    ctx.meta["edge_mote.plan"] = value
    return value


def plan_from_context() -> str | None:
    """The --plan given to the running command (None without one)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("edge_mote.plan") if ctx is not None else None


def load_kwargs(n_ctx, n_threads, n_gpu_layers, rpc=None) -> dict:
    """Keyword arguments for ``edge_mote.cluster.call`` (``load`` / ``Model`` plus ``plan`` when --plan is given)."""
    servers = [s for s in (rpc or "").split(",") if s.strip()]
    out = {"n_ctx": n_ctx, "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "rpc_servers": servers or None}
    plan = plan_from_context()
    if plan:
        out["plan"] = plan
    return out


def steering_options(f):
    """--off/--drop/--on/--bias/--margin/--steer/--profile, combined by ``steering_from_options``."""
    f = click.option("--profile", default=None, metavar="NAME",
                     help="Apply a profile stored in the GGUF ('none': no steering, not even the default profile).")(f)
    f = click.option("--steer", "steer_text", default=None, metavar="SPEC",
                     help="Steering as text (off=L:E,...;bias=L:E=V) or JSON, or @FILE.")(f)
    f = click.option("--margin", type=float, default=None, help="ON margin added to the token's max router logit [0.01].")(f)
    f = click.option("--bias", "bias_", multiple=True, metavar="L:E=V,...", help="Add V to the router logit of expert E in layer L.")(f)
    f = click.option("--on", "on_", multiple=True, metavar="L:E,...", help="Force experts ON (always routed, weighted first).")(f)
    f = click.option("--drop", multiple=True, metavar="L:E,...", help="Zero experts' gate weight after routing (slot wasted).")(f)
    f = click.option("--off", multiple=True, metavar="L:E,...", help="Switch experts OFF (the next-best expert takes the slot).")(f)
    return f


def steering_from_options(off, drop, on_, bias_, margin, steer_text):
    """The Steering the flags describe (None if no flag was given)."""
    from ..errors import UserError
    from ..steering import Steering

    parts = []
    for mode, values in (("off", off), ("drop", drop), ("on", on_), ("bias", bias_)):
        for v in values:
            parts.append(f"{mode}={v}")
    given = bool(parts) or steer_text is not None or margin is not None
    if not given:
        return None
    s = Steering.parse(";".join(parts))
    if steer_text is not None:
        text = steer_text
        if text.startswith("@"):
            try:
                with open(text[1:], encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as e:
                raise UserError(f"cannot read steering file {text[1:]}: {e.strerror}") from None
        s = s | Steering.parse(text)
    if margin is not None:
        s = Steering(s.off, s.drop, s.on, s.bias, margin)
    return s


def echo_json(obj) -> None:
    click.echo(_json.dumps(obj, indent=2, sort_keys=False))
