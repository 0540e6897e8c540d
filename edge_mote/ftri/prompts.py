"""Prompt sets for the fTRI scan, and how a prompt becomes the text the model reads.

Three file formats (chosen by the file's extension):

``.jsonl`` (or ``.ndjson``)
    One JSON object per line (blank lines are skipped)::

        {"prompt": "raw or user text"}
        {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}

    with optional ``"answer"`` (a reference answer, a string) and ``"id"`` (a string or integer; default: the line
    number). Exactly one of ``"prompt"`` and ``"messages"``; other keys are ignored.

``.json``
    A template file, expanded as the product of the lists of the slots each template uses::

        {"templates": ["What happened {time} in {place}?", ...], "slots": {"time": [...], "place": [...]}}

    ``{{`` and ``}}`` are literal braces. A template naming a slot that ``slots`` lacks, or a slot with an empty
    list, is an error.

``.txt``
    One prompt per line; blank lines and lines starting with ``#`` are skipped (``\\#`` starts a prompt with ``#``).

Malformed input raises :class:`~edge_mote.errors.UserError` naming the file and line
(``prompts.jsonl:7: invalid JSON (...)``); an empty set is an error too.

:func:`render` turns an item into text: the model's chat template from the GGUF (``tokenizer.chat_template``,
rendered with jinja2 the way llama-cpp-python's ``Jinja2ChatFormatter`` does, ``add_generation_prompt=True``),
or the raw text. A ``"messages"`` item rendered raw is its contents joined by blank lines.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import UserError

__all__ = ["PromptItem", "PromptSet", "ChatTemplate", "Rendered", "load_prompts", "render", "parse_jsonl",
           "parse_templates", "parse_txt"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class PromptItem:
    """One prompt: either raw/user text (``prompt``) or a conversation (``messages``)."""

    id: str
    source: str                                   # "file:line" (or "file:template N") for error messages
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    answer: str | None = None

    def as_messages(self) -> list[dict[str, str]]:
        """The conversation to give a chat template (a ``prompt`` is one user turn)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def raw_text(self) -> str:
        """The text used without a chat template."""
        if self.messages is not None:
            return "\n\n".join(m["content"] for m in self.messages)
        return self.prompt or ""


@dataclass(frozen=True)
class PromptSet:
    """A named, non-empty list of prompts read from one file."""

    path: str
    items: tuple[PromptItem, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @classmethod
    def from_texts(cls, texts: Iterable[str], name: str = "<list>") -> "PromptSet":
        """A set from plain strings (for the Python API and tests)."""
        items = tuple(PromptItem(id=str(i + 1), source=f"{name}:{i + 1}", prompt=t) for i, t in enumerate(texts))
        if not items:
            raise UserError(f"{name}: no prompts")
        bad = next((it for it in items if not isinstance(it.prompt, str) or not it.prompt), None)
        if bad is not None:
            raise UserError(f"{bad.source}: a prompt must be a non-empty string")
        return cls(path=name, items=items)


# -- parsing -----------------------------------------------------------------------------------------------------
def _where(name: str, line: int | str) -> str:
    return f"{name}:{line}"


def _parse_messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(f'{where}: messages[{i}] must be an object with "role" and "content"')
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise UserError(f'{where}: messages[{i}] needs a "role" (a non-empty string)')
        if not isinstance(content, str):
            raise UserError(f'{where}: messages[{i}] needs a "content" string')
        out.append({"role": role, "content": content})
    return tuple(out)


def _parse_object(obj: Any, name: str, line: int) -> PromptItem:
    where = _where(name, line)
    if not isinstance(obj, dict):
        raise UserError(f'{where}: expected a JSON object with "prompt" or "messages", got {type(obj).__name__}')
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise UserError(f'{where}: expected "prompt" or "messages"' + (" (not both)" if has_p else ""))
    prompt = messages = None
    if has_p:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f'{where}: "prompt" must be a non-empty string')
    else:
        messages = _parse_messages(obj["messages"], where)
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise UserError(f'{where}: "answer" must be a string')
    ident = obj.get("id", line)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise UserError(f'{where}: "id" must be a string or an integer')
    return PromptItem(id=str(ident), source=where, prompt=prompt, messages=messages, answer=answer)


def parse_jsonl(text: str, name: str) -> list[PromptItem]:
    """Items of a JSONL prompt file (``name`` is used in error messages)."""
    items = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{_where(name, line_no)}: invalid JSON ({e.msg} at column {e.colno})") from None
        items.append(_parse_object(obj, name, line_no))
    return items


def _template_fields(template: str, where: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"{where}: malformed template ({e})") from None
    fields = []
    for _, fname, spec, conv in parsed:
        if fname is None:
            continue
        if not fname or not fname.isidentifier():
            raise UserError(f"{where}: slot names must be identifiers, got '{{{fname}}}'",
                            hint="write {{ and }} for literal braces")
        if spec or conv:
            raise UserError(f"{where}: slot '{{{fname}}}' may not have a format spec or conversion")
        if fname not in fields:
            fields.append(fname)
    return fields


def parse_templates(text: str, name: str) -> list[PromptItem]:
    """Items of a template file: every template expanded over the product of its slots' lists."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{_where(name, e.lineno)}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict) or "templates" not in doc:
        raise UserError(f'{name}: a .json prompt file must be an object with "templates" (and "slots")',
                        hint="use .jsonl for one prompt per line")
    templates, slots = doc["templates"], doc.get("slots", {})
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t for t in templates):
        raise UserError(f'{name}: "templates" must be a non-empty list of non-empty strings')
    if not isinstance(slots, dict):
        raise UserError(f'{name}: "slots" must be an object mapping slot names to lists of strings')
    for key, values in slots.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f'{name}: slot "{key}" must be a list of strings')
    items = []
    for ti, template in enumerate(templates, 1):
        where = f"{name}: template {ti}"
        fields = _template_fields(template, where)
        for f in fields:
            if f not in slots:
                raise UserError(f'{where}: unknown slot "{f}"', hint=f"slots: {', '.join(slots) or 'none defined'}")
            if not slots[f]:
                raise UserError(f'{where}: slot "{f}" has an empty list')
        for combo in itertools.product(*(slots[f] for f in fields)):
            values = dict(zip(fields, combo))
            prompt = template.format(**values)
            ident = f"t{ti}" + "".join(f"|{f}={v}" for f, v in values.items())
            items.append(PromptItem(id=ident, source=where, prompt=prompt))
    return items


def parse_txt(text: str, name: str) -> list[PromptItem]:
    """Items of a text file: one prompt per line, ``#`` comments and blank lines skipped."""
    items = []
    for line_no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompt = line.rstrip("\r\n")
        if prompt.lstrip().startswith("\\#"):
            prompt = prompt.replace("\\#", "#", 1)
        items.append(PromptItem(id=str(line_no), source=_where(name, line_no), prompt=prompt))
    return items


def load_prompts(path: str | Path) -> PromptSet:
    """Read a prompt set (``.jsonl``/``.ndjson``, template ``.json`` or ``.txt``); bad input → ``UserError``."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        raise UserError(f"prompt file {path} is a directory")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{name}:{line}: not valid UTF-8") from None
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        items = parse_jsonl(text, name)
    elif suffix == ".json":
        items = parse_templates(text, name)
    elif suffix == ".txt":
        items = parse_txt(text, name)
    else:
        raise UserError(f"{name}: unknown prompt file type '{p.suffix or '(none)'}'",
                        hint=".jsonl (one JSON object per line), .json (templates + slots) or .txt (one per line)")
    if not items:
        raise UserError(f"{name}: no prompts in the file")
    return PromptSet(path=str(p), items=tuple(items))


# -- rendering ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _compile(source: str):
    """Compile a chat template like llama-cpp-python's Jinja2ChatFormatter (sandboxed, trim/lstrip blocks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """Pass-through for Hugging Face's ``{% generation %}`` tag."""

        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja2 chat template and the special-token texts it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_model(cls, model: Any) -> "ChatTemplate | None":
        """The GGUF's ``tokenizer.chat_template`` of a loaded ``Model`` (None if it has none)."""
        source = model.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        return cls(source=source, bos_token=model.token_text(model.token_bos()),
                   eos_token=model.token_text(model.token_eos()))

    def apply(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages``; template errors (syntax, ``raise_exception``) become ``ValueError``."""
        def raise_exception(message: str) -> None:
            raise ValueError(message)

        try:
            return _compile(self.source).render(
                messages=list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                strftime_now=lambda f: datetime.now().strftime(f), functions=None, function_call=None,
                tools=None, tool_choice=None)
        except ValueError:
            raise
        except Exception as e:  # jinja2.TemplateError (syntax, sandbox), or a TypeError etc. inside the template
            raise ValueError(f"{type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Rendered:
    """The text the model reads for one item."""

    text: str
    templated: bool        # the chat template was applied (tokenize with special tokens, no extra BOS)
    fallback: bool = False  # a chat template was wanted but the model has none: the raw text is used

    @property
    def warning(self) -> str | None:
        return "the model has no chat template (tokenizer.chat_template): prompts are used as raw text" \
            if self.fallback else None


def render(model_or_template: Any, item: PromptItem, raw: bool = False) -> Rendered:
    """The text for ``item``: through the chat template unless ``raw``.

    ``model_or_template`` is a loaded ``Model`` (its GGUF chat template), a :class:`ChatTemplate`, a template
    string, or None (no template). Without a template and not ``raw``, the raw text is returned with
    ``fallback=True``. A template that fails raises ``UserError`` naming the item's file and line.
    """
    if raw:
        return Rendered(item.raw_text(), templated=False)
    if model_or_template is None:
        template = None
    elif isinstance(model_or_template, ChatTemplate):
        template = model_or_template
    elif isinstance(model_or_template, str):
        template = ChatTemplate(model_or_template) if model_or_template else None
    else:
        template = ChatTemplate.from_model(model_or_template)
    if template is None:
        return Rendered(item.raw_text(), templated=False, fallback=True)
    try:
        text = template.apply(item.as_messages(), add_generation_prompt=True)
    except ValueError as e:
        why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{item.source}: the chat template failed: {why}",
                        hint="check the messages' roles and order, or scan with --raw") from None
    return Rendered(text, templated=True)
