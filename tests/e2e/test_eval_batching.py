"""The evaluation table does not depend on which configurations share decodes (issue #11): measuring every
configuration in shared decodes (each sequence with its own steering) gives the very same numbers as measuring one
configuration after another, on the model organism."""

from __future__ import annotations

import pytest

import edge_mote
from edge_mote.api import prepare_prompts
from edge_mote.evaluate.protocol import evaluate
from edge_mote.ftri.prompts import load_prompts

RANKING = [(1, 6), (2, 7), (3, 7), (0, 3), (1, 15)]  # any ranking will do: the property holds for every steering


@pytest.fixture(scope="module")
def organism(models_dir):
    from edge_mote.organism.train import build_organism

    return build_organism(models_dir / "organism", seed=0, progress=False)


def test_all_configurations_batched_equal_one_after_another(organism):
    with edge_mote.load(organism.gguf, n_ctx=512, n_threads=2) as m:
        b = prepare_prompts(m, load_prompts(organism.sets["behavior_heldout"]))[:16]
        c = prepare_prompts(m, load_prompts(organism.sets["control_heldout"]))[:16]
        kw = dict(tops=(2,), modes=("off", "on"), random_trials=1, seed=0, max_new=10)
        together = evaluate(m, b, c, RANKING, batch_configurations=True, **kw)
        apart = evaluate(m, b, c, RANKING, batch_configurations=False, **kw)
    assert [r.name for r in together.rows] == [r.name for r in apart.rows]
    for x, y in zip(together.rows, apart.rows):
        # exact equality of the unrounded floats (repr: nan == nan)
        assert repr(x.values) == repr(y.values), x.name
        assert repr(x.sd) == repr(y.sd), x.name
    # and the configurations differ from each other, so the comparison means something
    assert together.row("top-2 off").values != together.row("unsteered").values
