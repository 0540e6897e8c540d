#!/usr/bin/env python3
"""Seed spread of the model organism: is the demo's behaviour result robust, or one lucky seed?

    .venv/bin/python bench/bench_organism_seeds.py [--seeds 0,1,2,3,4] [--tops 2] [--random-trials 5] [--causal 8]
                                                   [--threads 1] [--work ~/.cache/edge-mote/organism-seeds]
                                                   [--json out.json]
    .venv/bin/python bench/bench_organism_seeds.py --train-only --seeds 4,3,2   # optional: train in a 2nd process

For every seed, the same workflow as ``edge-mote demo`` (edge_mote/demo.py), with edge-mote's own code throughout:

1. train the organism (``build_organism(work/seed-S/organism, seed=S)``; the seed also draws the corpus; about
   3 minutes per seed on 2 idle cores; cached in ``--work``, outside the repository; a lock file per seed lets a
   second ``--train-only`` process train ahead);
2. scan it on the training sets (fTRI, decision window, with the causal check of the top ``--causal`` candidates
   as the demo does) -> ``work/seed-S/scan-causalK.json``;
3. evaluate the scan's ranking on the held-out sets with ``edge_mote.evaluate.protocol.evaluate`` (top-N and
   random-N, OFF and ON, greedy, 16 new tokens, ``--random-trials`` draws) -> ``work/seed-S/eval-*.json``
   (cached by organism hash, settings and the top-N picks); where the statistical ranking alone (no causal check) picks other
   top-N experts, those are evaluated too (OFF and ON, no random draws), for comparison.

Per seed and N it reports the experts stage 2 trained (``meta.json``), the statistical top-N with its OFF refusal
and ON false refusal, the top-N after the causal check, the unsteered refusal rate, top-N OFF refusal and its cut,
the random-N OFF cut, coherent compliance, first-token KL on neutral prompts, top-N ON and random-N ON false
refusal on neutral prompts, and whether the acceptance criteria of tests/e2e/test_organism.py hold (for N = 2:
unsteered refusal >= 0.9 and false refusal <= 0.1; top-N OFF cut >= 50%; random-N OFF cut <= a third of it;
compliant >= 0.5; KL first <= 0.1; top-N ON false refusal >= random + 0.2); the scan's top 5 per seed; then the
spread over seeds (min / median / max). Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def default_work() -> Path:
    root = Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()
    return root / "organism-seeds"


def criteria(rep: dict, n: int) -> dict[str, bool]:
    """tests/e2e/test_organism.py's acceptance criteria for top-N (one flag each)."""
    rows = {r["name"]: r for r in rep["rows"]}
    base, top, rnd = rows["unsteered"], rows[f"top-{n} off"], rows[f"random-{n} off"]
    cut_top = base["behavior_decision"] - top["behavior_decision"]
    cut_rnd = base["behavior_decision"] - rnd["behavior_decision"]
    out = {
        "baseline": base["behavior_decision"] >= 0.9 and base["control_decision"] <= 0.1,
        "cut": cut_top >= 0.5 * base["behavior_decision"],
        "random": cut_rnd <= cut_top / 3,
        "compliant": top["compliant"] >= 0.5,
        "kl": top["kl_first"] <= 0.1,
    }
    if f"top-{n} on" in rows:
        out["on"] = rows[f"top-{n} on"]["control_decision"] >= rows[f"random-{n} on"]["control_decision"] + 0.2
    return out


def train(seed: int, work: Path):
    """The organism of ``seed`` (trained once; a lock file lets several processes share ``work``)."""
    import fcntl

    from edge_mote.demo import organism_builder

    d = work / f"seed-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return organism_builder()(d / "organism", seed=seed, progress=False)


def run_seed(seed: int, work: Path, tops: tuple[int, ...], random_trials: int, max_new: int, causal: int,
             n_threads: int) -> dict:
    import edge_mote
    from edge_mote.api import prepare_prompts, scan_ranking
    from edge_mote.evaluate.protocol import evaluate
    from edge_mote.ftri.prompts import load_prompts
    from edge_mote.ftri.scan import scan_and_write

    d = work / f"seed-{seed}"
    t = time.perf_counter()
    org = train(seed, work)
    secs = {"organism": time.perf_counter() - t}
    digest = org.meta["recipe_hash"]
    t = time.perf_counter()
    scan_json = d / f"scan-causal{causal}.json"
    result = scan_and_write(org.gguf, org.sets["behavior_train"], org.sets["control_train"], scan_json,
                            tokens="decision", top=10, progress=False, n_threads=n_threads, causal=causal)
    top = [{k: rec[k] for k in ("layer", "expert", "rd", "z", "dw", "stability", "effect", "score") if k in rec}
           for rec in result.top(5)]
    statistical = result.stats.ranking()  # the ranking without the causal check
    secs["scan"] = time.perf_counter() - t

    ranking, _ = scan_ranking(scan_json)  # what the demo uses: with the causal check when causal > 0
    picks = "_".join(",".join(f"{l}.{e}" for l, e in sorted(tuple(x) for x in r[:n])) for r in (ranking, statistical)
                     for n in tops)
    key = f"{digest[:16]}-top{'_'.join(map(str, tops))}-r{random_trials}-n{max_new}-{picks}"
    cached = d / f"eval-{key}.json"
    if cached.exists():  # the evaluation depends on the organism, the settings and the top-N picks only
        out = json.loads(cached.read_text())
        out.update(top=top, ranking=ranking[:10], statistical=[tuple(x) for x in statistical[:10]])
        return out

    t = time.perf_counter()
    with edge_mote.load(org.gguf, n_ctx=512, n_threads=n_threads) as m:
        b = prepare_prompts(m, load_prompts(org.sets["behavior_heldout"]))
        c = prepare_prompts(m, load_prompts(org.sets["control_heldout"]))
        report = evaluate(m, b, c, ranking, tops=tops, modes=("off", "on"), random_trials=random_trials, seed=0,
                          max_new=max_new)
        plain = None
        if causal and [tuple(x) for x in statistical[:max(tops)]] != [tuple(x) for x in ranking[:max(tops)]]:
            # the statistical ranking's top-N, for comparison (no random draws: the control is the same)
            plain = evaluate(m, b, c, statistical, tops=tops, modes=("off", "on"), random_trials=0, seed=0,
                             max_new=max_new).to_dict()
    secs["eval"] = time.perf_counter() - t
    out = {"seed": seed, "recipe_hash": digest, "causal": causal, "top": top, "ranking": ranking[:10],
           "statistical": [tuple(x) for x in statistical[:10]],
           "trainable": [(e["layer"], e["expert"]) for e in org.meta["trainable_experts"]],
           "train_seconds": org.meta.get("seconds_total"), "seconds": secs, "eval": report.to_dict(),
           "eval_statistical": plain}
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(cached)
    return out


def fmt_experts(experts) -> str:
    return ", ".join(f"{l}:{e}" for l, e in experts)


def seed_rows(res: dict, n: int) -> dict:
    rows = {r["name"]: r for r in res["eval"]["rows"]}
    base, off, roff = rows["unsteered"], rows[f"top-{n} off"], rows[f"random-{n} off"]
    on, ron = rows.get(f"top-{n} on"), rows.get(f"random-{n} on")
    b = base["behavior_decision"]
    steer = off.get("steering", "")
    return {
        "seed": res["seed"], "n": n, "steering": steer,
        "base": b, "base_control": base["control_decision"],
        "off": off["behavior_decision"], "cut": (b - off["behavior_decision"]) / b if b else float("nan"),
        "random_cut": (b - roff["behavior_decision"]) / b if b else float("nan"),
        "compliant": off["compliant"], "kl_first": off["kl_first"],
        "on_false": on["control_decision"] if on else float("nan"),
        "random_on_false": ron["control_decision"] if ron else float("nan"),
        "on_kl_first": on["kl_first"] if on else float("nan"),
        "criteria": criteria(res["eval"], n),
        **_statistical(res, n),
    }


def _statistical(res: dict, n: int) -> dict:
    """Top-N of the statistical ranking (no causal check): its experts, OFF refusal and ON false refusal."""
    plain = res.get("eval_statistical")
    experts = fmt_experts(res.get("statistical", res["ranking"])[:n])
    if plain is None:  # the same top-N as with the causal check
        rows = {r["name"]: r for r in res["eval"]["rows"]}
    else:
        rows = {r["name"]: r for r in plain["rows"]}
    on = rows.get(f"top-{n} on")
    return {"stat_experts": experts, "stat_off": rows[f"top-{n} off"]["behavior_decision"],
            "stat_on_false": on["control_decision"] if on else float("nan")}


def markdown(results: list[dict], tops: tuple[int, ...]) -> str:
    lines = ["| seed | trained experts (stage 2) | N | statistical top-N: OFF refusal, ON false refusal | "
             "top-N (causal check) | unsteered refusal | top-N OFF refusal | cut | random-N OFF cut | compliant | "
             "KL first | top-N ON false refusal | random-N ON false refusal | criteria |",
             "|---" * 14 + "|"]
    per_n: dict[int, list[dict]] = {n: [] for n in tops}
    for res in results:
        for n in tops:
            r = seed_rows(res, n)
            per_n[n].append(r)
            crit = r["criteria"]
            failed = [k for k, ok in crit.items() if not ok]
            verdict = "met" if not failed else "missed: " + ", ".join(failed)
            experts = fmt_experts(res["ranking"][:n]) if r["steering"] == "" else \
                r["steering"].split("=", 1)[1].replace(",", ", ")
            lines.append(f"| {res['seed']} | {fmt_experts(res['trainable']) if n == tops[0] else ''} | {n} | "
                         f"{r['stat_experts']}: {r['stat_off']:.2f}, {r['stat_on_false']:.2f} | {experts} | "
                         f"{r['base']:.2f} | {r['off']:.2f} | {r['cut']:.0%} | {r['random_cut']:.0%} | "
                         f"{r['compliant']:.2f} | {r['kl_first']:.3f} | {r['on_false']:.2f} | "
                         f"{r['random_on_false']:.2f} | {verdict} |")
    lines += ["", "Scan top-5 per seed (layer:expert, risk difference, causal effect and score = rd x effect):", ""]
    for res in results:
        lines.append(f"- seed {res['seed']}: " + ", ".join(
            f"{t['layer']}:{t['expert']} rd {t['rd']:.2f}"
            + (f" effect {t['effect']:.3g} score {t['score']:.3g}" if "score" in t else "")
            for t in res["top"]))
    lines += ["", "Spread over seeds (min / median / max):", "",
              "| N | statistical top-N OFF refusal | top-N OFF cut | random-N OFF cut | compliant | "
              "KL first (top-N OFF) | top-N ON false refusal | random-N ON false refusal | "
              "seeds meeting every criterion |", "|---" * 9 + "|"]
    for n in tops:
        rs = per_n[n]

        def spread(key, pct=False):
            v = np.array([r[key] for r in rs], dtype=float)
            f = (lambda x: f"{x:.0%}") if pct else (lambda x: f"{x:.3f}" if key == "kl_first" else f"{x:.2f}")
            return f"{f(np.nanmin(v))} / {f(np.nanmedian(v))} / {f(np.nanmax(v))}"

        ok = sum(all(r["criteria"].values()) for r in rs)
        lines.append(f"| {n} | {spread('stat_off')} | {spread('cut', True)} | {spread('random_cut', True)} | {spread('compliant')} | "
                     f"{spread('kl_first')} | {spread('on_false')} | {spread('random_on_false')} | {ok} of {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tops", default="2")
    ap.add_argument("--causal", type=int, default=8, help="the scan's causal check re-ranks its top K (0: off)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 on a busy 2-core machine)")
    ap.add_argument("--random-trials", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="cache of organisms, scans and evaluations "
                                                            "[~/.cache/edge-mote/organism-seeds]")
    ap.add_argument("--json", type=Path, default=None, help="also write every seed's results here")
    ap.add_argument("--train-only", action="store_true",
                    help="only train the organisms (e.g. in a second process while the first evaluates)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tops = tuple(int(n) for n in args.tops.split(",") if n.strip())
    work = (args.work or default_work()).expanduser()
    if args.train_only:
        for seed in seeds:
            t = time.perf_counter()
            train(seed, work)
            print(f"seed {seed}: organism in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return
    results = []
    t0 = time.perf_counter()
    for seed in seeds:
        t = time.perf_counter()
        res = run_seed(seed, work, tops, args.random_trials, args.max_new, args.causal, args.threads)
        results.append(res)
        print(f"seed {seed}: {time.perf_counter() - t:.0f} s  top {fmt_experts(res['ranking'][:max(tops)])}  "
              + "  ".join(f"top-{n}: {criteria(res['eval'], n)}" for n in tops), file=sys.stderr, flush=True)
    print(f"# bench_organism_seeds: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, seeds {seeds}, tops {tops}, "
          f"{args.random_trials} random draws, {args.max_new} new tokens, {time.perf_counter() - t0:.0f} s, "
          f"work {work}")
    print(markdown(results, tops))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
