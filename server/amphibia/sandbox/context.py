"""The request a guest is serving, visible to host functions.

wasmtime-py hands host functions a bare store context, not our Store, so the runtime sets this
context variable around each guest call; the guest runs on one thread from start to end, so the
value is exactly that request's for every host call it makes.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

from ..config import AppSpec


@dataclass
class RequestContext:
    app: AppSpec
    request_id: str
    # Pauses the guest's CPU deadline while the host works for it (set by the runtime).
    host_wait: Callable[[], ContextManager[None]] = contextlib.nullcontext
    # Host-side objects behind guest resource handles, e.g. token streams. Only this request's
    # thread touches it.
    resources: dict[int, Any] = field(default_factory=dict)
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
