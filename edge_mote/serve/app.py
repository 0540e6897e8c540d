"""The ASGI app of ``edge-mote serve`` (starlette): OpenAI routes over a :class:`~edge_mote.runtime.scheduler.Scheduler`.

The scheduler thread owns the model; handlers talk to it through ``Scheduler.call`` (tokenization) and
``Scheduler.submit`` with a sink that moves each event into the handler's ``asyncio.Queue``
(``loop.call_soon_threadsafe``). A client that disconnects -- mid-stream or while waiting for a non-streaming
answer -- cancels its request, which frees its sequence slot at the next decode step.

With ``--rpc`` the model is a ``serve.cluster.ClusterModel``: a worker that fails mid-generation ends the requests in
flight with 502 (a stream: an error event naming the worker, then ``[DONE]``), and while the model waits for the
worker and is loaded again new requests get 503 with ``Retry-After`` and /health says ``degraded`` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import EdgeMoteError, UserError
from ..runtime.scheduler import Finished, Scheduler
from .protocol import Accumulator, ApiError, Catalog, Job, chunk, new_id, parse_job, response


@dataclass
class ServerState:
    scheduler: Scheduler
    catalog: Catalog
    template: object                 # ftri.prompts.ChatTemplate or None
    n_vocab: int
    api_key: str | None = None
    cluster: object | None = None    # serve.cluster.ClusterModel with --rpc


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=getattr(e, "headers", None))


def _cluster_error(e) -> ApiError:
    """A ``ClusterFault`` (502) or ``ClusterUnavailable`` (503, with Retry-After) as an OpenAI-style error."""
    err = ApiError(e.http_status, str(e), None, e.code, "server_error")
    if getattr(e, "retry_after", None):
        err.headers = {"Retry-After": str(e.retry_after)}
    return err


def _check_cluster(state: ServerState) -> None:
    if state.cluster is not None:
        down = state.cluster.unavailable()
        if down is not None:
            raise _cluster_error(down)


def _check_auth(state: ServerState, request: HttpRequest) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key",
                       "authentication_error")


async def _body(request: HttpRequest):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _tokenize(job: Job, n_vocab: int):
    """A function for the scheduler thread: the prompt's tokens (as ``edge-mote run`` tokenizes a raw prompt)."""
    def fn(model) -> list[int]:
        if job.token_ids is not None:
            bad = [t for t in job.token_ids if not 0 <= t < n_vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is out of range (vocabulary of {n_vocab})", "prompt")
            return list(job.token_ids)
        if job.templated:
            return model.tokenize(job.text, add_bos=False, special=True)
        return model.tokenize(job.text, add_bos=True, special=True)

    return fn


async def _wait_disconnect(request: HttpRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _start(state: ServerState, job: Job, every_event: bool = True):
    """Tokenize, submit; returns (handle, queue of events, list of held events). Without ``every_event`` only the
    Finished event goes through the queue (one wake-up of the event loop per request, not per token) and the
    TokenEvents before it wait in the list."""
    sched = state.scheduler
    tokens = await asyncio.wrap_future(sched.call(_tokenize(job, state.n_vocab)))
    if len(tokens) >= sched.n_ctx_seq:
        raise ApiError(400, f"the prompt has {len(tokens)} tokens; this server's sequences hold {sched.n_ctx_seq} "
                       "(--ctx)", "messages" if job.kind == "chat" else "prompt", "context_length_exceeded")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    held: list = []

    def sink(event) -> None:
        if not every_event and not isinstance(event, Finished):
            held.append(event)
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    try:
        handle = sched.submit(job.request(tokens, state.catalog.default), sink)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    except EdgeMoteError as e:
        raise ApiError(503, str(e), None, "unavailable", "server_error") from None
    return handle, queue, held


def _failure(ev: Finished) -> ApiError:
    if ev.reason == "cancelled":  # not by this client: the server is shutting down
        return ApiError(503, "the server is shutting down", None, "unavailable", "server_error")
    if ev.status is not None:  # serve --rpc: a worker failed (502) or the model is being loaded again (503)
        code = "worker_lost" if ev.status == 502 else "unavailable"
        return ApiError(ev.status, ev.error or "the model is unavailable", None, code, "server_error")
    return ApiError(500, f"generation failed: {ev.error}", None, "generation_failed", "server_error")


async def _complete(state: ServerState, job: Job, request: HttpRequest):
    handle, queue, held = await _start(state, job, every_event=False)
    acc = Accumulator(job, state.scheduler.layers)
    rid = new_id(job.kind)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        get = asyncio.ensure_future(queue.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            handle.cancel()
            return JSONResponse({}, status_code=499)  # nobody reads it
        for ev in held:
            acc.add(ev)
        acc.add(get.result())
    finally:
        gone.cancel()
        if acc.finished is None:
            handle.cancel()
    if acc.finished.reason in ("error", "cancelled"):
        err = _failure(acc.finished)
        if err.status == 503 and state.cluster is not None:
            err.headers = {"Retry-After": str(state.cluster.retry_after())}
        return _error(err)
    return JSONResponse(response(job, rid, acc, job.text or ""))


async def _stream(state: ServerState, job: Job):
    from sse_starlette.sse import EventSourceResponse

    handle, queue, _ = await _start(state, job)
    acc = Accumulator(job, state.scheduler.layers)
    rid, created = new_id(job.kind), int(time.time())

    def data(obj) -> dict:
        return {"data": json.dumps(obj, ensure_ascii=False)}

    async def events():
        first_trace = True
        try:
            if job.kind == "chat":
                yield data(chunk(job, rid, created, "", role=True))
            elif job.echo and job.text:
                yield data(chunk(job, rid, created, job.text))
            while acc.finished is None:
                ev = await queue.get()
                n_lp, n_ex = len(acc.logprobs), len(acc.experts)
                text = acc.add(ev)
                if isinstance(ev, Finished):
                    if ev.reason in ("error", "cancelled"):
                        yield data(_failure(ev).body())
                        break
                    if text:
                        yield data(chunk(job, rid, created, text))
                    yield data(chunk(job, rid, created, None if job.kind == "chat" else "",
                                     finish=acc.finish_reason))
                    if job.include_usage:
                        yield data(chunk(job, rid, created, None, usage=acc.usage()))
                    break
                lp, ex = acc.logprobs[n_lp:], acc.experts[n_ex:]
                if text or lp or ex:
                    trace = acc.trace(ex, first_trace) if ex else None
                    first_trace = first_trace and not ex
                    yield data(chunk(job, rid, created, text, logprobs=lp or None, trace=trace))
            yield {"data": "[DONE]"}
        finally:
            if acc.finished is None:  # the client went away (or the stream was cancelled): free the slot
                handle.cancel()

    return EventSourceResponse(events(), ping=15)


def build_app(state: ServerState) -> Starlette:
    """The starlette application (routes: /health, /v1/models, /v1/chat/completions, /v1/completions)."""

    async def health(request: HttpRequest):
        s = state.scheduler
        st = s.stats
        body = {"status": "ok", "model": state.catalog.base, "slots": s.n_seq, "busy": s.busy,
                "queued": s.queued, "n_ctx_seq": s.n_ctx_seq, "steps": st.steps,
                "decoded_tokens": st.decoded_tokens, "generated_tokens": st.generated_tokens,
                "max_seqs_in_step": st.max_seqs_in_step, "requests_done": st.requests_done,
                "reused_prompt_tokens": st.reused_tokens}
        if state.cluster is None:
            return JSONResponse(body)
        body["cluster"] = cluster = state.cluster.status()
        if cluster["state"] in ("ok", "partial"):  # partial: serving without a worker that is gone
            return JSONResponse(body)
        body["status"] = "degraded"
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(cluster["retry_after"])})

    async def models(request: HttpRequest):
        try:
            _check_auth(state, request)
        except ApiError as e:
            return _error(e)
        return JSONResponse(state.catalog.models())

    def generation(kind: str):
        async def route(request: HttpRequest):
            try:
                _check_auth(state, request)
                job = parse_job(kind, await _body(request), state.catalog, state.template)
                _check_cluster(state)
                return await (_stream(state, job) if job.stream else _complete(state, job, request))
            except ApiError as e:
                return _error(e)

        return route

    async def http_error(request: HttpRequest, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, msg, None, code).body(), status_code=exc.status_code)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", generation("chat"), methods=["POST"]),
        Route("/v1/completions", generation("completion"), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
