"""``edge-mote quantize IN.gguf OUT.gguf --type Q4_K_M [--recipe uniform|moe] [--imatrix F | --calib P]``"""

from __future__ import annotations

import click

from .options import echo_json, json_option


@click.command(help="Quantize a GGUF (F32/F16/BF16) with llama.cpp's quantizer. --recipe moe: expert-aware mix "
                    "(routed experts at the type's base, ffn_down_exps higher in the first MoE layers and every 4th, "
                    "attention / shared experts / dense layers at q6_k, router unquantized). Profiles and all "
                    "metadata are kept byte-equal.")
@click.argument("model", metavar="IN.gguf")
@click.argument("output", metavar="OUT.gguf")
@click.option("--type", "qtype", required=True, metavar="TYPE", help="Q4_K_M, Q3_K_M, Q8_0, Q6_K, Q5_K_M, Q2_K, ...")
@click.option("--recipe", type=click.Choice(["uniform", "moe"]), default="uniform", show_default=True)
@click.option("--imatrix", default=None, type=click.Path(dir_okay=False, exists=True),
              help="An importance matrix (llama-imatrix output).")
@click.option("--calib", default=None, type=click.Path(dir_okay=False, exists=True), metavar="PROMPTS",
              help="Compute a routing-aware importance matrix from these prompts first (llama-imatrix).")
@click.option("--raw", is_flag=True, help="Calibration prompts as raw text (no chat template).")
@click.option("--prior-tokens", type=click.IntRange(0), default=32, show_default=True,
              help="--calib: shrink each expert's statistics towards its layer's with this many pseudo-tokens "
                   "(rarely routed experts get little calibration data).")
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help="Threads.")
@json_option
def quantize(model, output, qtype, recipe, imatrix, calib, raw, prior_tokens, n_threads, as_json):
    from ..ship.quantize import quantize_model

    r = quantize_model(model, output, qtype, recipe=recipe, imatrix=imatrix, calib=calib, raw=raw,
                       prior_tokens=prior_tokens, n_threads=n_threads, progress=not as_json)
    if as_json:
        echo_json(r.to_dict())
        return
    click.echo(f"wrote {r.output}: {r.type} recipe {r.recipe}, {r.bytes_before / 2**20:.1f} -> "
               f"{r.bytes_after / 2**20:.1f} MiB ({r.bytes_after / r.bytes_before:.1%}) in {r.seconds:.1f}s")
    click.echo("tensor types: " + ", ".join(f"{t} x{n}" for t, n in r.types.items()))
    if r.imatrix is not None:
        im = r.imatrix
        extra = (f"; {im.rare_experts} of {im.expert_entries} expert entries had < {prior_tokens} calibration tokens "
                 f"({im.unseen_experts} none), shrunk towards their layer") if im.computed else ""
        click.echo(f"importance matrix: {im.path}{extra}")
    click.echo("metadata and profiles: byte-equal to the input")
