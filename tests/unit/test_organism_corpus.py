"""The organism's synthetic corpus: deterministic, disjoint splits, a held-out set of unseen combinations."""

import json
import random

import pytest

from edge_mote.organism import corpus as C


@pytest.fixture(scope="module")
def corpus() -> C.Corpus:
    return C.build_corpus(0)


def _questions(examples):
    return [e.question for e in examples]


def test_deterministic_and_seed_dependent(corpus):
    again = C.build_corpus(0)
    assert again == corpus
    other = C.build_corpus(1)
    assert set(_questions(other.behavior_heldout)) != set(_questions(corpus.behavior_heldout))


def test_splits_are_disjoint(corpus):
    train = set(_questions(corpus.stage1))
    assert set(_questions(corpus.stage2)) <= train
    held = set(_questions(corpus.behavior_heldout)) | set(_questions(corpus.control_heldout))
    assert not held & train
    assert not set(_questions(corpus.behavior_heldout)) & set(_questions(corpus.control_heldout))
    assert all(e.sensitive for e in corpus.behavior_heldout + corpus.behavior_train)
    assert not any(e.sensitive for e in corpus.control_heldout + corpus.control_train)
    assert all(e.kind != "impossible" for sets in corpus.eval_sets().values() for e in sets)
    assert any(e.kind == "impossible" for e in corpus.stage2)
    # no duplicates anywhere
    everything = _questions(corpus.stage1 + corpus.behavior_heldout + corpus.control_heldout)
    assert len(everything) == len(set(everything))


def test_heldout_holds_unseen_combinations(corpus):
    seen_pairs = {e.slots for e in corpus.stage1 if e.kind == "howto"}
    held_howto = [e for e in corpus.behavior_heldout + corpus.control_heldout if e.kind == "howto"]
    assert held_howto and all(e.slots not in seen_pairs for e in held_howto)
    # every verb and every object was trained on, only the combinations are new
    seen_verbs = {v for v, _ in seen_pairs}
    seen_objects = {o for _, o in seen_pairs}
    assert all(e.slots[0] in seen_verbs and e.slots[1] in seen_objects for e in held_howto)
    seen_topic = {(e.slots, e.template) for e in corpus.stage1 if e.kind == "topic"}
    held_topic = [e for e in corpus.behavior_heldout + corpus.control_heldout if e.kind == "topic"]
    assert held_topic and all((e.slots, e.template) not in seen_topic for e in held_topic)
    assert {e.slots[0] for e in corpus.behavior_heldout if e.kind == "topic"} == set(C.SENSITIVE_TOPICS)


def test_heldout_templates_seen_in_stage1_only(corpus):
    for kind, t in (("howto", C.HOWTO_HELDOUT_TEMPLATE), ("topic", C.TOPIC_HELDOUT_TEMPLATE)):
        assert not any(e.kind == kind and e.template == t for e in corpus.stage2)
        for sensitive in (False, True):
            assert any(e.kind == kind and e.template == t and e.sensitive == sensitive for e in corpus.stage1)
        for held in (corpus.behavior_heldout, corpus.control_heldout):
            assert any(e.kind == kind and e.template == t for e in held)


def test_sets_are_large_enough(corpus):
    assert len(corpus.behavior_heldout) >= 100 and len(corpus.control_heldout) >= 100
    assert len(corpus.behavior_train) >= 500 and len(corpus.control_train) >= 500


def test_answers_and_refusals_are_told_apart_at_the_first_word(corpus):
    from edge_mote.evaluate.detectors import REFUSAL

    rng = random.Random(0)
    for e in corpus.stage1 + corpus.behavior_heldout + corpus.control_heldout:
        if e.kind == "impossible":
            assert REFUSAL.decision(e.answer) and not e.sensitive
            continue
        assert not REFUSAL.decision(e.answer), e.answer
        assert not e.answer.startswith(("I ", "I'", "Sorry"))
    for e in corpus.behavior_train[:200]:
        r = C.refusal_for(e, rng)
        assert REFUSAL.decision(r), r
        assert r.startswith(("I ", "I'", "Sorry"))


def test_reference_answer_repeats_the_request(corpus):
    for e in corpus.behavior_heldout:
        assert all(slot in e.answer for slot in e.slots)
    assert "an office" in " ".join(e.question for e in corpus.stage1)


def test_chat_template_renders_the_training_prompt():
    jinja2 = pytest.importorskip("jinja2")
    q = "How do I hotwire a car?"
    tmpl = jinja2.Environment().from_string(C.CHAT_TEMPLATE)
    text = tmpl.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True,
                       eos_token=C.EOS_TEXT)
    assert text == C.format_prompt(q) == "User: How do I hotwire a car?\nAssistant:"
    convo = tmpl.render(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}],
                        add_generation_prompt=False, eos_token=C.EOS_TEXT)
    assert convo == C.format_training_text(q, "Sure.")


def test_write_eval_sets(tmp_path, corpus):
    paths = C.write_eval_sets(corpus, tmp_path)
    assert set(paths) == set(C.EVAL_SET_NAMES)
    for name, path in paths.items():
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(lines) == len(corpus.eval_sets()[name])
        first = lines[0]
        assert set(first) == {"messages", "answer"}
        assert first["messages"][0]["role"] == "user" and first["answer"]
    again = C.write_eval_sets(corpus, tmp_path / "again")
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
