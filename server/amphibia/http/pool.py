"""The pool's front door: `/pool` WebSocket for workers, `GET /pool` JSON, `/metrics`."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..inference.pool import wire
from ..inference.pool.broker import Broker, WorkerLink
from .gateway import gateway_of
from .websocket import Frame, Outbox, close, run_session

log = logging.getLogger("amphibia.pool")
HELLO_TIMEOUT_S = 3.0  # an unauthenticated socket is not held longer than this


async def worker_socket(websocket: WebSocket) -> None:
    gateway = gateway_of(websocket)
    broker = gateway.broker
    await websocket.accept()
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    if broker is None:
        await close(websocket, wire.CLOSE_PROTOCOL, "this gateway has no pool")
        return
    try:
        hello = wire.decode(await asyncio.wait_for(websocket.receive_text(), HELLO_TIMEOUT_S), (wire.Hello,))
    except (asyncio.TimeoutError, wire.ProtocolError, WebSocketDisconnect, KeyError, RuntimeError) as exc:
        log.warning("pool: rejected %s before hello: %s", peer, exc)
        await close(websocket, wire.CLOSE_PROTOCOL, "expected a hello message")
        return
    assert isinstance(hello, wire.Hello)
    if not hmac.compare_digest(hello.token.encode(), gateway.pool_token.encode()):
        log.warning("pool: rejected worker %s from %s: bad pool token", hello.worker_id, peer)
        await close(websocket, wire.CLOSE_BAD_TOKEN, "bad pool token")
        return
    if hello.protocol != wire.PROTOCOL_VERSION:
        log.warning("pool: rejected worker %s (%s): protocol %d, this gateway speaks %d", hello.worker_id,
                    hello.version or "?", hello.protocol, wire.PROTOCOL_VERSION)
        await close(websocket, wire.CLOSE_PROTOCOL, f"protocol {hello.protocol} is not {wire.PROTOCOL_VERSION}")
        return
    outbox = Outbox()
    link = WorkerLink(id=hello.worker_id, models=list(hello.models), slots=max(1, int(hello.slots)),
                      device=hello.device, send=outbox.put)
    await websocket.send_text(wire.Welcome(worker_id=link.id, heartbeat_s=broker.config.heartbeat_s).encode())
    broker.add_worker(link)

    def on_frame(frame: Frame) -> None:
        broker.on_message(link, wire.decode(frame, wire.WORKER_TO_GATEWAY))

    async def silent() -> None:  # a worker that stops talking is treated as gone
        while time.monotonic() - link.last_seen < 5 * broker.config.heartbeat_s:
            await asyncio.sleep(broker.config.heartbeat_s)
        log.warning("pool: worker %s missed its heartbeats", link.id)

    try:
        code, reason = await run_session(websocket, outbox, on_frame, until=silent())
        if code != 1000:
            log.warning("pool: worker %s sent a bad frame, closed: %s", link.id, reason)
    finally:
        broker.remove_worker(link)


def _broker(request: Request) -> Broker | None:
    return gateway_of(request).broker


async def pool_status(request: Request) -> Response:
    broker = _broker(request)
    if broker is None:
        return JSONResponse({"workers": [], "queues": {}, "service": {}, "queued": 0, "pool": False})
    try:
        since = float(request.query_params.get("since", "0"))
    except ValueError:
        since = 0.0
    ray = request.app.state.ray_workers
    return JSONResponse({**broker.snapshot(), "timeline": [e for e in broker.timeline if e["t"] > since],
                         **({"ray": ray.snapshot()} if ray is not None else {})})


async def metrics(request: Request) -> Response:
    broker = _broker(request)
    body = generate_latest(broker.metrics.registry) if broker else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
