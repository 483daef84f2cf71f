"""`PoolEngine`: the `engine.Engine` interface over the broker, for guests running in threads.

A guest thread blocks on its TokenStream (a thread-safe queue) while the broker, on the event
loop, fills it; every hand-over between the two goes through `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable

from ..chat_template import validate_messages
from ..config import AppSpec, ModelSpec
from ..engine import GenerateRequest, TokenStream, Usage, WireCalls, no_such_model
from ..errors import AmphibiaError, InferenceTimeout
from ..host.context import current
from .broker import Broker, Job


class StreamSink:
    """Broker events -> a guest thread's TokenStream."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream

    def token(self, text: str) -> None:
        self.stream.put(text)

    def done(self, usage: Usage, finish_reason: str) -> None:
        self.stream.finish(usage, finish_reason)

    def fail(self, error: AmphibiaError) -> None:
        self.stream.fail(error)

    def result(self, value: Any) -> None:  # not used for generations
        pass


class FutureSink:
    """Broker events for a call (embed, tokenize, detokenize) -> a concurrent Future."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def token(self, text: str) -> None:
        pass

    def done(self, usage: Usage, finish_reason: str) -> None:
        pass

    def fail(self, error: AmphibiaError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def result(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)


class PoolEngine(WireCalls):
    def __init__(self, broker: Broker, models: dict[str, ModelSpec], default_app: AppSpec) -> None:
        self.broker, self.models = broker, models
        self.default_app = default_app  # for calls made outside a guest (tests, notebooks)
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the broker lives on (known once the gateway starts)."""
        self.loop = loop

    def _app(self) -> AppSpec:
        ctx = current.get(None)
        return ctx.app if ctx is not None else self.default_app

    def _on_loop(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        async def run() -> Any:
            return fn()

        if self.loop is None:
            raise InferenceTimeout("the pool is not running yet")
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def has_model(self, model: str) -> bool:
        return model in self.models

    def context_size(self, model: str) -> int:
        if model not in self.models:
            raise no_such_model(model, list(self.models))
        return self.models[model].n_ctx

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream:
        request.params.validate(self.context_size(request.model))
        if request.messages is not None:
            validate_messages(request.messages)
        stream = TokenStream(timeout_s)
        messages = list(request.messages) if request.messages is not None else None
        job = Job.generation(self._app(), request.model, StreamSink(stream), request.params, request.prompt, messages)
        self._on_loop(lambda: self.broker.submit(job))  # raises Overloaded here, in the caller's thread
        stream.on_cancel = lambda: self.loop.call_soon_threadsafe(self.broker.cancel, job.id)
        return stream

    def _call(self, model: str, method: str, args: dict, timeout_s: float) -> Any:
        if model not in self.models:
            raise no_such_model(model, list(self.models))
        sink = FutureSink()
        job = Job.calling(self._app(), model, sink, method, args)
        self._on_loop(lambda: self.broker.submit(job))
        try:
            return sink.future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self.loop.call_soon_threadsafe(self.broker.cancel, job.id)
            raise InferenceTimeout(f"{method} did not finish within {timeout_s:g} s") from None

    def close(self) -> None:
        pass
