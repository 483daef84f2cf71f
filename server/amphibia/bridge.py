"""The browser bridge: `/bridge` WebSocket from a page into the broker.

A page running an app in the browser sends its `llm` calls here when it cannot (or should not)
run them locally. The messages are the pool's own (`wire.Assign`, `wire.Call`, `wire.Cancel` in;
`Token`, `Done`, `Failed`, `Result` out), so the bridge is a worker-shaped client of
the broker that asks instead of answers. Each connection carries a short-lived token, signed by the
gateway, bound to one app and one origin; requests run as that app, under its limits and share.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from .config import AppSpec
from .engine import SamplingParams, Usage
from .errors import AmphibiaError, InvalidInput, ModelNotSupported
from .pool import wire
from .pool.broker import Broker, Job

log = logging.getLogger("amphibia.bridge")
CLOSE_BAD_TOKEN = 4401
CLOSE_ORIGIN = 4403
CLOSE_FLOOD = 4429
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
    gateway = request.app.state.gateway
    name = request.query_params.get("app", "")
    if name not in gateway.apps:
        return JSONResponse({"error": {"type": "app_not_found", "message": f"no app named {name!r}"}}, 404)
    host_origin = _host_origin(request.url.scheme, request.headers.get("host", ""))
    origin = request.headers.get("origin", host_origin)
    if not origin_allowed(origin, host_origin, gateway.config.server.allowed_origins):
        return JSONResponse({"error": {"type": "forbidden", "message": f"origin {origin} may not use this gateway"}}, 403)
    ttl = gateway.config.server.bridge_token_ttl_s
    token = issue_token(gateway.bridge_secret, name, origin, ttl)
    headers = {"access-control-allow-origin": origin, "vary": "origin", "cache-control": "no-store"}
    return JSONResponse({"token": token, "expires_in": ttl, "app": name}, headers=headers)


class _Sink:
    """Broker events for one bridged request -> frames on the page's socket."""

    def __init__(self, send: Any, job_id: str, done: Any) -> None:
        self.send, self.id, self._done = send, job_id, done

    def token(self, text: str) -> None:
        self.send(wire.Token(self.id, text))

    def done(self, usage: Usage, finish_reason: str) -> None:
        self.send(wire.Done(self.id, usage.prompt_tokens, usage.generated_tokens, finish_reason))
        self._done(self.id)

    def fail(self, error: AmphibiaError) -> None:
        self.send(wire.Failed(self.id, error.type, error.message))
        self._done(self.id)

    def result(self, value: Any) -> None:
        self.send(wire.Result(self.id, value))
        self._done(self.id)


def _job(app: AppSpec, models: dict, msg: wire.Message, sink: _Sink) -> Job:
    model = getattr(msg, "model", "") or app.model
    if model not in models:
        raise ModelNotSupported(f"model {model!r} is not served here")
    if not app.allows(model):
        raise InvalidInput(f"app {app.name!r} may not use model {model!r}")
    if isinstance(msg, wire.Assign):
        params = SamplingParams.from_dict(msg.params).validate(models[model].n_ctx)
        if msg.messages is None and not msg.prompt:
            raise InvalidInput("prompt must not be empty")
        job = Job.generation(app, model, sink, params, prompt=msg.prompt, messages=msg.messages)
        # A page whose local engine failed mid-answer finishes it here: the worker continues after
        # `resume_text` (prefilled like prompt, within the model's context) and sends only new text.
        # Claimed `resume_tokens` only count against the request's own max_tokens.
        job.text = msg.resume_text
        job.generated = max(0, min(msg.resume_tokens, params.max_tokens))
        return job
    assert isinstance(msg, wire.Call)
    if msg.method not in ("embed", "tokenize", "detokenize"):
        raise InvalidInput(f"unknown call {msg.method!r}")
    return Job.calling(app, model, sink, msg.method, msg.args)


async def bridge_socket(websocket: WebSocket) -> None:
    gateway = websocket.app.state.gateway
    broker: Broker | None = gateway.broker
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    host_origin = _host_origin(websocket.url.scheme, websocket.headers.get("host", ""))
    origin = websocket.headers.get("origin", "")
    await websocket.accept()
    try:
        grant = check_token(gateway.bridge_secret, websocket.query_params.get("token", ""))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("bridge: rejected %s (origin %s): bad token: %s", peer, origin or "-", exc)
        await websocket.close(CLOSE_BAD_TOKEN, "missing, forged or expired token")
        return
    if origin != grant.origin or not origin_allowed(origin, host_origin, gateway.config.server.allowed_origins):
        log.warning("bridge: rejected %s: origin %r does not match the token's %r", peer, origin, grant.origin)
        await websocket.close(CLOSE_ORIGIN, "origin not allowed")
        return
    loaded = gateway.apps.get(grant.app)
    if broker is None or loaded is None:
        await websocket.close(wire.CLOSE_PROTOCOL, "no pool or no such app")
        return
    app: AppSpec = loaded.spec
    outbox: asyncio.Queue[wire.Message] = asyncio.Queue()
    mine: dict[str, str] = {}  # the page's request id -> broker job id

    def finished(job_id: str) -> None:
        for pid, jid in list(mine.items()):
            if jid == job_id:
                del mine[pid]

    class PageSink(_Sink):  # frames carry the page's ids, not the broker's
        def __init__(self, page_id: str) -> None:
            super().__init__(lambda m: outbox.put_nowait(_rename(m, page_id)), "", finished)

    async def sender() -> None:
        while True:
            await websocket.send_text((await outbox.get()).encode())

    send_task = asyncio.create_task(sender())
    window_start, count = time.monotonic(), 0
    code, reason = 1000, ""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            now = time.monotonic()
            if now - window_start > 1.0:
                window_start, count = now, 0
            count += 1
            if count > MAX_MESSAGES_PER_S:
                code, reason = CLOSE_FLOOD, "too many messages"
                log.warning("bridge: app=%s peer=%s flooding, closing", app.name, peer)
                break
            frame = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                msg = wire.decode(frame, (wire.Assign, wire.Call, wire.Cancel))
            except wire.ProtocolError as exc:
                code = wire.CLOSE_TOO_BIG if "over the" in str(exc) else wire.CLOSE_PROTOCOL
                reason = str(exc)[:120]
                log.warning("bridge: app=%s peer=%s bad frame, closing: %s", app.name, peer, exc)
                break
            if isinstance(msg, wire.Cancel):
                job_id = mine.pop(msg.id, None)
                if job_id:
                    broker.cancel(job_id)
                continue
            page_id = msg.id
            if page_id in mine or len(mine) >= MAX_IN_FLIGHT:
                outbox.put_nowait(wire.Failed(page_id, "overloaded", f"at most {MAX_IN_FLIGHT} requests per page"))
                continue
            sink = PageSink(page_id)
            try:
                job = _job(app, gateway.config.models, msg, sink)
                sink.id = job.id
                mine[page_id] = job.id
                broker.submit(job)
            except AmphibiaError as exc:
                mine.pop(page_id, None)
                outbox.put_nowait(wire.Failed(page_id, exc.type, exc.message))
    except WebSocketDisconnect:
        pass
    finally:
        for job_id in mine.values():  # the page went away: free its slots
            broker.cancel(job_id)
        send_task.cancel()
        try:
            await websocket.close(code, reason)
        except Exception:  # already closed
            pass


def _rename(msg: wire.Message, page_id: str) -> wire.Message:
    data = asdict(msg)
    data["id"] = page_id
    return type(msg)(**data)
