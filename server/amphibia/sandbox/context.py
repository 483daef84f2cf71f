"""The request a guest is serving, visible to host functions.

wasmtime-py hands host functions a bare store context, not our Store, so the runtime sets this
context variable around each guest call; the guest runs on one thread from start to end, so the
value is exactly that request's for every host call it makes.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol

from ..config import AppSpec
from ..errors import AmphibiaError


class Abortable(Protocol):
    def abort(self, error: AmphibiaError) -> None: ...


class RequestEnd:
    """Ends a request's host work from outside its guest thread: when its client leaves or its wall
    clock deadline passes, the event loop calls `end`, which fails the inference the guest waits on
    and every later host call. The set of open streams is shared by the guest thread (which adds and
    removes) and the loop (which aborts), so it has a lock."""

    def __init__(self) -> None:
        self.error: AmphibiaError | None = None
        self._open: set[Abortable] = set()
        self._lock = threading.Lock()

    def track(self, stream: Abortable) -> None:
        with self._lock:
            if self.error is None:
                self._open.add(stream)
                return
        stream.abort(self.error)

    def untrack(self, stream: Abortable) -> None:
        with self._lock:
            self._open.discard(stream)

    def end(self, error: AmphibiaError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            streams, self._open = list(self._open), set()
        for stream in streams:
            stream.abort(error)


@dataclass
class RequestContext:
    app: AppSpec
    request_id: str
    # Pauses the guest's CPU deadline while the host works for it (set by the runtime).
    host_wait: Callable[[], ContextManager[None]] = contextlib.nullcontext
    end: RequestEnd = field(default_factory=RequestEnd)
    # Host-side objects behind guest resource handles, e.g. token streams. Only this request's
    # thread touches it.
    resources: dict[int, Any] = field(default_factory=dict)
    # Where a streamed answer goes (`response_host`): a StreamChannel for the gateway, else Buffered.
    response: Any = None
    started: bool = False  # the guest called response-stream.start
    _next_rep: int = 1

    def add_resource(self, obj: Any) -> int:
        rep = self._next_rep
        self._next_rep += 1
        self.resources[rep] = obj
        return rep

    def close(self) -> Iterator[Any]:
        """Hand back resources the guest never dropped (a trap, an early return)."""
        while self.resources:
            yield self.resources.popitem()[1]


current: ContextVar[RequestContext] = ContextVar("amphibia_request")
