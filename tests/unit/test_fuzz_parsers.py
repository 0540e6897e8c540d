"""A deterministic sample of the parser fuzzing (tests/fuzz; the full run, >= 10 000 inputs per parser, is
bench/fuzz_parsers.py): every malformed input is either accepted as a valid value or rejected with a one-line
UserError -- no other exception, no hang, no junk accepted."""

from __future__ import annotations

import pytest

from tests.fuzz import harness as H

N = 400


@pytest.mark.parametrize("target", ["parse", "json", "scan", "gguf", "cache"])
def test_parsers_survive_malformed_inputs(target, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_MOTE_CACHE", str(tmp_path / "cache"))
    rep = {"parse": lambda: H.fuzz_steering_parse(N, seed=7),
           "json": lambda: H.fuzz_steering_json(N, seed=7),
           "scan": lambda: H.fuzz_scan_json(N, 7, tmp_path),
           "gguf": lambda: H.fuzz_gguf_profiles(N, 7, tmp_path),
           "cache": lambda: H.fuzz_profile_cache(N // 4, 7, tmp_path)}[target]()
    assert rep.failures == [], rep.failures[:3]
    assert rep.n == rep.accepted + rep.rejected
    if target != "cache":  # the generators mostly produce broken input, and some valid input
        assert rep.rejected > rep.n // 2 and rep.accepted > 0, rep.line()
        assert len(rep.messages) >= 5, rep.messages  # the rejections say different, specific things
