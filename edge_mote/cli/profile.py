"""``edge-mote profile add|list|rm``: named steering profiles stored in a GGUF's metadata."""

from __future__ import annotations

import click

from .options import echo_json, json_option, model_argument


@click.group(help="Store, list and remove named steering profiles in a GGUF (written atomically, never over the input).")
def profile():
    pass


@profile.command("add", help="Add a profile: the top-N experts of a scan (OFF/DROP/ON or a bias), or an explicit --steer.")
@model_argument
@click.option("--name", required=True, help="Profile name (A-Z a-z 0-9 _ -).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output GGUF (not the input).")
@click.option("--from-scan", "scan_path", type=click.Path(dir_okay=False), default=None, help="scan.json from edge-mote scan.")
@click.option("--top", type=click.IntRange(1), default=None, help="How many of the scan's top experts.")
@click.option("--mode", type=click.Choice(["off", "drop", "on"]), default="off", show_default=True)
@click.option("--bias", type=float, default=None, help="Instead of a mode: add this bias to the experts' router logits.")
@click.option("--steer", "steer_text", default=None, metavar="SPEC", help="An explicit steering (off=L:E,...) instead of a scan.")
@click.option("--description", default=None, help="Free text stored with the profile.")
@click.option("--default", "make_default", is_flag=True, help="Make it the profile applied when the file is loaded.")
@json_option
def add(model, name, output, scan_path, top, mode, bias, steer_text, description, make_default, as_json):
    from ..api import add_profile, scan_ranking, steering_from_ranking
    from ..errors import UserError
    from ..steering import Steering

    if (scan_path is None) == (steer_text is None):
        raise UserError("give either --from-scan (with --top) or --steer")
    if scan_path is not None:
        if top is None:
            raise UserError("--from-scan needs --top N")
        ranking, model_info = scan_ranking(scan_path)
        steering = steering_from_ranking(ranking, top, mode, bias, model_info)
        desc = description or (f"top-{top} {'bias %g' % bias if bias is not None else mode} from {scan_path}")
    else:
        steering = Steering.parse(steer_text)
        desc = description or ""
    out = add_profile(model, output, name, steering, desc, make_default)
    if as_json:
        echo_json({"output": str(out), "name": name, "steering": str(steering), "default": make_default})
    else:
        click.echo(f"wrote {out}: profile '{name}' = {steering}" + (" (default)" if make_default else ""))


@profile.command("list", help="List the profiles stored in a GGUF.")
@model_argument
@json_option
def list_(model, as_json):
    from ..api import list_profiles

    profiles, default = list_profiles(model)
    if as_json:
        echo_json({"default": default, "profiles": [{"name": p.name, "steering": str(p.steering),
                                                      "description": p.description} for p in profiles.values()]})
        return
    if not profiles:
        click.echo("no profiles")
    for p in profiles.values():
        click.echo(f"{p.name}{' (default)' if p.name == default else ''}: {p.steering}" +
                   (f"  # {p.description}" if p.description else ""))


@profile.command("rm", help="Write a copy of a GGUF without one profile.")
@model_argument
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output GGUF (not the input).")
def rm(model, name, output):
    from ..api import remove_profile

    out = remove_profile(model, output, name)
    click.echo(f"wrote {out} without profile '{name}'")
