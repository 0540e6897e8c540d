"""Prompt sets for the fTRI scan: the three file formats, their one-line errors, and chat-template rendering."""

from __future__ import annotations

import json

import pytest

from edge_mote.errors import UserError
from edge_mote.ftri.prompts import ChatTemplate, PromptItem, PromptSet, load_prompts, render

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(path) -> str:
    with pytest.raises(UserError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_jsonl_prompt_messages_answer_id(tmp_path):
    p = write(tmp_path, "set.jsonl", "\n".join([
        json.dumps({"prompt": "How do I bake bread?", "answer": "Knead.", "id": "bread"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        json.dumps({"prompt": "Third", "id": 7, "label": "ignored"}),
    ]) + "\n")
    s = load_prompts(p)
    assert len(s) == 3 and s.name == "set.jsonl"
    a, b, c = s.items
    assert (a.id, a.prompt, a.answer, a.source) == ("bread", "How do I bake bread?", "Knead.", "set.jsonl:1")
    assert b.id == "3" and b.prompt is None and b.messages[1] == {"role": "user", "content": "Hi"}
    assert b.raw_text() == "Be brief.\n\nHi"
    assert c.id == "7" and c.as_messages() == [{"role": "user", "content": "Third"}]


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "ok"', "invalid JSON"),
    ('{"text": "no"}', 'expected "prompt" or "messages"'),
    ('{"prompt": "a", "messages": []}', "not both"),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": 3}', '"prompt" must be a non-empty string'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}', 'messages[0] needs a "content" string'),
    ('{"messages": [{"content": "x"}]}', 'messages[0] needs a "role"'),
    ('{"prompt": "a", "answer": 1}', '"answer" must be a string'),
    ('{"prompt": "a", "id": [1]}', '"id" must be a string or an integer'),
    ('["prompt"]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, fragment):
    p = write(tmp_path, "prompts.jsonl", '{"prompt": "fine"}\n\n' + line + "\n")
    msg = error_of(p)
    assert msg.startswith("prompts.jsonl:3: "), msg
    assert fragment in msg, msg


def test_template_file_expands_product_of_used_slots(tmp_path):
    p = write(tmp_path, "t.json", json.dumps({
        "templates": ["What happened {time} in {place}?", "Tell me about {place}.", "{{literal}} {time}"],
        "slots": {"time": ["in 1989", "yesterday"], "place": ["A", "B", "C"], "unused": ["x"]},
    }))
    s = load_prompts(p)
    texts = [i.prompt for i in s]
    assert len(texts) == 2 * 3 + 3 + 2
    assert texts[0] == "What happened in 1989 in A?" and texts[5] == "What happened yesterday in C?"
    assert texts[6:9] == ["Tell me about A.", "Tell me about B.", "Tell me about C."]
    assert texts[9:] == ["{literal} in 1989", "{literal} yesterday"]
    assert s.items[0].id == "t1|time=in 1989|place=A"
    assert len({i.id for i in s}) == len(texts)


@pytest.mark.parametrize("doc, fragment", [
    ({"templates": ["What about {place}?"], "slots": {"time": ["x"]}}, 'unknown slot "place"'),
    ({"templates": ["What about {place}?"], "slots": {"place": []}}, 'slot "place" has an empty list'),
    ({"templates": [], "slots": {}}, '"templates" must be a non-empty list'),
    ({"templates": ["{0}"], "slots": {}}, "slot names must be identifiers"),
    ({"templates": ["{a!r}"], "slots": {"a": ["x"]}}, "format spec or conversion"),
    ({"templates": ["{a"], "slots": {"a": ["x"]}}, "malformed template"),
    ({"templates": ["{a}"], "slots": {"a": "x"}}, 'slot "a" must be a list of strings'),
    ({"prompts": ["x"]}, '"templates"'),
])
def test_template_file_errors(tmp_path, doc, fragment):
    msg = error_of(write(tmp_path, "t.json", json.dumps(doc)))
    assert msg.startswith("t.json"), msg
    assert fragment in msg, msg


def test_template_file_invalid_json_names_line(tmp_path):
    msg = error_of(write(tmp_path, "t.json", '{\n  "templates": ["a",\n}\n'))
    assert msg.startswith("t.json:3: invalid JSON"), msg


def test_txt_comments_blank_lines_and_escaped_hash(tmp_path):
    s = load_prompts(write(tmp_path, "p.txt", "# a comment\n\nFirst prompt\n   # indented comment\n\\#hashtag prompt\nLast\n"))
    assert [i.prompt for i in s] == ["First prompt", "#hashtag prompt", "Last"]
    assert [i.source for i in s] == ["p.txt:3", "p.txt:5", "p.txt:6"]


@pytest.mark.parametrize("name, text, fragment", [
    ("empty.jsonl", "\n\n", "no prompts"),
    ("empty.txt", "# only comments\n", "no prompts"),
    ("p.csv", "a,b\n", "unknown prompt file type"),
])
def test_empty_and_unknown_files(tmp_path, name, text, fragment):
    assert fragment in error_of(write(tmp_path, name, text))


def test_missing_and_binary_files(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.jsonl")
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert error_of(bad) == "bin.txt:2: not valid UTF-8"
    assert "directory" in error_of(tmp_path)


def test_from_texts():
    s = PromptSet.from_texts(["a", "b"], name="mine")
    assert [i.source for i in s] == ["mine:1", "mine:2"]
    with pytest.raises(UserError, match="no prompts"):
        PromptSet.from_texts([])


def test_render_with_template_raw_and_fallback():
    item = PromptItem(id="1", source="x.jsonl:1", prompt="Hello")
    r = render(CHATML, item)
    assert r.templated and not r.fallback
    assert r.text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert render(CHATML, item, raw=True).text == "Hello" and not render(CHATML, item, raw=True).templated
    fb = render(None, item)
    assert fb.text == "Hello" and fb.fallback and not fb.templated and "no chat template" in fb.warning
    conv = PromptItem(id="2", source="x.jsonl:2",
                      messages=({"role": "system", "content": "S"}, {"role": "user", "content": "U"}))
    assert render(ChatTemplate(CHATML), conv).text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU")


def test_render_bos_tojson_and_template_errors():
    item = PromptItem(id="1", source="set.jsonl:4", prompt="q")
    tpl = ChatTemplate("{{ bos_token }}{{ messages | tojson }}{% generation %}g{% endgeneration %}", bos_token="<s>")
    assert render(tpl, item).text == '<s>[{"role": "user", "content": "q"}]g'
    failing = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('Conversation must start with system') }}{% endif %}"
    with pytest.raises(UserError) as e:
        render(failing, item)
    assert str(e.value) == "set.jsonl:4: the chat template failed: Conversation must start with system"
    with pytest.raises(UserError, match="set.jsonl:4: the chat template failed: TemplateSyntaxError"):
        render("{% if %}", item)
