"""The OpenAI-compatible request/response shapes of ``edge-mote serve``, as plain functions over JSON values.

Requests are validated into a :class:`Job` (what to generate, with which steering); anything the server cannot do
as asked raises :class:`ApiError`, which the app turns into an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Steering travels in the extra body field ``mote`` (OpenAI clients: ``extra_body={"mote": {...}}``)::

    {"profile": "no-refusal"}                               # a profile stored in the GGUF ("none": no steering)
    {"off": "12:34,12:7", "bias": "3:5=-2.5", "on": "4:1", "drop": [[3, 1]], "margin": 0.5}
    {"steer": "off=12:34;bias=3:5=-2.5"}                    # the whole text (or JSON) form of Steering.parse
    {"trace": true}                                        # which experts each generated token chose

or in the model name: ``MODEL:PROFILE`` (listed by ``/v1/models``) selects that profile with no client change.
The profile (from ``mote.profile``, else from the model name, else the server's) is combined with the other
parts with ``Steering.__or__``, and the result is checked against the model's limits.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import UserError
from ..ftri.prompts import PromptItem, Rendered, render
from ..runtime.scheduler import Finished, Request, Sampling, TokenEvent
from ..steering import Steering

MOTE_KEYS = ("profile", "off", "drop", "on", "bias", "margin", "steer", "trace")
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Catalog:
    """The model names the server answers to: the base name (the server's steering) and ``base:profile``."""

    base: str
    profiles: Mapping[str, Steering]       # stored profile name -> steering
    default: Steering                      # the server's steering (--profile, else the GGUF's default profile)
    default_profile: str | None
    shape: tuple                           # (n_layer, n_expert, moe_layers, n_expert_used) for Steering.check
    created: int = 0

    def names(self) -> list[str]:
        return [self.base] + [f"{self.base}:{p}" for p in self.profiles]

    def models(self) -> dict:
        def entry(name: str, profile: str | None, steering: Steering) -> dict:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "edge-mote",
                    "mote": {"profile": profile, "steering": str(steering)}}

        data = [entry(self.base, self.default_profile, self.default)]
        data += [entry(f"{self.base}:{p}", p, s) for p, s in self.profiles.items()]
        return {"object": "list", "data": data}

    def profile(self, name: str, param: str) -> Steering:
        if name == "none":
            return Steering()
        if name not in self.profiles:
            raise ApiError(400, f"unknown profile '{name}'; profiles: {', '.join(self.profiles) or 'none stored'}",
                           param, "unknown_profile")
        return self.profiles[name]


@dataclass(frozen=True)
class Job:
    """A validated request: the prompt (rendered text or raw text or token ids), generation parameters, steering."""

    kind: str                           # "chat" or "completion"
    model: str
    text: str | None                    # rendered chat text or raw completion prompt
    token_ids: tuple[int, ...] | None   # a completion prompt given as token ids
    templated: bool
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    steering: Steering
    profile: str | None
    trace: bool
    stream: bool
    include_usage: bool
    echo: bool

    def request(self, tokens: list[int], server_steering: Steering) -> Request:
        steering = None if self.steering == server_steering else self.steering
        return Request(tokens, self.max_tokens, self.sampling, steering, self.stop, self.trace)


# -- parsing ---------------------------------------------------------------------------------------------------
def _get(body: Mapping, key: str, types, default=None, check=None, what: str = ""):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {what or types}, got {value!r}", key)
    if not isinstance(value, types):
        raise ApiError(400, f"'{key}' must be {what or getattr(types, '__name__', types)}, got {value!r}", key)
    if check is not None and not check(value):
        raise ApiError(400, f"'{key}' must be {what}, got {value!r}", key)
    return value


def _steering_part(key: str, value: Any) -> Steering:
    if key == "steer":
        if isinstance(value, Mapping):
            return Steering.from_dict(value)
        if not isinstance(value, str):
            raise UserError("'steer' must be steering text (off=L:E,...;bias=L:E=V) or a JSON object")
        return Steering.parse(value)
    if key == "margin":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"margin must be a number, got {value!r}")
        return Steering(margin=float(value))
    if isinstance(value, str):
        return Steering.parse(f"{key}={value}")
    if key == "bias" and isinstance(value, Mapping):
        return Steering.from_dict({"bias": dict(value)})
    if isinstance(value, (list, tuple)):
        return Steering.from_dict({key: list(value)})
    raise UserError(f"'{key}' must be a string like '12:34,12:7' or a list of [layer, expert]")


def parse_mote(body: Mapping, catalog: Catalog) -> tuple[Steering, str | None, bool]:
    """(steering, profile name, trace) from the model name and the ``mote`` field."""
    model = body.get("model") or catalog.base
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {model!r}", "model")
    if model == catalog.base:
        steering, profile = catalog.default, catalog.default_profile
    elif model.startswith(catalog.base + ":") and model[len(catalog.base) + 1:] in catalog.profiles:
        profile = model[len(catalog.base) + 1:]
        steering = catalog.profiles[profile]
    else:
        raise ApiError(404, f"the model '{model}' does not exist; models: {', '.join(catalog.names())}", "model",
                       "model_not_found")
    mote = body.get("mote")
    if mote is None:
        return steering, profile, False
    if not isinstance(mote, Mapping):
        raise ApiError(400, "'mote' must be an object, e.g. {\"profile\": \"name\"} or {\"off\": \"12:34\"}", "mote")
    unknown = sorted(set(mote) - set(MOTE_KEYS))
    if unknown:
        raise ApiError(400, f"unknown field(s) in 'mote': {', '.join(unknown)}; known: {', '.join(MOTE_KEYS)}",
                       "mote", "invalid_steering")
    if mote.get("profile") is not None:
        if not isinstance(mote["profile"], str):
            raise ApiError(400, "'mote.profile' must be a profile name", "mote.profile", "unknown_profile")
        profile = mote["profile"] if mote["profile"] != "none" else None
        steering = catalog.profile(mote["profile"], "mote.profile")
    try:
        for key in ("steer", "off", "drop", "on", "bias", "margin"):
            if mote.get(key) is not None:
                steering = steering | _steering_part(key, mote[key])
        steering.check(*catalog.shape)
    except UserError as e:
        raise ApiError(400, f"bad steering: {e}", "mote", "invalid_steering") from None
    trace = mote.get("trace", False)
    if not isinstance(trace, bool):
        raise ApiError(400, "'mote.trace' must be true or false", "mote.trace")
    return steering, profile, trace


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for part in value:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", where)
            out.append(part["text"])
        return "".join(out)
    if value is None:
        return ""
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", where)


def parse_job(kind: str, body: Any, catalog: Catalog, template) -> Job:
    """Validate a /v1/chat/completions (``kind="chat"``) or /v1/completions body."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    for unsupported in ("tools", "functions", "suffix"):
        if body.get(unsupported):
            raise ApiError(400, f"'{unsupported}' is not supported by edge-mote serve", unsupported)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    steering, profile, trace = parse_mote(body, catalog)
    text, token_ids, templated = None, None, False
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", f"messages[{i}]")
            msgs.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}].content")})
        try:
            rendered: Rendered = render(template, PromptItem(id="request", source="request", messages=tuple(msgs)))
        except UserError as e:
            raise ApiError(400, str(e).replace("request: ", "messages: ", 1), "messages") from None
        text, templated = rendered.text, rendered.templated
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        logprobs = _get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "an integer 0..20") \
            if _get(body, "logprobs", bool, False, what="true or false") else None
        echo = False
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = tuple(prompt)
        else:
            raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt)", "prompt")
        max_key = "max_tokens"
        logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer 0..20")
        echo = _get(body, "echo", bool, False, what="true or false")
    max_tokens = _get(body, max_key, int, DEFAULT_MAX_TOKENS, lambda v: v >= 1, "an integer >= 1")
    temperature = float(_get(body, "temperature", (int, float), 1.0,
                             lambda v: 0 <= v <= 2, "a number 0..2"))
    top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    seed = _get(body, "seed", int, None)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream = _get(body, "stream", bool, False, what="true or false")
    opts = _get(body, "stream_options", Mapping, {}, what="an object")
    include_usage = bool(opts.get("include_usage", False))
    return Job(kind, str(body.get("model") or catalog.base), text, token_ids, templated, max_tokens,
               Sampling(temperature, top_p, seed, logprobs), stops, steering, profile, trace, stream, include_usage,
               echo)


# -- responses ---------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _mote_info(job: Job) -> dict:
    return {"profile": job.profile, "steering": str(job.steering)}


class Accumulator:
    """Collects a request's events into the pieces of an OpenAI response (text, logprobs, trace, usage)."""

    def __init__(self, job: Job, layers: tuple[int, ...]):
        self.job, self.layers = job, layers
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[dict] = []       # chat form: {"token", "logprob", "bytes", "top_logprobs"}
        self.experts: list = []
        self.finished: Finished | None = None

    def add(self, ev) -> str:
        """Record one event; returns the text it releases."""
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev.token)
            if ev.logprob is not None:
                self.logprobs.append(_chat_logprob(ev))
            if ev.route is not None:
                self.experts.append([list(r) for r in ev.route])
            self.text += ev.text
            return ev.text
        self.finished = ev
        self.text += ev.text
        return ev.text

    @property
    def finish_reason(self) -> str:
        return "length" if self.finished and self.finished.reason == "length" else "stop"

    def usage(self) -> dict:
        f = self.finished
        n_prompt = f.n_prompt if f else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": len(self.tokens),
                "total_tokens": n_prompt + len(self.tokens)}

    def trace(self, rows: list | None = None, with_layers: bool = True) -> dict:
        out = {"layers": list(self.layers)} if with_layers else {}
        out["experts"] = self.experts if rows is None else rows
        return out


def _chat_logprob(ev: TokenEvent) -> dict:
    def one(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    d = one(ev.piece or "", ev.logprob)
    d["top_logprobs"] = [one(p, lp) for p, _, lp in ev.top_logprobs or ()]
    return d


def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI's legacy completions logprobs object from chat-form entries."""
    tokens, offsets = [], []
    pos = offset
    for e in entries:
        tokens.append(e["token"])
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def response(job: Job, rid: str, acc: Accumulator, prompt_text: str = "") -> dict:
    """The non-streaming response body."""
    created = int(time.time())
    mote = _mote_info(job)
    if job.trace:
        mote["trace"] = acc.trace()
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": acc.text},
                  "logprobs": {"content": acc.logprobs} if job.sampling.logprobs is not None else None,
                  "finish_reason": acc.finish_reason}
        obj = "chat.completion"
    else:
        text = (prompt_text if job.echo else "") + acc.text
        lp = _completion_logprobs(acc.logprobs, len(prompt_text) if job.echo else 0) \
            if job.sampling.logprobs is not None else None
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": acc.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": job.model, "choices": [choice],
            "usage": acc.usage(), "mote": mote}


def chunk(job: Job, rid: str, created: int, text: str | None, *, role: bool = False, finish: str | None = None,
          logprobs: list[dict] | None = None, trace: dict | None = None, usage: dict | None = None) -> dict:
    """One streaming chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if job.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta,
                  "logprobs": {"content": logprobs} if logprobs else None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "",
                  "logprobs": _completion_logprobs(logprobs, 0) if logprobs else None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": job.model,
           "choices": [choice] if usage is None else []}
    if usage is not None:
        out["usage"] = usage
    if trace is not None:
        out["mote"] = {"trace": trace}
    return out
