"""``edge-mote eval``: the MoTE protocol (top-N vs random-N, OFF/DROP/ON) plus quality, in one table."""

from __future__ import annotations

import click

from .options import echo_json, json_option, load_kwargs, load_options, model_argument


def _ints(text: str) -> tuple[int, ...]:
    from ..errors import UserError

    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"bad --top '{text}': expected comma-separated integers, e.g. 1,5,10") from None
    if not vals:
        raise UserError("--top needs at least one value")
    return vals


@click.command("eval", help="Measure a behaviour with the scan's top-N experts switched OFF / DROPped / forced ON "
                            "against random-N experts, plus first-token KL, mean KL and perplexity on the control set.")
@model_argument
@click.option("--behavior", required=True, type=click.Path(dir_okay=False), help="Behaviour prompt set (JSONL/JSON/txt).")
@click.option("--control", required=True, type=click.Path(dir_okay=False), help="Control prompt set.")
@click.option("--scan", "scan_path", required=True, type=click.Path(dir_okay=False), help="scan.json (its ranking).")
@click.option("--top", "tops", default="1,5,10", show_default=True, help="N values, comma-separated.")
@click.option("--random-trials", type=click.IntRange(0), default=5, show_default=True,
              help="Random-N draws per N and mode (uniform over all routed experts except the top-N).")
@click.option("--modes", default="off,drop,on", show_default=True, help="Modes to test, comma-separated.")
@click.option("--max-new", type=click.IntRange(1, 512), default=16, show_default=True, help="Greedy response tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--detector", type=click.Path(dir_okay=False), default=None,
              help="Behaviour detector JSON {openers, patterns} (default: refusal markers).")
@click.option("--raw", is_flag=True, help="Use prompts as raw text (no chat template).")
@json_option
@load_options
def eval_(model, behavior, control, scan_path, tops, random_trials, modes, max_new, seed, detector, raw, as_json,
          n_ctx, n_threads, n_gpu_layers, rpc):
    from ..api import run_eval
    from ..cluster import call

    report = call(run_eval, model, behavior, control, scan_path, tops=_ints(tops), random_trials=random_trials,
                      modes=tuple(m.strip() for m in modes.split(",") if m.strip()), seed=seed, max_new=max_new,
                      detector=detector, raw=raw, progress=not as_json,
                      **load_kwargs(n_ctx, n_threads, n_gpu_layers, rpc))
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(render_table(report))


def render_table(report) -> str:
    def f(v, sd=None, pct=True):
        if v is None or v != v:
            return "-"
        s = f"{v:.2f}" if pct else f"{v:.3f}"
        return s + (f"±{sd:.2f}" if sd is not None and sd == sd else "")

    head = ("config", "beh.dec", "beh.phr", "compliant", "ref.match", "ctl.dec", "ctl.phr", "KL first", "KL mean",
            "ppl ctl", "ppl beh")
    rows = [head]
    for r in report.rows:
        v, sd = r.values, r.sd
        rows.append((r.name,) + tuple(
            f(v[k], sd.get(k), pct=k not in ("kl_first", "kl_mean", "ppl_control", "ppl_behavior"))
            for k in ("behavior_decision", "behavior_phrase", "compliant", "reference_match", "control_decision",
                      "control_phrase", "kl_first", "kl_mean", "ppl_control", "ppl_behavior")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"{report.n_behavior} behaviour / {report.n_control} control prompts, greedy, {report.max_new} new tokens, "
                 f"detector '{report.detector.name}'; random-N: mean±sd over {report.random_trials} draws (seed "
                 f"{report.seed}+t) of experts outside the top-N; dec = decision level (response opens with the "
                 "behaviour), phr = phrase level; compliant = no opener and coherent text; KL vs unsteered on control.")
    return "\n".join(lines)
