"""``edge-mote run MODEL -p PROMPT [steering]``"""

from __future__ import annotations

import click

from .options import (echo_json, json_option, load_kwargs, load_options, model_argument, steering_from_options,
                      steering_options)


@click.command(help="Generate text from a prompt, optionally steering experts (greedy by default).")
@model_argument
@click.option("-p", "--prompt", required=True, help="The prompt (raw text).")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temp", "temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Sampling temperature (0: greedy).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@steering_options
@json_option
@load_options
def run(model, prompt, max_tokens, temperature, seed, off, drop, on_, bias_, margin, steer_text, profile, as_json,
        n_ctx, n_threads, n_gpu_layers, rpc):
    from ..api import run_prompt
    from ..cluster import call

    steering = steering_from_options(off, drop, on_, bias_, margin, steer_text)
    result = call(run_prompt, model, prompt, steering=steering, profile=profile, max_tokens=max_tokens,
                  temperature=temperature, seed=seed, **load_kwargs(n_ctx, n_threads, n_gpu_layers, rpc))
    if as_json:
        echo_json(result.to_dict())
        return
    if result.steering:
        click.echo(f"[steering: {result.steering}]", err=True)
    click.echo(prompt + result.completion.text)
