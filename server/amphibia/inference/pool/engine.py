"""`PoolEngine`: the engine interface over the broker, which places work on worker processes.

The broker's state lives on the gateway's event loop and is touched only there: a call from the
loop (an HTTP handler, the bridge) submits directly; a call from a guest thread hops onto the loop
and waits for the broker's answer, so a refusal (Overloaded) is raised in the caller's thread.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping

from ...config import AppSpec, ModelSpec
from ...errors import InferenceTimeout
from ..engine import Cancel, CallSink, GenerationSink
from ..types import Call, Generation
from .broker import Broker
from .jobs import CallJob, GenerationJob


class PoolEngine:
    def __init__(self, broker: Broker, models: Mapping[str, ModelSpec]) -> None:
        self.broker = broker
        self._models = {name: spec.n_ctx for name, spec in models.items()}
        self._purposes = {name: spec.purpose for name, spec in models.items()}
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the broker lives on (known once the gateway starts)."""
        self.loop = loop

    def models(self) -> Mapping[str, int]:
        return self._models

    def purposes(self) -> Mapping[str, str]:
        return self._purposes

    def _on_loop(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        if self.loop is None:
            raise InferenceTimeout("the pool is not running yet")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def _canceller(self, job_id: str) -> Cancel:
        loop = self.loop
        assert loop is not None

        def cancel() -> None:
            try:
                loop.call_soon_threadsafe(self.broker.cancel, job_id)
            except RuntimeError:  # the gateway is shutting down
                pass

        return cancel

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        job = GenerationJob(caller, generation, sink)
        self._on_loop(lambda: self.broker.submit(job))
        return self._canceller(job.id)

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        job = CallJob(caller, call, sink)
        self._on_loop(lambda: self.broker.submit_call(job))
        return self._canceller(job.id)

    def close(self) -> None:
        pass
