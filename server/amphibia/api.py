"""Open APIs on the gateway, served by the same broker (same fairness, same limits) as apps:
OpenAI-compatible `/v1/*` and Spin-compatible remote LLM compute (`/infer`, `/embed`)."""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat_template import validate_messages
from .config import AppSpec, Config
from .engine import SamplingParams, Usage
from .errors import AmphibiaError, BadRequest, Forbidden, InvalidInput, ModelNotSupported, Unauthorized, error_response
from .pool.broker import Broker, Job


class QueueSink:
    """Broker events -> an asyncio queue read by the HTTP handler (both on the event loop)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def token(self, text: str) -> None:
        self.queue.put_nowait(("token", text))

    def done(self, usage: Usage, finish_reason: str) -> None:
        self.queue.put_nowait(("done", (usage, finish_reason)))

    def fail(self, error: AmphibiaError) -> None:
        self.queue.put_nowait(("error", error))

    def result(self, value: Any) -> None:
        self.queue.put_nowait(("result", value))


def _state(request: Request) -> tuple[Config, Broker]:
    gateway = request.app.state.gateway
    if gateway.broker is None:
        raise AmphibiaError("this gateway runs without a pool; the open APIs need one")
    return gateway.config, gateway.broker


def authenticate(request: Request, config: Config) -> AppSpec:
    """The app a client acts as: from its bearer key, or the open "api" app when no keys are set."""
    if not config.api_keys:
        return config.api_app("api")
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    for known, app in config.api_keys.items():
        if key and hmac.compare_digest(key.encode(), known.encode()):
            return config.api_app(app)
    raise Unauthorized("missing or unknown API key (send Authorization: Bearer KEY)")


async def _begin(request: Request) -> tuple[Config, Broker, AppSpec, dict, str]:
    """What every model endpoint starts with: who is asking, the JSON body, and a model they may use."""
    config, broker = _state(request)
    app = authenticate(request, config)
    data = await _json(request)
    return config, broker, app, data, _check_model(config, app, data.get("model"))


def _check_model(config: Config, app: AppSpec, model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must be a model name")
    if model not in config.models:
        raise ModelNotSupported(f"model {model!r} is not served here; models: {', '.join(config.models)}")
    if not app.allows(model):
        raise Forbidden(f"this key may not use model {model!r}")
    return model


async def _json(request: Request) -> dict:
    try:
        data = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _number(data: dict, key: str, kind: type, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise InvalidInput(f"'{key}' must be {'an integer' if kind is int else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"'{key}' must be finite")
    return kind(value)


def _params(data: dict, names: dict[str, str], config: Config, model: str) -> SamplingParams:
    """SamplingParams from a request; `names` maps our field names to the API's."""
    values: dict[str, Any] = {}
    for ours, theirs in names.items():
        kind = int if ours in ("max_tokens", "top_k", "repeat_last_n", "seed") else float
        value = _number(data, theirs, kind)
        if value is not None:
            values[ours] = value
    stop = data.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidInput("'stop' must be a string or a list of strings")
        values["stop"] = tuple(stop)
    return replace(SamplingParams(), **values).validate(config.models[model].n_ctx)


async def _generate(broker: Broker, app: AppSpec, model: str, params: SamplingParams, prompt: str | None = None,
                    messages: list | None = None) -> tuple[Job, QueueSink]:
    sink = QueueSink()
    job = Job.generation(app, model, sink, params, prompt=prompt, messages=messages)
    broker.submit(job)
    return job, sink


async def _collect(broker: Broker, job: Job, sink: QueueSink, request: Request) -> tuple[str, Usage, str]:
    """Wait for the whole answer; if the client hangs up meanwhile, cancel the job and free its slot."""

    async def watch() -> None:  # polls the connection, so the per-token loop below stays a plain get()
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        broker.cancel(job.id)
        sink.fail(BadRequest("client disconnected"))

    watcher = asyncio.create_task(watch())
    parts: list[str] = []
    try:
        while True:
            kind, value = await sink.queue.get()
            if kind == "token":
                parts.append(value)
            elif kind == "done":
                return "".join(parts), value[0], value[1]
            elif kind == "error":
                raise value
    except asyncio.CancelledError:  # the handler itself was cancelled: free the slot
        broker.cancel(job.id)
        raise
    finally:
        watcher.cancel()


async def _call(broker: Broker, app: AppSpec, model: str, method: str, args: dict) -> Any:
    sink = QueueSink()
    job = Job.calling(app, model, sink, method, args)
    broker.submit(job)
    kind, value = await sink.queue.get()
    if kind == "error":
        raise value
    return value


def handles_errors(fn: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except AmphibiaError as exc:
            return error_response(exc)

    return endpoint


# --- OpenAI -----------------------------------------------------------------------------------------
OPENAI_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repeat_penalty": "repeat_penalty", "seed": "seed"}


def _openai_params(data: dict, config: Config, model: str) -> SamplingParams:
    if "max_completion_tokens" in data and "max_tokens" not in data:
        data = {**data, "max_tokens": data["max_completion_tokens"]}
    if data.get("n", 1) != 1:
        raise InvalidInput("only n=1 is supported")
    return _params(data, OPENAI_PARAMS, config, model)


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _stream_events(broker: Broker, job: Job, sink: QueueSink) -> AsyncIterator[tuple[str, Any]]:
    finished = False
    try:
        while True:
            kind, value = await sink.queue.get()
            if kind == "error":
                finished = True
                yield "error", value
                return
            if kind == "done":
                finished = True
            yield kind, value
            if finished:
                return
    finally:
        if not finished:  # the client disconnected mid-stream
            broker.cancel(job.id)


@handles_errors
async def chat_completions(request: Request) -> Response:
    config, broker, app, data, model = await _begin(request)
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InvalidInput("'messages' must be a list")
    messages = [{"role": m.get("role"), "content": _content(m.get("content"))} if isinstance(m, dict) else m
                for m in messages]
    messages = validate_messages(messages)
    params = _openai_params(data, config, model)
    job, sink = await _generate(broker, app, model, params, messages=messages)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:20]}", int(time.time())
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict]:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            async for kind, value in _stream_events(broker, job, sink):
                if kind == "token":
                    yield {**base, "choices": [{"index": 0, "delta": {"content": value}, "finish_reason": None}]}
                elif kind == "done":
                    usage, reason = value
                    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
                    if include_usage:
                        yield {**base, "choices": [], "usage": _usage(usage)}
                else:
                    yield {"error": value.to_json()["error"]}

        return _sse(chunks())
    text, usage, reason = await _collect(broker, job, sink, request)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                     "logprobs": None}],
        "usage": _usage(usage),
    })


def _content(content: Any) -> Any:
    """OpenAI allows content as a list of parts; we take the text parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens}


@handles_errors
async def completions(request: Request) -> Response:
    config, broker, app, data, model = await _begin(request)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput("'prompt' must be a non-empty string")
    params = _openai_params(data, config, model)
    job, sink = await _generate(broker, app, model, params, prompt=prompt)
    rid, created = f"cmpl-{uuid.uuid4().hex[:20]}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    if data.get("stream"):
        async def chunks() -> AsyncIterator[dict]:
            async for kind, value in _stream_events(broker, job, sink):
                if kind == "token":
                    yield {**base, "choices": [{"index": 0, "text": value, "finish_reason": None, "logprobs": None}]}
                elif kind == "done":
                    yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": value[1], "logprobs": None}]}
                else:
                    yield {"error": value.to_json()["error"]}

        return _sse(chunks())
    text, usage, reason = await _collect(broker, job, sink, request)
    return JSONResponse({**base, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
                         "usage": _usage(usage)})


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value) or len(value) > 256:
        raise InvalidInput(f"'{name}' must be a string or a list of 1 to 256 strings")
    return value


@handles_errors
async def embeddings(request: Request) -> Response:
    config, broker, app, data, model = await _begin(request)
    texts = _texts(data.get("input"), "input")
    value = await _call(broker, app, model, "embed", {"texts": texts})
    return JSONResponse({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(value["embeddings"])],
        "usage": {"prompt_tokens": value["prompt_tokens"], "total_tokens": value["prompt_tokens"]},
    })


@handles_errors
async def models(request: Request) -> Response:
    config, _ = _state(request)
    app = authenticate(request, config)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "amphibia"}
        for name in config.models if app.allows(name)
    ]})


# --- Spin (llm_compute type = "remote_http") ------------------------------------------------------------
SPIN_PARAMS = {"max_tokens": "maxTokens", "repeat_penalty": "repeatPenalty",
               "repeat_last_n": "repeatPenaltyLastNTokenCount", "temperature": "temperature", "top_k": "topK",
               "top_p": "topP"}


@handles_errors
async def spin_infer(request: Request) -> Response:
    config, broker, app, data, model = await _begin(request)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput("'prompt' must be a non-empty string")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidInput("'options' must be an object")
    params = _params(options, SPIN_PARAMS, config, model)
    job, sink = await _generate(broker, app, model, params, prompt=prompt)
    text, usage, _ = await _collect(broker, job, sink, request)
    return JSONResponse({"text": text, "usage": {"promptTokenCount": usage.prompt_tokens,
                                                 "generatedTokenCount": usage.generated_tokens}})


@handles_errors
async def spin_embed(request: Request) -> Response:
    config, broker, app, data, model = await _begin(request)
    value = await _call(broker, app, model, "embed", {"texts": _texts(data.get("input"), "input")})
    return JSONResponse({"embeddings": value["embeddings"], "usage": {"promptTokenCount": value["prompt_tokens"]}})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models),
    Route("/infer", spin_infer, methods=["POST"]),
    Route("/embed", spin_embed, methods=["POST"]),
]
