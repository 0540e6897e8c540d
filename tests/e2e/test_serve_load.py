"""A smaller run of bench/load_serve.py: concurrent clients with alternating steering (none / profile as model /
random OFF / ON) on the organism through `edge-mote serve`: no failed request, no cross-talk (each greedy answer
equals the same request served alone), and the requests really shared decode steps."""

from __future__ import annotations

import sys

from .serve_util import REPO, Server, organism_with_profile

sys.path.insert(0, str(REPO / "bench"))
from load_serve import make_requests, run_load  # noqa: E402


def test_mixed_steering_under_load_has_no_failures_and_no_crosstalk(models_dir, tmp_path):
    from edge_mote.ftri.prompts import load_prompts
    from edge_mote.organism.train import build_organism

    path, _, meta = organism_with_profile(models_dir, tmp_path)
    org = build_organism(models_dir / "organism", seed=0, progress=False)
    prompts = [it.prompt or it.as_messages()[-1]["content"]
               for name in ("behavior_heldout", "control_heldout") for it in load_prompts(org.sets[name])][::3]
    rec = meta["recipe"]
    reqs = make_requests(40, prompts, (rec["n_expert"], rec["top_k"], rec["n_layer"]), max_tokens=12)
    server = Server(path, "--parallel", "8", "--ctx", "256", "--threads", "1")
    try:
        res = run_load(server.url, reqs, clients=8)
    finally:
        server.close()
    assert res["failed"] == 0, res["errors"]
    assert res["crosstalk"] == 0, res["crosstalk_examples"]
    assert res["max_seqs_in_step"] >= 4                      # concurrent requests were decoded together
    assert res["steps"] < res["generated_tokens"] / 2          # ... in fewer decodes than tokens
    # the steering took effect: the profile (refusal experts OFF) answers some prompts unlike no steering
    texts = res["texts"]
    assert [r["kind"] for r in reqs[:2]] == ["none", "profile"]
    assert any(texts[i] != texts[i + 1] for i in range(0, len(reqs) - 1, 4))
