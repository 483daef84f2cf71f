"""The two views of one request's results: blocking for guest threads, awaitable for the event loop.

Both are sinks an engine writes to from whatever thread it runs on. The deadline is the wall time of
the whole call, queueing included (`llm_timeout_s`); when it passes, the reader gets
InferenceTimeout and the engine's slot is freed.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import queue
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from ..errors import AmphibiaError, InferenceTimeout
from .engine import Cancel
from .types import Completion, Usage


@dataclass(frozen=True)
class _End:
    usage: Usage
    finish_reason: str


class _Stream(abc.ABC):
    """What both views share: the cancel hook, the deadline, and turning items into pieces."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._cancel: Cancel | None = None
        self._cancelled = False
        self.usage: Usage | None = None
        self.finish_reason: str | None = None  # "stop", "length"; "error" once it failed

    def attach(self, cancel: Cancel) -> None:
        """The engine's way to free this request's slot (set once the engine took it)."""
        self._cancel = cancel
        if self._cancelled:
            cancel()

    def cancel(self) -> None:
        if self.finish_reason is None and not self._cancelled:
            self._cancelled = True
            if self._cancel is not None:
                self._cancel()

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _timed_out(self) -> InferenceTimeout:
        self.cancel()
        self.finish_reason = "error"
        return InferenceTimeout(f"the model did not finish within {self.timeout_s:g} s")

    def _take(self, item: Any) -> str | None:
        if isinstance(item, _End):
            self.usage, self.finish_reason = item.usage, item.finish_reason
            return None
        if isinstance(item, AmphibiaError):
            self.finish_reason = "error"
            raise item
        return item

    # sink side (any thread): each view only says how an item reaches its reader (`_put`)
    @abc.abstractmethod
    def _put(self, item: Any) -> None: ...

    def token(self, text: str) -> None:
        if text:
            self._put(text)

    def done(self, usage: Usage, finish_reason: str) -> None:
        self._put(_End(usage, finish_reason))

    def fail(self, error: AmphibiaError) -> None:
        self._put(error)

    def _completion(self, text: str) -> Completion:
        assert self.usage is not None and self.finish_reason is not None
        return Completion(text, self.usage, self.finish_reason)


class TokenStream(_Stream):
    """The blocking view (a guest thread reads it); the engine's thread writes it."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s)
        self._queue: queue.Queue[Any] = queue.Queue()

    def _put(self, item: Any) -> None:
        self._queue.put(item)

    def abort(self, error: AmphibiaError) -> None:
        """From any thread: free the engine's slot and make the reader raise `error` next."""
        self.cancel()
        self._queue.put(error)

    # reader side
    def next_piece(self) -> str | None:
        """The next piece, or None once generation has ended; raises the engine's error."""
        if self.finish_reason is not None:
            return None
        try:
            item = self._queue.get(timeout=self._remaining())
        except queue.Empty:
            raise self._timed_out() from None
        return self._take(item)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.next_piece()) is not None:
            yield piece

    def collect(self) -> Completion:
        return self._completion("".join(self))


class AsyncTokenStream(_Stream):
    """The awaitable view, read on the event loop it was made on; the engine may write from any thread."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is left to read
            pass

    async def next_piece(self) -> str | None:
        if self.finish_reason is not None:
            return None
        try:
            item = await asyncio.wait_for(self._queue.get(), self._remaining())
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        return self._take(item)

    async def __aiter__(self) -> AsyncIterator[str]:
        """The pieces; a reader that stops early (or is cancelled) frees the engine's slot."""
        try:
            while (piece := await self.next_piece()) is not None:
                yield piece
        finally:
            self.cancel()

    async def collect(self) -> Completion:
        return self._completion("".join([piece async for piece in self]))


class CallWaiter:
    """A call's answer, waited for from a thread (`wait`) or on the loop (`wait_async`), within a
    deadline counted from its start."""

    def __init__(self, timeout_s: float = 120.0, what: str = "call") -> None:
        self.timeout_s, self.what = timeout_s, what
        self._deadline = time.monotonic() + timeout_s
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._cancel: Cancel | None = None

    def attach(self, cancel: Cancel) -> None:
        self._cancel = cancel

    def result(self, value: Any) -> None:
        try:
            self.future.set_result(value)
        except concurrent.futures.InvalidStateError:  # timed out or cancelled meanwhile
            pass

    def fail(self, error: AmphibiaError) -> None:
        try:
            self.future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass

    def cancel(self) -> None:
        if not self.future.done() and self._cancel is not None:
            self._cancel()

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _timed_out(self) -> InferenceTimeout:
        self.cancel()
        return InferenceTimeout(f"{self.what} did not finish within {self.timeout_s:g} s")

    def wait(self) -> Any:
        try:
            return self.future.result(self._remaining())
        except concurrent.futures.TimeoutError:
            raise self._timed_out() from None

    async def wait_async(self) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.future), self._remaining())
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except asyncio.CancelledError:
            self.cancel()
            raise
