"""One WebSocket session loop for the gateway's two sockets (`/pool` for workers, `/bridge` for pages):
frames in to a handler, messages out from an outbox, until either side ends it."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..inference.pool import wire
from .gateway import gateway_of

Frame = str | bytes | None
OUTBOX_LIMIT = 4096  # messages waiting to be sent on one socket; more means the peer is not reading


class Outbox:
    """Messages waiting for one socket. Bounded: a peer that stops reading is disconnected rather than
    let the gateway's memory grow; `put` never raises, so the broker can send from anywhere."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.queue: asyncio.Queue[wire.Message] = asyncio.Queue(limit)
        self.overflowed = asyncio.Event()

    def put(self, message: wire.Message) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed.set()


def capped(handler: Callable[[WebSocket], Awaitable[None]]) -> Callable[[WebSocket], Awaitable[None]]:
    """A WebSocket endpoint that refuses a client already holding `[server] max_sockets_per_ip`."""

    async def endpoint(websocket: WebSocket) -> None:
        counts = gateway_of(websocket).sockets
        ip = counts.take(websocket)
        if ip is None:  # accepted first, so that the client reads the close code and its reason
            await websocket.accept()
            await close(websocket, wire.CLOSE_FLOOD, "too many sockets from this address")
            return
        try:
            await handler(websocket)
        finally:
            counts.release(ip)

    return endpoint


async def close(websocket: WebSocket, code: int, reason: str = "") -> None:
    with contextlib.suppress(Exception):  # already closed by the peer
        await websocket.close(code, reason[:120])


async def run_session(websocket: WebSocket, outbox: Outbox, on_frame: Callable[[Frame], None],
                      until: Awaitable[object] | None = None) -> tuple[int, str]:
    """Serve an accepted socket: each received frame goes to `on_frame`, each message put in `outbox`
    is sent. Ends when the peer leaves, `on_frame` raises `wire.ProtocolError` (its close code and
    text close the socket), the peer stops reading (CLOSE_NOT_READING), or `until` completes (e.g. a
    watchdog). Returns the close code and reason after closing the socket."""

    async def sender() -> None:
        while True:
            await websocket.send_text((await outbox.queue.get()).encode())

    async def overflow() -> None:
        await outbox.overflowed.wait()
        raise wire.ProtocolError("the peer does not read what it is sent", wire.CLOSE_NOT_READING)

    send_task = asyncio.create_task(sender())
    overflow_task = asyncio.create_task(overflow())
    stop_task = asyncio.ensure_future(until) if until is not None else None
    code, reason = 1000, ""
    try:
        while True:
            receive = asyncio.create_task(websocket.receive())
            waits = {receive, send_task, overflow_task} | ({stop_task} if stop_task else set())
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if overflow_task in done:
                receive.cancel()
                code, reason = wire.CLOSE_NOT_READING, "the peer does not read what it is sent"
                break
            if receive not in done:
                receive.cancel()
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            try:
                on_frame(message.get("text") if message.get("text") is not None else message.get("bytes"))
            except wire.ProtocolError as exc:
                code, reason = exc.code, str(exc)
                break
    except WebSocketDisconnect:
        pass
    finally:
        send_task.cancel()
        overflow_task.cancel()
        if stop_task is not None:
            stop_task.cancel()
        await close(websocket, code, reason)
    return code, reason
