"""Steering: parsing, value semantics and validation against a model's shape (no native library needed)."""

import numpy as np
import pytest

from edge_mote import Steering, UserError

MOE = [1, 2, 3]          # layer 0 is dense
K = {1: 2, 2: 2, 3: 2}   # top-2


def test_parse_and_str_round_trip():
    s = Steering.parse("off=1:3,2:7; drop=3:1 ;on=2:0;bias=1:5=-2.5,3:4=1;margin=0.5")
    assert s.off == {(1, 3), (2, 7)}
    assert s.drop == {(3, 1)}
    assert s.on == {(2, 0)}
    assert s.bias == {(1, 5): -2.5, (3, 4): 1.0}
    assert s.margin == 0.5
    assert Steering.parse(str(s)) == s


def test_json_round_trip_and_dict_bias_form():
    s = Steering(off=[(1, 2)], bias={(2, 3): 0.25})
    assert Steering.from_json(s.to_json()) == s
    assert Steering.from_dict({"bias": {"2:3": 0.25}, "off": [[1, 2]]}) == s
    assert Steering.parse(s.to_json()) == s


def test_immutable_hashable_and_combinable():
    a, b = Steering.parse("off=1:1"), Steering.parse("off=2:2;bias=1:0=1")
    c = a | b
    assert c.off == {(1, 1), (2, 2)} and c.bias == {(1, 0): 1.0}
    assert len({a, Steering.parse("off=1:1")}) == 1
    with pytest.raises(AttributeError):
        a.margin = 3  # frozen
    assert not Steering() and bool(a)


@pytest.mark.parametrize("text, msg", [
    ("off=1", "expected LAYER:EXPERT"),
    ("off=a:b", "must be integers"),
    ("off=-1:2", ">= 0"),
    ("bias=1:2", "LAYER:EXPERT=VALUE"),
    ("bias=1:2=x", "must be a number"),
    ("bias=1:2=nan", "finite"),
    ("wat=1:2", "unknown steering part"),
    ("off", "expected off="),
    ("off=1:2;on=1:2", "both off and on"),
    ("off=1:2;bias=1:2=1", "also has a bias"),
    ("margin=-1", "margin"),
    ("{bad json", "not valid JSON"),
])
def test_malformed_steering_is_a_user_error(text, msg):
    with pytest.raises(UserError, match=msg):
        Steering.parse(text)


def test_to_arrays_codes_and_bias():
    s = Steering.parse("off=1:0;on=2:1;drop=3:2;bias=1:3=-1.5")
    state, bias = s.to_arrays(4, 4, MOE, K)
    assert state.dtype == np.int8 and state.shape == (4, 4)
    assert (state[1, 0], state[2, 1], state[3, 2]) == (1, 2, 3)
    assert int((state != 0).sum()) == 3
    assert bias[1, 3] == np.float32(-1.5) and int((bias != 0).sum()) == 1
    assert Steering.from_arrays(state, bias, s.margin) == s


@pytest.mark.parametrize("text, msg", [
    ("off=4:0", "layer 4 is out of range: the model has 4 layers"),
    ("off=1:9", "expert 9 is out of range"),
    ("off=0:1", "layer 0 is a dense layer"),
    ("off=1:0,1:1,1:2", "3 of 4 experts are OFF, but each token is routed to 2"),
    ("on=1:0,1:1,1:2", "3 experts are ON, but each token is routed to only 2"),
])
def test_to_arrays_rejects_what_the_model_cannot_do(text, msg):
    with pytest.raises(UserError, match=msg):
        Steering.parse(text).to_arrays(4, 4, MOE, K)
