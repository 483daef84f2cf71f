"""The one interface between the inference service and whatever runs models (an engine).

Engines implemented here: the in-process batcher (`inprocess.InProcessEngine`), the pool of worker
processes behind the broker (`pool.engine.PoolEngine`), and in notebooks a remote gateway's bridge
(`notebook.remote.BridgeEngine`) and a switch between those (`notebook.engines.EngineSwitch`).

An engine receives work already checked by the service, together with the caller (the app on whose
behalf it runs, for fairness, limits and logs), and reports results to a sink. Engines may be
called from any thread and may call sinks from any thread; sinks hand over to their reader safely.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from ..config import AppSpec
from ..errors import AmphibiaError
from .types import Call, Generation, Usage

# Frees the engine's slot for one request and ends it: a generation with done(usage so far,
# "cancelled"). Idempotent, from any thread.
Cancel = Callable[[], None]


class GenerationSink(Protocol):
    """Where a generation's events go: text pieces, then exactly one of done / fail."""

    def token(self, text: str) -> None: ...
    def done(self, usage: Usage, finish_reason: str) -> None: ...
    def fail(self, error: AmphibiaError) -> None: ...


class CallSink(Protocol):
    """Where a call's answer goes: exactly one of result / fail."""

    def result(self, value: Any) -> None: ...
    def fail(self, error: AmphibiaError) -> None: ...


class Engine(Protocol):
    def models(self) -> Mapping[str, int]:
        """The models this engine serves, each with its context size in tokens."""
        ...

    # Optional: `purposes() -> Mapping[str, str]`, each model's purpose ("generation" or "embeddings"),
    # which the service checks requests against (models an engine does not list are not checked).

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        """Start `generation`; raise at once (e.g. Overloaded) when it cannot be queued."""
        ...

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel: ...

    def close(self) -> None: ...
