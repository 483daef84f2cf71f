"""The browser bridge: `/bridge` WebSocket from a page into the inference service.

A page running an app in the browser sends its `llm` calls here when it cannot (or should not)
run them locally. The messages are the pool's own (`assign`, `call`, `cancel` in; `token`, `done`,
`failed`, `result` out). Each connection carries a short-lived token, signed by the gateway, bound
to one app and one origin; requests run as that app, under its limits and share, through the same
service as every other entrance (so any engine serves pages, not only the pool).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from ..config import AppSpec
from ..errors import AmphibiaError, Forbidden, Overloaded
from ..inference.pool import wire
from ..inference.pool.jobs import failed_message
from ..inference.service import InferenceService
from ..inference.stream import AsyncTokenStream
from ..inference.pool.wire import CLOSE_BAD_TOKEN, CLOSE_FLOOD, CLOSE_ORIGIN
from .gateway import gateway_of, served_app
from .websocket import Frame, Outbox, close, run_session

log = logging.getLogger("amphibia.bridge")
MAX_IN_FLIGHT = 8  # per connection
MAX_MESSAGES_PER_S = 50  # per connection, averaged over a second


@dataclass(frozen=True)
class Grant:
    app: str
    origin: str
    expires: float


def issue_token(secret: bytes, app: str, origin: str, ttl_s: float = 600.0) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"app": app, "origin": origin, "exp": time.time() + ttl_s}).encode())
    sig = base64.urlsafe_b64encode(hmac.new(secret, body, hashlib.sha256).digest())
    return f"{body.decode()}.{sig.decode()}"


def check_token(secret: bytes, token: str) -> Grant:
    """The grant a token carries; ValueError if it is malformed, forged or expired."""
    body, _, sig = token.partition(".")
    expected = base64.urlsafe_b64encode(hmac.new(secret, body.encode(), hashlib.sha256).digest()).decode()
    if not body or not hmac.compare_digest(sig, expected):
        raise ValueError("bad signature")
    data = json.loads(base64.urlsafe_b64decode(body))
    grant = Grant(str(data["app"]), str(data["origin"]), float(data["exp"]))
    if grant.expires < time.time():
        raise ValueError("expired")
    return grant


def origin_allowed(origin: str, host_origin: str, allowed: tuple[str, ...]) -> bool:
    return origin == host_origin or origin in allowed or "*" in allowed


def _host_origin(scheme: str, host: str) -> str:
    return f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}"


async def token_endpoint(request: Request) -> Response:
    """`GET /bridge/token?app=NAME`: a token for the calling page's origin (CORS-checked)."""
    gateway = gateway_of(request)
    name = request.query_params.get("app", "")
    if not served_app(gateway, name).spec.bridge:
        raise Forbidden(f"app {name!r} does not take LLM calls from pages; set `bridge = true` in its app.toml")
    host_origin = _host_origin(request.url.scheme, request.headers.get("host", ""))
    origin = request.headers.get("origin", host_origin)
    if not origin_allowed(origin, host_origin, gateway.config.server.allowed_origins):
        raise Forbidden(f"origin {origin} may not use this gateway")
    ttl = gateway.config.server.bridge_token_ttl_s
    token = issue_token(gateway.bridge_secret, name, origin, ttl)
    headers = {"access-control-allow-origin": origin, "vary": "origin", "cache-control": "no-store"}
    return JSONResponse({"token": token, "expires_in": ttl, "app": name}, headers=headers)


async def _answer(service: InferenceService, app: AppSpec, msg: wire.Assign | wire.Call,
                  outbox: Outbox, streams: dict[str, AsyncTokenStream]) -> None:
    """Serve one page request, sending its frames (under the page's own id) as they come. A generation's
    stream is kept in `streams` while it runs, so that a `cancel` ends it with its usage ("cancelled")."""
    try:
        if isinstance(msg, wire.Assign):
            generation = service.generation(app, model=msg.model, prompt=msg.prompt, messages=msg.messages,
                                            params=msg.params, resume_text=msg.resume_text,
                                            resume_tokens=msg.resume_tokens)
            stream = streams[msg.id] = service.astream(app, generation)
            async for piece in stream:
                outbox.put(wire.Token(msg.id, piece))
            assert stream.usage is not None and stream.finish_reason is not None
            outbox.put(wire.Done(msg.id, stream.usage.prompt_tokens, stream.usage.generated_tokens,
                                      stream.finish_reason))
        else:
            value = await service.arun_call(app, service.call_request(app, msg.model, msg.method, msg.args))
            outbox.put(wire.Result(msg.id, value))
    except AmphibiaError as exc:
        outbox.put(failed_message(msg.id, exc))
    finally:
        streams.pop(msg.id, None)


async def bridge_socket(websocket: WebSocket) -> None:
    gateway = gateway_of(websocket)
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    host_origin = _host_origin(websocket.url.scheme, websocket.headers.get("host", ""))
    origin = websocket.headers.get("origin", "")
    await websocket.accept()
    try:
        grant = check_token(gateway.bridge_secret, websocket.query_params.get("token", ""))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("bridge: rejected %s (origin %s): bad token: %s", peer, origin or "-", exc)
        await close(websocket, CLOSE_BAD_TOKEN, "missing, forged or expired token")
        return
    if origin != grant.origin or not origin_allowed(origin, host_origin, gateway.config.server.allowed_origins):
        log.warning("bridge: rejected %s: origin %r does not match the token's %r", peer, origin, grant.origin)
        await close(websocket, CLOSE_ORIGIN, "origin not allowed")
        return
    loaded = gateway.apps.get(grant.app)
    if loaded is None or not loaded.spec.bridge:
        await close(websocket, wire.CLOSE_PROTOCOL, "no such app takes LLM calls from pages")
        return
    app: AppSpec = loaded.spec
    outbox = Outbox()
    requests: dict[str, asyncio.Task] = {}  # the page's request id -> the task answering it
    streams: dict[str, AsyncTokenStream] = {}  # the page's running generations, by its id
    window_start, count = time.monotonic(), 0

    def on_frame(frame: Frame) -> None:
        nonlocal window_start, count
        now = time.monotonic()
        if now - window_start > 1.0:
            window_start, count = now, 0
        count += 1
        if count > MAX_MESSAGES_PER_S:
            raise wire.ProtocolError("too many messages", CLOSE_FLOOD)
        msg = wire.decode(frame, (wire.Assign, wire.Call, wire.Cancel))
        if isinstance(msg, wire.Cancel):
            if msg.id in streams:
                streams[msg.id].cancel()  # the engine frees the slot; the page hears "done: cancelled"
            elif msg.id in requests:
                requests.pop(msg.id).cancel()
            return
        if msg.id in requests or len(requests) >= MAX_IN_FLIGHT:
            outbox.put(failed_message(msg.id, Overloaded(f"at most {MAX_IN_FLIGHT} requests per page")))
            return
        task = asyncio.create_task(_answer(gateway.service, app, msg, outbox, streams))
        requests[msg.id] = task
        task.add_done_callback(lambda t, page_id=msg.id: requests.pop(page_id, None) if requests.get(page_id) is t
                               else None)

    try:
        code, reason = await run_session(websocket, outbox, on_frame)
        if code != 1000:
            log.warning("bridge: app=%s peer=%s closed: %s", app.name, peer, reason)
    finally:
        for task in list(requests.values()):  # the page went away: free its slots
            task.cancel()
