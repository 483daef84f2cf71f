"""The gateway's pool endpoints: `/pool` WebSocket for workers, `GET /pool` JSON, `/metrics`."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import wire
from .broker import Broker, WorkerLink

log = logging.getLogger("amphibia.pool")
HELLO_TIMEOUT_S = 10.0


async def worker_socket(websocket: WebSocket) -> None:
    gateway = websocket.app.state.gateway
    broker: Broker | None = gateway.broker
    await websocket.accept()
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    if broker is None:
        await websocket.close(wire.CLOSE_PROTOCOL, "this gateway has no pool")
        return
    try:
        hello = wire.decode(await asyncio.wait_for(websocket.receive_text(), HELLO_TIMEOUT_S), (wire.Hello,))
    except (asyncio.TimeoutError, wire.ProtocolError, WebSocketDisconnect, KeyError, RuntimeError) as exc:
        log.warning("pool: rejected %s before hello: %s", peer, exc)
        await _close(websocket, wire.CLOSE_PROTOCOL, "expected a hello message")
        return
    assert isinstance(hello, wire.Hello)
    if not hmac.compare_digest(hello.token.encode(), gateway.pool_token.encode()):
        log.warning("pool: rejected worker %s from %s: bad pool token", hello.worker_id, peer)
        await _close(websocket, wire.CLOSE_BAD_TOKEN, "bad pool token")
        return
    outbox: asyncio.Queue[wire.Message] = asyncio.Queue()
    link = WorkerLink(id=hello.worker_id, models=list(hello.models), slots=max(1, int(hello.slots)),
                      device=hello.device, send=outbox.put_nowait)
    await websocket.send_text(wire.Welcome(worker_id=link.id, heartbeat_s=broker.config.heartbeat_s).encode())
    broker.add_worker(link)

    async def sender() -> None:
        while True:
            await websocket.send_text((await outbox.get()).encode())

    async def watchdog() -> None:  # a worker that stops talking is treated as gone
        while time.monotonic() - link.last_seen < 5 * broker.config.heartbeat_s:
            await asyncio.sleep(broker.config.heartbeat_s)
        log.warning("pool: worker %s missed its heartbeats", link.id)

    send_task, watch_task = asyncio.create_task(sender()), asyncio.create_task(watchdog())
    code, reason = 1000, ""
    try:
        while not watch_task.done():
            receive = asyncio.create_task(websocket.receive())
            done, _ = await asyncio.wait({receive, watch_task, send_task}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            frame = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                broker.on_message(link, wire.decode(frame, wire.WORKER_TO_GATEWAY))
            except wire.ProtocolError as exc:
                log.warning("pool: worker %s sent a bad frame, closing: %s", link.id, exc)
                code, reason = (wire.CLOSE_TOO_BIG if "over the" in str(exc) else wire.CLOSE_PROTOCOL), str(exc)[:120]
                break
    except WebSocketDisconnect:
        pass
    finally:
        send_task.cancel()
        watch_task.cancel()
        broker.remove_worker(link)
        await _close(websocket, code, reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except Exception:  # already closed by the peer
        pass


async def pool_status(request: Request) -> Response:
    broker: Broker | None = request.app.state.gateway.broker
    if broker is None:
        return JSONResponse({"workers": [], "queues": {}, "service": {}, "queued": 0, "pool": False})
    try:
        since = float(request.query_params.get("since", "0"))
    except ValueError:
        since = 0.0
    return JSONResponse({**broker.snapshot(), "timeline": [e for e in broker.timeline if e["t"] > since]})


async def metrics(request: Request) -> Response:
    broker: Broker | None = request.app.state.gateway.broker
    body = generate_latest(broker.metrics.registry) if broker else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
