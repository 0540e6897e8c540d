"""The fTRI scan end to end: a model with planted experts, the four windows, scan.json/PNG/HTML and the real CLI.

The planted model is the tiny Qwen3-MoE with its weights edited so that, in every MoE layer, two chosen experts
(k = 2) are selected exactly at the trigger token " banana" and never elsewhere:

* two hidden coordinates are reserved: ``TRIG`` carries the trigger (only the trigger's embedding has it, 2.0) and
  ``BIAS`` is a constant 0.1 in every other token's embedding; no attention output or expert writes to either,
  so they pass unchanged through the residual stream to every layer's router;
* the planted experts' router rows read ``+C * TRIG - 400 * BIAS``: a large logit at the trigger, a very
  negative one at every other token.

Models are run on one thread: the tiny model needs no more, and spinning threads are slow on a busy machine.

A scan at the decision position with prompts that end in the trigger (behaviour) or in " table" (control) must
rank exactly the planted experts first. They tie on rd and z, so the gate weight decides: the expert with the larger
router row (``10 + 1``) takes almost all of its layer's weight at the trigger and ranks before every lighter one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_mote
from edge_mote.errors import UserError
from edge_mote.ftri import load_prompts, run_scan
from edge_mote.ftri.report import SCHEMA, heatmap_html, heatmap_png, load_scan, write_scan

TRIGGER, NEUTRAL = " banana", " table"
PLANTED = {0: (1, 6), 1: (0, 3), 2: (5, 7)}
TRIG, BIAS = 5, 11
CARRIERS = ["Tell me about the", "I would like a", "Where is the", "Please describe the", "My friend ate a",
            "Draw me a", "Yesterday we bought a", "What colour is the", "Nobody expected the", "Here is a"]


def _plant(src: Path, dst: Path, trigger_id: int) -> None:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    t = {k: v.copy() for k, v in load_file(str(path)).items()}
    emb = t["model.embed_tokens.weight"]
    emb[:, TRIG] = 0.0
    emb[:, BIAS] = 0.1
    emb[trigger_id] = 0.0
    emb[trigger_id, TRIG] = 2.0
    for layer, experts in PLANTED.items():
        pre = f"model.layers.{layer}."
        t[pre + "self_attn.o_proj.weight"][[TRIG, BIAS], :] = 0.0
        t[pre + "post_attention_layernorm.weight"][[TRIG, BIAS]] = 1.0
        for e in range(8):
            t[pre + f"mlp.experts.{e}.down_proj.weight"][[TRIG, BIAS], :] = 0.0
        gate = t[pre + "mlp.gate.weight"]
        for j, e in enumerate(experts):
            gate[e] = 0.0
            gate[e, TRIG] = 10.0 + j
            gate[e, BIAS] = -400.0
    save_file(t, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted(tiny_model, vendor_dir, tmp_path_factory) -> Path:
    from edge_mote.conversion import convert_hf_to_gguf

    hf, gguf = tiny_model("qwen3moe")
    with edge_mote.load(gguf, n_ctx=64, n_threads=1) as m:
        assert m.tokenize(TRIGGER, add_bos=False) == m.tokenize("the" + TRIGGER, add_bos=False)[1:]
        (trigger_id,) = m.tokenize(TRIGGER, add_bos=False)
    d = tmp_path_factory.mktemp("planted")
    _plant(hf, d / "hf", trigger_id)
    return convert_hf_to_gguf(d / "hf", d / "planted-f32.gguf", vendor_dir, "f32")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    b, c = d / "behavior.jsonl", d / "control.txt"
    b.write_text("".join(json.dumps({"prompt": s + TRIGGER, "id": f"b{i}"}) + "\n" for i, s in enumerate(CARRIERS)))
    c.write_text("# control prompts\n" + "".join(s + NEUTRAL + "\n" for s in CARRIERS))
    return b, c


def planted_pairs() -> list[tuple[int, int]]:
    return sorted((l, e) for l, es in PLANTED.items() for e in es)


def heavy_pairs() -> set[tuple[int, int]]:
    """Each layer's planted expert with the larger router row: the larger gate weight at the trigger."""
    return {(l, es[1]) for l, es in PLANTED.items()}


def assert_planted_order(pairs: list[tuple[int, int]], dw: dict[tuple[int, int], float]) -> None:
    """The planted experts first, tied on rd and z, so by dw desc: the heavier expert of every layer first."""
    assert sorted(pairs) == planted_pairs()
    assert set(pairs[:3]) == heavy_pairs()
    assert pairs == sorted(pairs, key=lambda p: (-round(dw[p], 12), p))


def test_planted_model_routes_as_built(planted):
    with edge_mote.load(planted, n_ctx=64, n_threads=1) as m:
        toks = m.tokenize("I saw a" + TRIGGER + " and a" + NEUTRAL + " today")
        trig = [i for i, t in enumerate(toks) if m.detokenize([t]) == TRIGGER]
        assert len(trig) == 1
        tr = m.routing(toks)
        for layer, experts in PLANTED.items():
            ids = tr.ids[layer]
            for i in range(len(toks)):
                chosen = set(ids[i].tolist())
                assert (chosen == set(experts)) if i in trig else not (chosen & set(experts)), (layer, i, chosen)


def test_decision_scan_ranks_exactly_the_planted_experts_first(planted, prompt_files):
    b, c = prompt_files
    with edge_mote.load(planted, n_ctx=128, n_threads=1) as m:
        r = run_scan(m, b, c, tokens="decision", raw=True, progress=False, n_boot=50)
    n = len(PLANTED) * 2
    top = r.top(n)
    dw = {(x["layer"], x["expert"]): x["dw"] for x in top}
    assert_planted_order([(x["layer"], x["expert"]) for x in top], dw)  # rd and z tie: by dw, not by layer
    assert all(x["p1"] == 1.0 and x["p2"] == 0.0 and x["rd"] == 1.0 for x in top)
    assert all(x["w2"] == 0.0 and x["dw"] == x["w1"] > 0.0 for x in top)
    for l, (light, heavy) in PLANTED.items():  # k = 2, renormalised: the pair shares all the weight
        assert dw[(l, heavy)] > 0.9 and dw[(l, heavy)] + dw[(l, light)] == pytest.approx(1.0, abs=1e-5)
    assert r.top(n + 1)[-1]["rd"] <= 0.0  # every other expert: never used at the trigger
    assert r.behavior.n_window_tokens == r.control.n_window_tokens == len(CARRIERS)
    assert r.stability.jaccard_mean[1] == 1.0 and r.stability.jaccard_mean[5] == 1.0
    assert all(r.stability.top_freq[r.layers.index(l), e] == 1.0 for l, e in planted_pairs())
    assert not r.warnings and not r.templated


def test_windows_count_the_right_positions(planted, prompt_files):
    b, c = prompt_files
    bset, cset = load_prompts(b), load_prompts(c)
    with edge_mote.load(planted, n_ctx=128, n_threads=1) as m:
        lens = [len(m.tokenize(i.prompt)) for i in bset]
        res = {w: run_scan(m, bset, cset, tokens=w, max_new=4, raw=True, progress=False, n_boot=20)
               for w in ("prompt", "decision", "response", "all")}
    p, a = res["prompt"], res["all"]
    np.testing.assert_array_equal(p.tokens1, lens)
    np.testing.assert_array_equal(res["decision"].tokens1, np.ones(len(lens)))
    # prompt window: each planted expert fired exactly once per behaviour prompt (at the trigger), never in control
    for l, e in planted_pairs():
        li = p.layers.index(l)
        assert p.stats.a1[li, e] == len(CARRIERS) and p.stats.a2[li, e] == 0
    resp = res["response"]
    for rec in resp.prompts:
        m_rows = min(rec.n_response_tokens + 1, 4)
        assert rec.n_window_tokens == m_rows and rec.response is not None
    # all = prompt + response - the shared decision position; top-k per token in every layer
    np.testing.assert_array_equal(a.tokens1, p.tokens1 + resp.tokens1 - 1)
    for r in res.values():
        k = 2
        assert (r.counts1.sum(axis=2) == k * r.tokens1[:, None]).all()
        assert (r.counts2.sum(axis=2) == k * r.tokens2[:, None]).all()
        # gate-weight sums: only where selected, and the renormalised top-k weights of a token sum to 1
        for cnt, ws, t in ((r.counts1, r.wsum1, r.tokens1), (r.counts2, r.wsum2, r.tokens2)):
            assert ws.dtype == np.float64 and ws.shape == cnt.shape and ((ws > 0) == (cnt > 0)).all()
            np.testing.assert_allclose(ws.sum(axis=2), np.broadcast_to(t[:, None], ws.shape[:2]), rtol=1e-5)


def test_scan_json_png_html_roundtrip(planted, prompt_files, tmp_path):
    b, c = prompt_files
    with edge_mote.load(planted, n_ctx=128, n_threads=1) as m:
        r = run_scan(m, b, c, tokens="decision", raw=False, progress=False, n_boot=20)
    assert r.warnings and "no chat template" in r.warnings[0]  # the tiny GGUF has none: raw text, not a crash
    out = write_scan(r, tmp_path / "scan.json")
    doc = load_scan(out)
    assert doc["schema"] == SCHEMA and doc["window"]["tokens"] == "decision" and doc["window"]["max_new"] is None
    assert doc["model"]["sha256_scope"] == "full" and len(doc["model"]["sha256"]) == 64
    assert doc["model"]["moe_layers"] == [0, 1, 2] and doc["model"]["top_k"] == 2
    assert len(doc["experts"]) == 24 and doc["ranking"]["n_total"] == 24 and len(doc["ranking"]["entries"]) == 24
    entries = doc["ranking"]["entries"]
    assert [(e["layer"], e["expert"]) for e in entries] == [(x["layer"], x["expert"]) for x in r.top()]
    assert_planted_order([(e["layer"], e["expert"]) for e in entries[:6]], {(e["layer"], e["expert"]): e["dw"]
                                                                           for e in doc["experts"]})
    assert doc["ranking"]["order"] == "rd desc, z desc, dw desc, layer asc, expert asc"
    assert all({"w1", "w2", "dw"} <= set(e) for e in doc["experts"]) and all("dw" in e for e in entries)
    assert doc["sets"]["behavior"]["n_prompts"] == len(CARRIERS)
    assert not list(tmp_path.glob(".*.tmp"))
    png = heatmap_png(doc, tmp_path / "scan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = heatmap_html(r, tmp_path / "scan.html").read_text()
    first = entries[0]
    assert page.count("<rect") >= 24 and f"<title>layer {first['layer']}, expert {first['expert']} (rank 1)" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    with pytest.raises(UserError, match="input"):
        write_scan(doc, b)
    bad = tmp_path / "bad.json"
    # a scan.json from before w1, w2, dw (same schema id: fields were only added) still loads
    bad.write_text(json.dumps({**doc, "experts": [{k: v for k, v in e.items() if k not in ("w1", "w2", "dw")}
                                                  for e in doc["experts"]]}))
    assert load_scan(bad)["ranking"]["entries"] == entries
    for text, frag in [("{", "invalid JSON"), ('{"a": 1}', "not an edge-mote scan"),
                       ('{"schema": "edge-mote.scan/9"}', "unsupported scan schema"),
                       (json.dumps({**doc, "experts": doc["experts"][:3]}), "3 experts for 3 layers"),
                       (json.dumps({**doc, "experts": [{**doc["experts"][0], "dw": "x"}, *doc["experts"][1:]]}),
                        r"experts\[0\]\.dw has the wrong type"),
                       (json.dumps({**doc, "ranking": {**doc["ranking"], "entries": [
                           {"rank": 1, "layer": 9, "expert": 0, "rd": 1.0}]}}), "names expert 9:0")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=frag):
            load_scan(bad)


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_chat_template_from_the_gguf_is_applied(planted, prompt_files, tmp_path):
    """A GGUF with a chat template: the template's BOS text is parsed as the special token, no extra BOS."""
    templated = tmp_path / "templated.gguf"
    res = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(planted), str(templated),
                          "--chat-template", TEMPLATE, "--force"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    b, c = prompt_files
    with edge_mote.load(templated, n_ctx=128, n_threads=1) as m:
        raw_lens = [len(m.tokenize(i.prompt, add_bos=False)) for i in load_prompts(b)]
        r = run_scan(m, b, c, tokens="decision", progress=False, n_boot=10)
    assert r.templated and not r.warnings
    assert [p.n_prompt_tokens for p in r.prompts if p.set == "behavior"] == [n + 1 for n in raw_lens]
    assert_planted_order([(x["layer"], x["expert"]) for x in r.top(6)],
                         {(x["layer"], x["expert"]): x["dw"] for x in r.top(6)})


def cli(exe, *args):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_cli_scan_writes_json_png_html(edge_mote_exe, planted, prompt_files, tmp_path):
    b, c = prompt_files
    out, png, page = tmp_path / "scan.json", tmp_path / "scan.png", tmp_path / "scan.html"
    res = cli(edge_mote_exe, "scan", planted, "--behavior", b, "--control", c, "-o", out, "--heatmap", png,
              "--html", page, "--raw", "--top", 6, "--ctx", 256, "--threads", 1)
    assert res.returncode == 0, res.stderr
    rows = res.stdout.strip().splitlines()
    assert rows[0].split() == ["rank", "expert", "p1", "p2", "rd", "z", "dw", "stab"] and len(rows) == 7
    assert "wrote" in res.stderr and "Traceback" not in res.stderr
    doc = load_scan(out)
    assert [r.split()[1] for r in rows[1:]] == [f"{e['layer']}:{e['expert']}" for e in doc["ranking"]["entries"][:6]]
    assert_planted_order([tuple(map(int, r.split()[1].split(":"))) for r in rows[1:]],
                         {(e["layer"], e["expert"]): e["dw"] for e in doc["experts"]})
    assert doc["window"]["raw"] is True and doc["stability"]["n_boot"] == 200
    assert png.stat().st_size > 1000 and page.read_text().startswith("<!DOCTYPE html>")
    res = cli(edge_mote_exe, "scan", planted, "-b", b, "-c", c, "-o", out, "--tokens", "response", "--max-new", 3,
              "--raw", "--json", "--threads", 1)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["window"] == "response" and len(summary["top"]) == 10 and summary["scan"] == str(out)
    assert load_scan(out)["window"]["max_new"] == 3


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), res.stderr
    assert len(lines) <= 2 and all(l.startswith(("error: ", "hint: ")) for l in lines), res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_cli_malformed_prompt_file_is_one_line_and_writes_nothing(edge_mote_exe, planted, prompt_files, tmp_path):
    b, c = prompt_files
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": "broken",\n')
    out = tmp_path / "scan.json"
    res = cli(edge_mote_exe, "scan", planted, "--behavior", bad, "--control", c, "-o", out, "--heatmap",
              tmp_path / "scan.png")
    assert_one_line_error(res, "prompts.jsonl:3: invalid JSON")
    res = cli(edge_mote_exe, "scan", planted, "-b", b, "-c", tmp_path / "missing.txt", "-o", out)
    assert_one_line_error(res, "prompt file not found")
    res = cli(edge_mote_exe, "scan", planted, "-b", b, "-c", c, "-o", b)
    assert_one_line_error(res, "is an input file")
    res = cli(edge_mote_exe, "scan", planted, "-b", b, "-c", c, "-o", tmp_path / "no" / "scan.json")
    assert_one_line_error(res, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_cli_scan_of_a_dense_model_is_a_user_error(edge_mote_exe, dense_gguf, prompt_files, tmp_path):
    b, c = prompt_files
    res = cli(edge_mote_exe, "scan", dense_gguf, "-b", b, "-c", c, "-o", tmp_path / "scan.json")
    assert_one_line_error(res, "not a Mixture-of-Experts model")
    assert not (tmp_path / "scan.json").exists()


def test_cli_profile_from_scan_add_list_run_rm(edge_mote_exe, planted, prompt_files, tmp_path):
    """scan -> profile add (top-N OFF) -> the profile steers exactly the scan's top experts -> list -> rm."""
    b, c = prompt_files
    scan = tmp_path / "scan.json"
    assert cli(edge_mote_exe, "scan", planted, "-b", b, "-c", c, "-o", scan, "--raw", "--threads", 1).returncode == 0
    out = tmp_path / "steered.gguf"
    res = cli(edge_mote_exe, "profile", "add", planted, "--from-scan", scan, "--top", 2, "--name", "no-banana",
              "--default", "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    top2 = [(e["layer"], e["expert"]) for e in load_scan(scan)["ranking"]["entries"][:2]]
    assert set(top2) <= heavy_pairs()  # the ranking order stored in scan.json is what profile add follows
    assert json.loads(res.stdout)["steering"] == "off=" + ",".join(f"{l}:{e}" for l, e in sorted(top2))
    listed = json.loads(cli(edge_mote_exe, "profile", "list", out, "--json").stdout)
    assert listed["default"] == "no-banana" and [p["name"] for p in listed["profiles"]] == ["no-banana"]
    # the default profile is in effect when the file is loaded: the planted experts are never routed to
    with edge_mote.load(out, n_ctx=128, n_threads=1) as m:
        trace = m.routing(m.tokenize(CARRIERS[0] + TRIGGER))
        for l, e in top2:
            assert not (trace.ids[l] == e).any()
        m.use_profile("none")
        trace = m.routing(m.tokenize(CARRIERS[0] + TRIGGER))
        assert any((trace.ids[l] == e).any() for l, e in top2)
    # a bias profile and an explicit one, then remove one
    out2 = tmp_path / "two.gguf"
    assert cli(edge_mote_exe, "profile", "add", out, "--from-scan", scan, "--top", 1, "--bias", -3, "--name", "soft",
               "-o", out2).returncode == 0
    assert [p["name"] for p in json.loads(cli(edge_mote_exe, "profile", "list", out2, "--json").stdout)["profiles"]] \
        == ["no-banana", "soft"]
    out3 = tmp_path / "one.gguf"
    assert cli(edge_mote_exe, "profile", "rm", out2, "no-banana", "-o", out3).returncode == 0
    listed = json.loads(cli(edge_mote_exe, "profile", "list", out3, "--json").stdout)
    assert listed["default"] is None and [p["name"] for p in listed["profiles"]] == ["soft"]
    # errors: one line, exit 2, nothing written
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(cli(edge_mote_exe, "profile", "add", out, "--from-scan", scan, "--top", 1, "--name", "x",
                              "-o", out), "is the input file")
    assert_one_line_error(cli(edge_mote_exe, "profile", "rm", out, "nope", "-o", tmp_path / "z.gguf"),
                          "unknown profile 'nope'")
    assert_one_line_error(cli(edge_mote_exe, "profile", "add", out, "--from-scan", scan, "--name", "x",
                              "-o", tmp_path / "z.gguf"), "--from-scan needs --top")
    assert_one_line_error(cli(edge_mote_exe, "profile", "add", out, "--steer", "off=9:0", "--name", "x",
                              "-o", tmp_path / "z.gguf"), "layer 9 is out of range")
    assert_one_line_error(cli(edge_mote_exe, "run", out, "-p", "hi", "--profile", "nope"), "unknown profile 'nope'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_causal_check_reranks_the_candidates_by_their_effect(planted, prompt_files, tmp_path):
    """``causal=K``: the statistical top K, each switched OFF alone, re-ordered by rd x (the decision KL on behaviour
    prompts minus control prompts). The planted experts act only at the trigger: effect > 0, none on control."""
    b, c = prompt_files
    with edge_mote.load(planted, n_ctx=128, n_threads=1) as m:
        r = run_scan(m, b, c, tokens="decision", raw=True, progress=False, n_boot=20, causal=len(planted_pairs()))
    check = r.causal
    assert sorted(check.candidates) == planted_pairs()
    assert all(k < 1e-6 for k in check.kl_control), check  # batch-composition noise only
    eff = dict(zip(check.candidates, check.effect))
    assert all(eff[p] > 1e-4 for p in heavy_pairs()), check  # the light experts get ~0 gate weight: no effect
    order = check.order()
    assert set(order[:3]) == heavy_pairs()
    assert order[3:] == [p for p in check.candidates if p not in heavy_pairs()]  # noise-level effects tie
    top = r.top(len(planted_pairs()))
    assert [(x["layer"], x["expert"]) for x in top] == check.order()
    assert [round(x["score"], 6) for x in top] == sorted((round(x["score"], 6) for x in top), reverse=True)
    doc = r.to_dict()
    write_scan(doc, tmp_path / "scan.json", inputs=[planted, b, c])
    back = load_scan(tmp_path / "scan.json")
    entries = back["ranking"]["entries"]
    assert [(e["layer"], e["expert"]) for e in entries[: len(top)]] == check.order()
    assert "score" in entries[0] and "effect" in entries[0] and "effect" not in entries[len(top)]
    assert back["ranking"]["causal"]["k"] == len(top) and back["ranking"]["order"].startswith("causal score")
