"""Spin-compatible remote LLM compute (`llm_compute type = "remote_http"`): `/infer` and `/embed`."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidInput
from .llm_api import begin, collect, embed, mapped_params, requested_model

SPIN_PARAMS = {"max_tokens": "maxTokens", "repeat_penalty": "repeatPenalty",
               "repeat_last_n": "repeatPenaltyLastNTokenCount", "temperature": "temperature", "top_k": "topK",
               "top_p": "topP"}


async def infer(request: Request) -> Response:
    gateway, app, data = await begin(request)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidInput("'options' must be an object")
    generation = gateway.service.generation(app, model=requested_model(data), prompt=data.get("prompt"),
                                            params=mapped_params(options, SPIN_PARAMS))
    out = await collect(request, gateway.service.astream(app, generation))
    return JSONResponse({"text": out.text, "usage": {"promptTokenCount": out.usage.prompt_tokens,
                                                     "generatedTokenCount": out.usage.generated_tokens}})


async def spin_embed(request: Request) -> Response:
    _, value = await embed(request)
    return JSONResponse({"embeddings": value["embeddings"], "usage": {"promptTokenCount": value["prompt_tokens"]}})


routes = [Route("/infer", infer, methods=["POST"]), Route("/embed", spin_embed, methods=["POST"])]
