"""The HTTP server: OpenAI's completions and chat formats over :class:`AsyncEngine`.

A thin layer (powerfast/DESIGN.md section 8): each request body is checked field by field, mapped
to one :class:`SamplingParams` per choice (``n`` choices run as ``n`` independent engine
requests with seeds ``seed, seed + 1, ...``), and answered from the engine's
:class:`RequestOutput` stream, at once or as server-sent events. Endpoints:

    POST /v1/completions        prompt: a string, token ids, or a list of either
    POST /v1/chat/completions   messages: [{"role": ..., "content": ...}, ...]
    GET  /v1/models             the one served model
    GET  /health                200 while the engine runs; 503 once a step failed (naming the
                                cause) or the engine stopped; no authentication
    GET  /metrics               Prometheus text format, by prometheus_client (powerfast.serving.metrics)

The power-sampling settings are extra body fields with the names of
:class:`SamplingParams` (``method``, ``alpha``, ``block_size``, ...). Errors have OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``: 400 names the bad field, 401 a
missing or wrong API key, 404 an unknown model, 429 a full queue, 503 an engine shutting
down, 500 anything unexpected (logged). A client that goes away aborts its requests: the
engine frees their KV pages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from powerfast.core.config import SETTINGS
from powerfast.serving.async_engine import AsyncEngine
from powerfast.serving.errors import EngineClosedError, InvalidRequestError, QueueFullError, RequestTooLargeError
from powerfast.serving.metrics import CONTENT_TYPE, ServingMetrics, render
from powerfast.serving.params import SamplingParams
from powerfast.serving.request import RequestOutput

__all__ = ["APIError", "MAX_CHOICES", "POWER_FIELDS", "build_app", "parse_sampling_params"]

logger = logging.getLogger("powerfast.serving.server")

#: Most choices (prompts x n) one request may ask for.
MAX_CHOICES = 64

#: OpenAI's sampling fields with the same meaning here, and ``ignore_eos``.
_OPENAI_FIELDS = {"max_tokens": int, "temperature": float, "seed": int, "ignore_eos": bool}
#: Extra body fields passed to SamplingParams as they are, with their JSON type: the method
#: and every setting of every method (powerfast.core.config.SETTINGS), validated whatever the method.
POWER_FIELDS = {"method": str,
                **{name: setting.kind for name, setting in SETTINGS.items() if name not in _OPENAI_FIELDS}}
#: OpenAI fields accepted only at the value that changes nothing (or null).
_NEUTRAL_FIELDS = {"top_p": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,),
                   "frequency_penalty": (0,), "echo": (False,)}
_IGNORED_FIELDS = {"user"}
_COMMON_FIELDS = {"model", "stream", "stream_options", "n", "stop"} | set(_OPENAI_FIELDS) | set(POWER_FIELDS)
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _api_error(error: BaseException) -> APIError:
    """The APIError of an exception raised while serving a request (500 for the unexpected)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestTooLargeError):
        return APIError(400, str(error), param=error.field, code="request_too_large")
    if isinstance(error, InvalidRequestError):
        return APIError(400, str(error), param=error.field)
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), type="rate_limit_error", code="queue_full")
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error", code="engine_closed")
    logger.error("unexpected error while serving a request", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error",
                    code="internal_error")


# ------------------------------------------------------------------------------ request bodies


def _typed(body: dict, name: str, kind: type):
    """``body[name]`` checked against its JSON type (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, kind))
    if not ok:
        raise APIError(400, f"{name} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)}", param=name)
    return float(value) if kind is float else value


def _check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in _IGNORED_FIELDS:
            continue
        if name in _NEUTRAL_FIELDS:
            if value is None or (not isinstance(value, (dict, list)) and value in _NEUTRAL_FIELDS[name]
                                 and (isinstance(value, bool) == isinstance(_NEUTRAL_FIELDS[name][0], bool))):
                continue
            raise APIError(400, f"{name} is not supported (only {json.dumps(_NEUTRAL_FIELDS[name][0])} or null), "
                                f"got {json.dumps(value)}", param=name)
        raise APIError(400, f"unsupported field {name!r}", param=name)


def _stop(body: dict) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise APIError(400, f"stop must be a string or a list of strings, got {json.dumps(stop)}", param="stop")


def parse_sampling_params(body: dict, chat: bool) -> tuple[list[SamplingParams], bool, bool]:
    """(params of each of the ``n`` choices, stream, include_usage) of a request body.

    Raises APIError (400, naming the field) for a wrong type or an unsupported field, and
    InvalidRequestError (from SamplingParams) for a value out of range.
    """
    _check_fields(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS)
    settings = {}
    for name, kind in {**_OPENAI_FIELDS, **POWER_FIELDS}.items():
        value = _typed(body, name, kind)
        if value is not None:
            settings[name] = value
    if chat:
        completion_tokens = _typed(body, "max_completion_tokens", int)
        if completion_tokens is not None:
            if "max_tokens" in settings and settings["max_tokens"] != completion_tokens:
                raise APIError(400, f"max_tokens ({settings['max_tokens']}) and max_completion_tokens "
                                    f"({completion_tokens}) disagree", param="max_completion_tokens")
            settings["max_tokens"] = completion_tokens
    stop = _stop(body)
    if stop is not None:
        settings["stop"] = stop
    n = _typed(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be between 1 and {MAX_CHOICES}, got {n}", param="n")
    stream = bool(_typed(body, "stream", bool))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, f"stream_options must be {{\"include_usage\": bool}}, got {json.dumps(options)}",
                           param="stream_options")
        include_usage = bool(_typed(options, "include_usage", bool))
    seed = settings.pop("seed", None)
    params = [SamplingParams(**settings, seed=None if seed is None else seed + index) for index in range(n)]
    return params, stream, include_usage


def _completion_prompts(body: dict) -> list:
    """The prompts of a completions body: a string, a token-id list, or a list of either."""
    prompt = body.get("prompt")

    def is_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of token ids, or a non-empty list of either, got "
                        f"{json.dumps(prompt)[:200]}", param="prompt")


def _chat_messages(body: dict) -> list[dict]:
    """The messages of a chat body as ``[{"role", "content"}]`` with string contents
    (a content given as a list of text parts is joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"messages must be a non-empty list, got {json.dumps(messages)[:200]}", param="messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"{where} must be an object with a string 'role', got {json.dumps(message)[:200]}",
                           param=where)
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.content: only text parts are supported, got "
                                        f"{json.dumps(part)[:200]}", param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts, got "
                                f"{json.dumps(content)[:200]}", param=f"{where}.content")
        checked.append({"role": message["role"], "content": content})
    return checked


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


# ------------------------------------------------------------------------------ engine streams


async def _first_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's first output; on the first error every stream is closed (its request
    aborted) and the error raised, before anything was answered."""
    tasks = [asyncio.ensure_future(stream.__anext__()) for stream in streams]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                error = task.exception()
                if isinstance(error, StopAsyncIteration):
                    error = RuntimeError("the engine's stream ended without an output")
                raise error
        return [task.result() for task in tasks]
    except BaseException:
        await _close_streams(streams, tasks)
        raise


async def _close_streams(streams, tasks=()) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        try:
            await stream.aclose()
        except Exception:  # closing an already broken stream
            logger.debug("closing an engine stream failed", exc_info=True)


async def _merged(streams: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]):
    """(choice index, output) of all streams as they come, the ``firsts`` first; closes every
    stream (aborting its request) when left early."""
    tasks: dict[asyncio.Future, int] = {}
    try:
        for index, first in enumerate(firsts):
            yield index, first
        for index, first in enumerate(firsts):
            if not first.finished:
                tasks[asyncio.ensure_future(streams[index].__anext__())] = index
        while tasks:
            done, _ = await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = tasks.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                if not output.finished:
                    tasks[asyncio.ensure_future(streams[index].__anext__())] = index
    finally:
        await _close_streams(streams, list(tasks))


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_disconnected(request: Request, work, poll_seconds: float = 0.1):
    """The result of the coroutine ``work``, or _ClientGone once the client disconnects (then
    ``work`` is cancelled: its streams close and the engine aborts their requests)."""
    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(poll_seconds)

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.done() and not task.cancelled():
        return task.result()
    raise _ClientGone()


class _EventStream(StreamingResponse):
    """Server-sent events whose body iterator is closed however the response ends (a client
    that disconnects included), so that the engine requests behind it are aborted."""

    def __init__(self, content) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _CountResponses:
    """ASGI middleware: counts the responses of the ``/v1/`` endpoints by status in ``metrics``
    (plain ASGI, so that streamed responses and their cancellation pass through untouched)."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _event(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(finals: dict[int, RequestOutput], n: int) -> dict:
    """OpenAI's usage of the finished choices (the prompt of each of their prompts counted
    once) and ``decoded_tokens``: every token decoded for them, at least the completion's."""
    prompt_tokens = sum(out.prompt_tokens for index, out in finals.items() if index % n == 0)
    completion_tokens = sum(len(out.token_ids) for out in finals.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "decoded_tokens": sum(max(out.decoded_tokens, len(out.token_ids)) for out in finals.values())}


# ------------------------------------------------------------------------------ the app


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              metrics: ServingMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``.

    api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
    metrics: the :class:`ServingMetrics` to fill (a fresh one by default); it is set to watch
             ``engine``'s stats (in place of an engine it watched before).
    The engine's loop starts with the app and is shut down with it (aborting what runs).
    """
    metrics = ServingMetrics() if metrics is None else metrics
    metrics.watch(engine.stats)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="powerfast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    app.add_middleware(_CountResponses, metrics=metrics)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    authorized = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def api_error_handler(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error_handler(request: Request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), code=code).response()

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
        if engine.closed:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "powerfast"}]}

    @app.get("/metrics", dependencies=authorized)
    async def prometheus():
        return Response(render(metrics), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

    async def _serve(request: Request, chat: bool):
        body: dict = {}
        try:
            body = await _json_body(request)
            requested = body.get("model")
            if requested is not None and requested != model_name:
                raise APIError(404, f"The model `{requested}` does not exist (this server serves `{model_name}`)",
                               param="model", code="model_not_found")
            prompts = [_chat_messages(body)] if chat else _completion_prompts(body)
            params, stream, include_usage = parse_sampling_params(body, chat)
            if len(prompts) * len(params) > MAX_CHOICES:
                raise APIError(400, f"{len(prompts)} prompts x n={len(params)} is more than {MAX_CHOICES} choices",
                               param="n")
            response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            # completions take the prompt as raw text (OpenAI's meaning); chat bodies are messages
            streams = [engine.generate(prompt, p, f"{response_id}-{len(params) * i + j}", chat_template=False,
                                       stream=stream)
                       for i, prompt in enumerate(prompts) for j, p in enumerate(params)]
            firsts = await _unless_disconnected(request, _first_outputs(streams))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as error:  # noqa: BLE001 - every error is answered in OpenAI's shape
            error = _api_error(error)
            if chat and error.param == "max_tokens" and "max_tokens" not in body:
                error.param = "max_completion_tokens"  # the name the client used
            return error.response()
        head = {"id": response_id, "created": int(time.time()), "model": model_name}
        if stream:
            events = _chat_events if chat else _completion_events
            return _EventStream(events(head, streams, firsts, len(params), include_usage))
        try:
            return await _unless_disconnected(request, _collect(head, streams, firsts, len(params), chat))
        except _ClientGone:
            for output in firsts:
                metrics.forget(output.request_id)
            return Response(status_code=499)
        except Exception as error:  # noqa: BLE001
            return _api_error(error).response()

    async def _collect(head, streams, firsts, n, chat):
        finals: dict[int, RequestOutput] = {}
        outputs = _merged(streams, firsts)
        try:
            async for index, output in outputs:
                metrics.observe(output)
                if output.finished:
                    finals[index] = output
        finally:
            await outputs.aclose()
        for output in finals.values():
            if output.finish_reason == "error":
                raise APIError(500, f"request {output.request_id} failed: {output.error}", type="server_error",
                               code="engine_error")
            if output.finish_reason == "abort":
                raise APIError(503, f"request {output.request_id} was aborted (the server is shutting down)",
                               type="server_error", code="aborted")
        choices = []
        for index in sorted(finals):
            output = finals[index]
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": output.text},
                                "logprobs": None, "finish_reason": output.finish_reason})
            else:
                choices.append({"index": index, "text": output.text, "logprobs": None,
                                "finish_reason": output.finish_reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(finals, n)}

    async def _events(head, streams, firsts, n, include_usage, obj, open_choice, chunk_choice, close_choice):
        """The SSE body: ``open_choice(i)`` chunks first, a chunk per new text, the finish
        chunks, the usage chunk when asked for, then ``[DONE]``. Errors become an error event."""
        finals: dict[int, RequestOutput] = {}
        outputs = _merged(streams, firsts)
        usage = {"usage": None} if include_usage else {}
        try:
            for index in range(len(streams)):
                opening = open_choice(index)
                if opening is not None:
                    yield _event({**head, "object": obj, "choices": [opening], **usage})
            async for index, output in outputs:
                metrics.observe(output)
                if output.finished:
                    finals[index] = output
                    if output.finish_reason == "error":
                        yield _event(APIError(500, f"request {output.request_id} failed: {output.error}",
                                              type="server_error", code="engine_error").body())
                        continue
                if output.new_text:
                    yield _event({**head, "object": obj, "choices": [chunk_choice(index, output)], **usage})
                if output.finished:
                    closing = close_choice(index, output)
                    if closing is not None:
                        yield _event({**head, "object": obj, "choices": [closing], **usage})
            if include_usage:
                yield _event({**head, "object": obj, "choices": [], "usage": _usage(finals, n)})
        except Exception as error:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            yield _event(_api_error(error).body())
        finally:
            for out in firsts:
                if out.request_id not in {f.request_id for f in finals.values()}:
                    metrics.forget(out.request_id)
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    def _completion_events(head, streams, firsts, n, include_usage):
        def chunk(index, output):
            return {"index": index, "text": output.new_text, "logprobs": None, "finish_reason": None}

        def close(index, output):
            return {"index": index, "text": "", "logprobs": None, "finish_reason": output.finish_reason}

        return _events(head, streams, firsts, n, include_usage, "text_completion", lambda index: None, chunk, close)

    def _chat_events(head, streams, firsts, n, include_usage):
        def open_(index):
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}

        def chunk(index, output):
            return {"index": index, "delta": {"content": output.new_text}, "logprobs": None, "finish_reason": None}

        def close(index, output):
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": output.finish_reason}

        return _events(head, streams, firsts, n, include_usage, "chat.completion.chunk", open_, chunk, close)

    return app
