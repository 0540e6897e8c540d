"""``edge-mote convert HF_DIR_OR_REPO -o OUT.gguf``"""

from __future__ import annotations

import click

from .options import echo_json, json_option


@click.command(help="Convert a transformers model (local folder, or a Hugging Face Hub repo id) to GGUF with "
                    "llama.cpp's own converter, optionally storing steering profiles from scans or profile JSON.")
@click.argument("source", metavar="HF_DIR_OR_REPO")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True)
@click.option("--revision", default=None, help="Hub branch, tag or commit to pin (Hub repos only).")
@click.option("--offline", is_flag=True, help="Use the local Hugging Face cache only (also: HF_HUB_OFFLINE=1).")
@click.option("--profile-from", "profile_from", multiple=True, type=click.Path(dir_okay=False, exists=True),
              metavar="FILE", help="scan.json (its --top experts, --mode) or profile JSON "
                                   '({"name", "steering", "description"}; or `profile list --json` output). Repeatable.')
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Experts taken from each scan.")
@click.option("--mode", type=click.Choice(["off", "drop", "on"]), default="off", show_default=True,
              help="Mode of the experts taken from a scan.")
@click.option("--profile-name", default=None, help="Name of the profile made from a scan (default: the file's stem).")
@click.option("--default-profile", default=None, help="Profile the patched build applies when loading the file.")
@json_option
def convert(source, output, outtype, revision, offline, profile_from, top, mode, profile_name, default_profile,
            as_json):
    from pathlib import Path

    from ..errors import UserError
    from ..ship.convert import ProfileSource, convert_model

    if profile_name is not None and len(profile_from) != 1:
        raise UserError("--profile-name names the profile of a single --profile-from scan")
    sources = [ProfileSource(Path(p), top, mode, profile_name) for p in profile_from]
    r = convert_model(source, output, outtype=outtype, revision=revision, offline=offline or None, profiles=sources,
                      default_profile=default_profile, progress=not as_json)
    if as_json:
        echo_json(r.to_dict())
        return
    prof = (", profiles: " + ", ".join(p + (" (default)" if p == r.default_profile else "") for p in r.profiles)) \
        if r.profiles else ""
    click.echo(f"wrote {r.output} ({outtype}, {r.bytes / 2**20:.1f} MiB) from {r.folder} in {r.seconds:.1f}s{prof}")
