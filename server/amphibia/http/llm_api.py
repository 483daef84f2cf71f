"""What the open LLM APIs (OpenAI, Spin) share: who the client acts as, its model and params in our
terms, and waiting for a whole answer while watching that the client is still there."""
from __future__ import annotations

import asyncio
import hmac
from typing import Any, Mapping

from starlette.requests import Request

from ..config import AppSpec, Config
from ..errors import BadRequest, InvalidInput, Unauthorized
from ..inference.stream import AsyncTokenStream
from ..inference.types import Completion, Usage
from .body import read_json
from .gateway import Gateway, gateway_of


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


async def begin(request: Request) -> tuple[Gateway, AppSpec, dict]:
    """What every API endpoint starts with: the gateway, who is asking, and the JSON body."""
    gateway = gateway_of(request)
    app = authenticate(request, gateway.config)
    return gateway, app, await read_json(request)


async def embed(request: Request) -> tuple[str, dict]:
    """An embeddings request (`model`, `input`: a string or a list of them): the model and the vectors.
    With no `model`, the client's app's embedding model (by default the default embedding model)."""
    gateway, app, data = await begin(request)
    call = gateway.service.call_request(app, data.get("model"), "embed", {"texts": data.get("input")})
    return call.model, await gateway.service.arun_call(app, call)


def requested_model(data: dict) -> str:
    """The APIs name their model explicitly (there is no per-key default)."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must be a model name")
    return model


def mapped_params(data: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The API's parameters in our names (`names`: ours -> theirs), plus `stop`; the service checks them."""
    params = {ours: data[theirs] for ours, theirs in names.items() if data.get(theirs) is not None}
    if data.get("stop") is not None:
        params["stop"] = data["stop"]
    return params


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens}


async def collect(request: Request, stream: AsyncTokenStream) -> Completion:
    """The whole answer; a client that hangs up meanwhile cancels it, freeing its slot at once."""

    async def hung_up() -> None:  # polls, so the per-token path stays a plain queue read
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)

    answer, watcher = asyncio.ensure_future(stream.collect()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        stream.cancel()
        raise BadRequest("client disconnected")
    finally:
        watcher.cancel()
        if not answer.done():
            answer.cancel()
