"""Reading what a client sends: bodies within the size limit, JSON objects, its request id."""
from __future__ import annotations

import json

from starlette.requests import Request

from ..errors import BadRequest, BodyTooLarge
from .gateway import gateway_of

def request_id(request: Request) -> str:
    """This request's id: set for every HTTP request by `request_ids.RequestIds`, which also sends it
    back as `x-request-id`."""
    return request.state.request_id


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes `[server] max_body_bytes` (declared or sent)."""
    limit = gateway_of(request).config.server.max_body_bytes
    too_large = BodyTooLarge(f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    try:
        data = json.loads(await read_body(request) or b"null")
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data
