"""OpenAI-compatible `/v1/*`: chat and text completions (with SSE streaming), embeddings, models.

Clients act as the app their API key maps to, so they share the pool fairly with every app.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import AmphibiaError, InvalidInput
from ..inference.stream import AsyncTokenStream
from . import openai_tools
from .gateway import gateway_of
from .llm_api import authenticate, begin, collect, embed, mapped_params, requested_model, usage_json

OPENAI_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repeat_penalty": "repeat_penalty", "seed": "seed",
                 # llama.cpp's server's extensions, on both endpoints: constrain the output directly
                 "json_schema": "json_schema", "grammar": "grammar"}


def _params(data: dict) -> dict[str, Any]:
    if "max_completion_tokens" in data and "max_tokens" not in data:
        data = {**data, "max_tokens": data["max_completion_tokens"]}
    if data.get("n", 1) != 1:
        raise InvalidInput("only n=1 is supported")
    return mapped_params(data, OPENAI_PARAMS)


def _content(content: Any) -> Any:
    """OpenAI allows content as a list of parts; we take the text parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def _sse(stream: AsyncTokenStream, chunk: Callable[[str, Any], list[dict]], head: tuple[dict, ...] = ()) -> StreamingResponse:
    """Server-sent events: `head` at once, then `chunk(kind, value)`'s JSON chunks for each piece
    ("token") and the end ("done", the stream); an error mid-stream is one `{"error": ...}` chunk."""

    def event(data: dict) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        for data in head:
            yield event(data)
        try:
            async for piece in stream:
                for data in chunk("token", piece):
                    yield event(data)
            for data in chunk("done", stream):
                yield event(data)
        except AmphibiaError as exc:
            yield event(exc.to_json())
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def chat_completions(request: Request) -> Response:
    gateway, app, data = await begin(request)
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InvalidInput("'messages' must be a list")
    messages = [{**m, "content": _content(m.get("content"))} if isinstance(m, dict) else m for m in messages]
    wanted = openai_tools.plan(data, messages)
    messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                for m in wanted.messages]
    generation = gateway.service.generation(app, model=requested_model(data), messages=messages,
                                            params={**_params(data), **wanted.params})
    stream = gateway.service.astream(app, generation)
    model, rid, created = generation.model, f"chatcmpl-{uuid.uuid4().hex[:20]}", int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        held: list[str] = []  # with tools: text held back while it may still be a call
        plain = [wanted.calls == "none"]  # known to be a text answer: stream it as it comes

        def chunk(kind: str, value: Any) -> list[dict]:
            if kind == "token":
                if not plain[0]:
                    held.append(value)
                    text = "".join(held)
                    if not text.strip() or text.lstrip().startswith("{"):
                        return []  # a call is sent whole, as one delta, once it has ended
                    held.clear()
                    plain[0], value = True, text
                return [{**base, "choices": [{"index": 0, "delta": {"content": value}, "finish_reason": None}]}]
            out, reason = [], value.finish_reason
            call = openai_tools.tool_call(wanted, "".join(held)) if held else None
            if call is not None:
                out.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **call}]},
                                                 "finish_reason": None}]})
                reason = "tool_calls"
            elif held:
                out.append({**base, "choices": [{"index": 0, "delta": {"content": "".join(held)}, "finish_reason": None}]})
            out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
            if include_usage:
                out.append({**base, "choices": [], "usage": usage_json(value.usage)})
            return out

        role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        return _sse(stream, chunk, (role,))
    out = await collect(request, stream)
    call = openai_tools.tool_call(wanted, out.text)
    message: dict[str, Any] = {"role": "assistant", "content": out.text}
    if call is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if call is not None else out.finish_reason}],
        "usage": usage_json(out.usage),
    })


async def completions(request: Request) -> Response:
    gateway, app, data = await begin(request)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    generation = gateway.service.generation(app, model=requested_model(data), prompt=prompt, params=_params(data))
    stream = gateway.service.astream(app, generation)
    base = {"id": f"cmpl-{uuid.uuid4().hex[:20]}", "object": "text_completion", "created": int(time.time()),
            "model": generation.model}
    if data.get("stream"):
        def chunk(kind: str, value: Any) -> list[dict]:
            text, reason = (value, None) if kind == "token" else ("", value.finish_reason)
            return [{**base, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}]

        return _sse(stream, chunk)
    out = await collect(request, stream)
    return JSONResponse({**base, "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason,
                                              "logprobs": None}], "usage": usage_json(out.usage)})


async def embeddings(request: Request) -> Response:
    model, value = await embed(request)
    return JSONResponse({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(value["embeddings"])],
        "usage": {"prompt_tokens": value["prompt_tokens"], "total_tokens": value["prompt_tokens"]},
    })


async def models(request: Request) -> Response:
    gateway = gateway_of(request)
    app = authenticate(request, gateway.config)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "amphibia"}
        for name in gateway.service.models() if app.allows(name)
    ]})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models),
]
