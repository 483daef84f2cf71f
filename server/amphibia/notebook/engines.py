"""The kernel's engine: one object the inference service holds for good, behind which the model can change.

A wasmtime component is tied to the Runtime (and its wasmtime Engine) that compiled it, so the
kernel keeps one Runtime, one inference service and this switch, and swaps what sits behind it:
the in-process model, or a remote gateway's pool (`remote.BridgeEngine`). The same object lets a
notebook watch the tokens of one request: a guest returns its response only at the end, so live
tokens can only be seen here, on the host side, as the engine hands them over.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Mapping

from ..config import AppSpec
from ..errors import AmphibiaError
from ..inference.engine import Cancel, CallSink, Engine, GenerationSink
from ..inference.types import Call, Generation, Usage


class _TappedSink:
    """A generation's sink that also reports each piece to `on_piece`: the engine and the reader
    stay as they are, and the notebook sees exactly the pieces the guest gets."""

    def __init__(self, inner: GenerationSink, on_piece: Callable[[str], None]) -> None:
        self._inner, self._on_piece = inner, on_piece

    def token(self, text: str) -> None:
        if text:
            self._on_piece(text)
        self._inner.token(text)

    def done(self, usage: Usage, finish_reason: str) -> None:
        self._inner.done(usage, finish_reason)

    def fail(self, error: AmphibiaError) -> None:
        self._inner.fail(error)


class EngineSwitch:
    """An `Engine` that forwards to the current engine, and taps the tokens of chosen requests."""

    def __init__(self, make_local: Callable[[], Engine], local: Engine | None = None) -> None:
        self._make_local = make_local
        self._local = local
        self._current: Engine | None = local
        self.label = "local"
        self._owns_local = local is None  # an engine handed in (tests share one) is not ours to close
        self._lock = threading.Lock()
        self._taps: dict[str, Callable[[str], None]] = {}

    @property
    def current(self) -> Engine:
        with self._lock:
            if self._current is None:
                self._local = self._local or self._make_local()
                self._current = self._local
            return self._current

    @property
    def local(self) -> Engine:
        with self._lock:
            if self._local is None:
                self._local = self._make_local()
            return self._local

    def use(self, engine: Engine | None, label: str = "local") -> None:
        """Serve from `engine` from now on (None: the in-process model). The old remote one is closed."""
        with self._lock:
            old = self._current
            self._current, self.label = engine, label
        if old is not None and old is not self._local and old is not engine:
            old.close()

    @contextlib.contextmanager
    def tap(self, request_id: str, on_piece: Callable[[str], None]) -> Iterator[None]:
        """Report every generated piece of request `request_id` to `on_piece` while inside."""
        self._taps[request_id] = on_piece
        try:
            yield
        finally:
            self._taps.pop(request_id, None)

    # --- inference.engine.Engine ----------------------------------------------------------------------
    def models(self) -> Mapping[str, int]:
        return self.current.models()

    def purposes(self) -> Mapping[str, str]:
        purposes = getattr(self.current, "purposes", None)
        return purposes() if purposes is not None else {}

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        on_piece = self._taps.get(generation.request_id)
        return self.current.generate(caller, generation, _TappedSink(sink, on_piece) if on_piece else sink)

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        return self.current.call(caller, call, sink)

    def close(self) -> None:
        with self._lock:
            current, local, owns = self._current, self._local, self._owns_local
            self._current = None
            if owns:
                self._local = None
        if current is not None and current is not local:
            current.close()
        if local is not None and owns:
            local.close()
