"""The scan's causal check (edge_mote/ftri/causal.py) on a fake model: candidates re-ranked by the measured effect
of switching each OFF on the decision, behaviour minus control."""

from __future__ import annotations

import numpy as np

from edge_mote.ftri.causal import CausalCheck, causal_check, subsample
from edge_mote.steering import Steering

V = 5


class FakeModel:
    """Logits at the last token depend on which experts are OFF: expert (1, 0) carries the behaviour (flips the
    decision of prompts starting with token 1), (2, 3) moves every prompt a little, (0, 0) does nothing."""

    steering = Steering()

    def score_many(self, seqs, first, reduce=None, tick=None, steerings=None):
        out = []
        for i, (s, f) in enumerate(zip(seqs, first)):
            st = (steerings or [None] * len(seqs))[i] or Steering()
            row = np.zeros(V)
            behaviour = s[0] == 1
            row[0 if behaviour else 1] = 5.0
            if (1, 0) in st.off and behaviour:
                row[[0, 2]] = row[[2, 0]]
            if (2, 3) in st.off:
                row[3] += 1.0
            rows = row[None, :].astype(np.float32)
            assert f == len(s) - 1
            out.append(reduce(i, rows) if reduce else rows)
        return out


def test_effect_orders_the_candidates():
    behaviour = [[1, 7, 8], [1, 9]]
    control = [[2, 7, 8], [3, 4, 5, 6]]
    c = causal_check(FakeModel(), behaviour, control, [(0, 0), (2, 3), (1, 0)], [1.0, 1.0, 0.5])
    assert c.candidates == ((0, 0), (2, 3), (1, 0))
    eff = dict(zip(c.candidates, c.effect))
    assert eff[(0, 0)] == 0.0
    assert abs(eff[(2, 3)]) < 1e-6          # moves behaviour and control alike
    assert eff[(1, 0)] > 1.0                # flips the behaviour decision only
    assert c.order() == [(1, 0), (0, 0), (2, 3)]  # the two without effect keep their order
    assert c.record(1, 0)["effect"] == eff[(1, 0)] and c.record(5, 5) is None
    d = c.to_dict()
    assert d["k"] == 3 and d["n_behavior"] == 2 and [x["layer"] for x in d["candidates"]] == [0, 2, 1]


def test_ties_keep_the_statistical_order():
    c = CausalCheck(((3, 1), (2, 2), (1, 3)), (1.0, 1.0, 1.0), (0.5, 0.5, 0.9), (0.0, 0.0, 0.0), 4, 4)
    assert c.order() == [(1, 3), (3, 1), (2, 2)]


def test_the_score_weighs_the_effect_by_the_risk_difference():
    """An expert every prompt selects (rd ~ 0) whose removal disrupts everything, more so on behaviour prompts,
    does not overtake a specific carrier with a smaller effect (organism seed 1's 0:3 and 1:1)."""
    c = CausalCheck(((3, 10), (2, 6), (1, 1), (0, 3)), (1.0, 1.0, 1.0, 0.02), (5.2, 0.098, 0.30, 0.68),
                    (0.0, 0.0, 0.0, 0.29), 64, 64)
    assert c.order() == [(3, 10), (1, 1), (2, 6), (0, 3)]
    assert max(range(4), key=lambda i: c.effect[i] if i else -1) == 3  # by effect alone 0:3 would come second


def test_subsample_is_even_and_deterministic():
    assert subsample(list(range(5)), 10) == [0, 1, 2, 3, 4]
    assert subsample(list(range(100)), 3) == [0, 50, 99]
