"""The `response-stream` host interface: an app's streamed answer (status and headers, then body
pieces) going from its guest thread to whoever serves the request.

Two sinks: `StreamChannel` hands pieces to the event loop as they come, for the gateway's streamed
HTTP response, with backpressure (a write waits while MAX_PENDING pieces are unread, its wait not
counted as guest CPU); `Buffered` keeps them for callers that want a whole response (notebooks,
benchmarks). A write after the request ended (client gone, deadline passed) fails, and the SDK then
stops the app's iterator, which drops its `llm` streams.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from wasmtime.component import LinkerInstance

from ..contract import interface
from ..errors import AmphibiaError, GuestError
from .context import current

MAX_PENDING = 32  # pieces written and not yet sent to the client
WAIT_S = 0.1  # how often a blocked write looks whether its request has ended


def check_head(status: Any, headers: Any) -> tuple[int, list[tuple[str, str]]]:
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise GuestError(f"app answered with invalid HTTP status {status}")
    pairs = [(str(k), str(v)) for k, v in headers]
    if any("\n" in k or "\r" in k or "\n" in v or "\r" in v or not k for k, v in pairs):
        raise GuestError("app answered with an invalid header")
    return status, pairs


class Buffered:
    """A streamed answer kept whole, for callers that return one response."""

    def __init__(self) -> None:
        self.head: tuple[int, list[tuple[str, str]]] | None = None
        self.pieces: list[bytes] = []

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.head = (status, headers)

    def write(self, chunk: bytes) -> None:
        self.pieces.append(chunk)


class StreamChannel:
    """Pieces from the guest thread to the event loop. `start` and `write` run on the guest thread;
    `head` (a future) and `pieces` (a queue) are read on the loop. The semaphore counts free places
    in the queue: the loop releases one per piece it takes, so it is shared across the two threads
    by design (threading primitives are safe to release from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = loop.create_future()
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the guest has returned
        self._room = threading.Semaphore(MAX_PENDING)

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.head, (status, headers))

    def write(self, chunk: bytes) -> None:
        ctx = current.get()
        with ctx.host_wait():  # a slow reader's wait is not the guest's CPU time
            while not self._room.acquire(timeout=WAIT_S):
                if ctx.end.error is not None:
                    raise ctx.end.error
        self.loop.call_soon_threadsafe(self.pieces.put_nowait, chunk)

    def finish(self) -> None:
        """On the loop, once the guest has returned: after its last piece (pieces are queued through
        the same loop, in order), mark the end."""
        self.pieces.put_nowait(None)

    def taken(self) -> None:
        """The loop sent a piece: one more place for the guest."""
        self._room.release()


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class ResponseStreamHost:
    interface = interface("response-stream")

    @staticmethod
    def _start(store: Any, status: int, headers: list) -> str | None:
        ctx = current.get()
        try:
            if ctx.end.error is not None:
                raise ctx.end.error
            if ctx.started:
                raise GuestError("the response was already started")
            ctx.response.start(*check_head(status, headers))
            ctx.started = True
            return None
        except AmphibiaError as exc:
            return exc.message

    @staticmethod
    def _write(store: Any, chunk: bytes) -> str | None:
        ctx = current.get()
        try:
            if ctx.end.error is not None:
                raise ctx.end.error
            if not ctx.started:
                raise GuestError("write before start")
            ctx.response.write(bytes(chunk))
            return None
        except AmphibiaError as exc:
            return exc.message

    def add_to_linker(self, root: LinkerInstance) -> None:
        with root.add_instance(self.interface) as li:
            li.add_func("start", self._start)
            li.add_func("write", self._write)
