"""Steering is refused on architectures where it cannot be verified (edge_mote/arch_support.py), without native code:
the checks run before anything reaches llama.cpp."""

from __future__ import annotations

import threading
import warnings

import pytest

from edge_mote import arch_support as A
from edge_mote.errors import UserError
from edge_mote.runtime.model import Model, ModelInfo
from edge_mote.runtime.parallel import ParallelContext
from edge_mote.steering import Steering

DISAGREEING = sorted({a.gguf_arch for a in A.ARCHITECTURES.values() if a.status == "disagrees"})
VERIFIED = sorted({a.gguf_arch for a in A.ARCHITECTURES.values() if a.status == "verified"})
STEERINGS = ["off=0:1", "on=1:2", "drop=0:3", "bias=1:0=2.5", {"off": [[0, 1]]}, Steering(off=[(1, 5)])]


def test_the_three_disagreeing_architectures():
    assert DISAGREEING == ["granitehybrid", "minimax01", "phimoe"]


@pytest.mark.parametrize("arch", DISAGREEING)
def test_check_refuses_disagreeing_architectures_in_one_line(arch):
    with pytest.raises(UserError) as e:
        A.check_steerable(arch)
    msg = str(e.value)
    assert arch in msg and "cannot be verified" in msg and "\n" not in msg
    assert e.value.hint and "\n" not in e.value.hint


@pytest.mark.parametrize("arch", VERIFIED)
def test_check_accepts_verified_architectures_silently(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.check_steerable(arch)


def test_untested_architectures_warn_once(monkeypatch):
    monkeypatch.setattr(A, "_warned", set())
    assert A.gguf_arch_status("dbrx") == "untested"
    assert A.gguf_arch_status("some-future-moe") == "untested"
    with pytest.warns(A.UnverifiedArchitectureWarning, match="dbrx"):
        A.check_steerable("dbrx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.check_steerable("dbrx")  # once per architecture and process
    with pytest.warns(A.UnverifiedArchitectureWarning, match="some-future-moe"):
        A.check_steerable("some-future-moe")


def _fake_model(arch: str) -> Model:
    """A Model with an architecture's shape and no native handles (the steering checks come before them)."""
    m = Model.__new__(Model)
    m._lock = threading.RLock()
    m._llm = object()
    m._parallel = None
    m._n_ctx = 64
    m._steering = Steering()
    m._profiles = {}
    m.info = ModelInfo(path=f"/models/{arch}.gguf", arch=arch, name=None, n_layer=2, moe_layers=(0, 1), n_expert=8,
                       n_expert_used={0: 2, 1: 2}, n_vocab=100, n_ctx_train=64, profiles=(), default_profile=None,
                       file_bytes=0)
    return m


@pytest.mark.parametrize("arch", DISAGREEING)
@pytest.mark.parametrize("steering", STEERINGS, ids=str)
def test_model_refuses_every_kind_of_steering(arch, steering):
    m = _fake_model(arch)
    with pytest.raises(UserError, match=f"'{arch}'"):
        m.set_steering(steering)
    with pytest.raises(UserError, match=f"'{arch}'"):
        with m.steer(steering):
            pass
    for call in (lambda: m.logits_many([[1, 2, 3], [4]], steerings=[None, steering]),
                 lambda: m.routing_many([[1, 2, 3]], steerings=[steering]),
                 lambda: m.greedy_many([[1, 2, 3]], 4, steerings=[steering]),
                 lambda: m.score_many([[1, 2, 3]], [0], steerings=[steering])):
        with pytest.raises(UserError, match=f"'{arch}'"):
            call()
    assert not m.steering  # nothing was applied


@pytest.mark.parametrize("arch", DISAGREEING)
def test_per_sequence_steering_of_a_batched_context_is_refused(arch):
    pc = ParallelContext.__new__(ParallelContext)
    pc._model, pc.n_seq, pc._seq_steering = _fake_model(arch), 4, {}
    with pytest.raises(UserError, match=f"'{arch}'"):
        pc.set_sequence_steering(1, Steering.parse("off=0:1"))
    assert pc._seq_steering == {}


@pytest.mark.parametrize("arch", DISAGREEING)
def test_stored_profiles_are_refused_too(arch):
    from edge_mote.gguf_meta.profiles import Profile

    m = _fake_model(arch)
    m._profiles = {"p": Profile("p", Steering.parse("off=0:1"), "")}
    with pytest.raises(UserError, match=f"'{arch}'"):
        m.use_profile("p")


def test_no_steering_is_never_refused():
    m = _fake_model("phimoe")
    m._check_steerings([None, None], 2)
    assert m._check_steerings(None, 0) is None


def test_the_cli_shows_the_warning_as_one_line(monkeypatch, capsys):
    from edge_mote.cli import _one_line_warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    monkeypatch.setattr(A, "_warned", set())
    _one_line_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        A.check_steerable("dbrx")
    err = capsys.readouterr().err
    assert err.startswith("warning: steering architecture 'dbrx'") and err.count("\n") == 1
