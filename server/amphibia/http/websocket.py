"""One WebSocket session loop for the gateway's two sockets (`/pool` for workers, `/bridge` for pages):
frames in to a handler, messages out from an outbox, until either side ends it."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..inference.pool import wire

Frame = str | bytes | None


async def close(websocket: WebSocket, code: int, reason: str = "") -> None:
    with contextlib.suppress(Exception):  # already closed by the peer
        await websocket.close(code, reason[:120])


async def run_session(websocket: WebSocket, outbox: asyncio.Queue[wire.Message], on_frame: Callable[[Frame], None],
                      until: Awaitable[object] | None = None) -> tuple[int, str]:
    """Serve an accepted socket: each received frame goes to `on_frame`, each message put in `outbox`
    is sent. Ends when the peer leaves, `on_frame` raises `wire.ProtocolError` (its close code and
    text close the socket), or `until` completes (e.g. a watchdog). Returns the close code and reason
    after closing the socket."""

    async def sender() -> None:
        while True:
            await websocket.send_text((await outbox.get()).encode())

    send_task = asyncio.create_task(sender())
    stop_task = asyncio.ensure_future(until) if until is not None else None
    code, reason = 1000, ""
    try:
        while True:
            receive = asyncio.create_task(websocket.receive())
            waits = {receive, send_task} | ({stop_task} if stop_task else set())
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
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
        if stop_task is not None:
            stop_task.cancel()
        await close(websocket, code, reason)
    return code, reason
