"""The kernel's engine: one object the Runtime holds for good, behind which the model can change.

A wasmtime component is tied to the Runtime (and its wasmtime Engine) that compiled it, so the
kernel keeps one Runtime and swaps what sits behind its `llm` host instead: the in-process model,
or a remote gateway's pool (`remote.BridgeEngine`). The same object lets a notebook watch the
tokens of one request: a guest returns its response only at the end, so live tokens can only be
seen here, on the host side, as the guest reads them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

from ..engine import Engine, GenerateRequest, TokenStream


class ObservedStream(TokenStream):
    """A TokenStream that reports each piece to `on_piece` as the guest reads it.

    The producer (the engine) keeps filling the inner stream; this one only sits on the
    consumer side, so the engine needs no change and the guest sees exactly the same pieces.
    """

    def __init__(self, inner: TokenStream, on_piece: Callable[[str], None]) -> None:
        super().__init__()
        self._inner, self._on_piece = inner, on_piece

    @property
    def cancelled(self) -> bool:
        return self._inner.cancelled

    def cancel(self) -> None:
        self._inner.cancel()

    def next_piece(self) -> str | None:
        try:
            piece = self._inner.next_piece()
        finally:
            self.usage, self.finish_reason = self._inner.usage, self._inner.finish_reason
        if piece is not None:
            self._on_piece(piece)
        return piece


class EngineSwitch:
    """`engine.Engine` that forwards to the current engine, and taps the tokens of chosen requests."""

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

    # --- engine.Engine ------------------------------------------------------------------------------
    def has_model(self, model: str) -> bool:
        return self.current.has_model(model)

    def context_size(self, model: str) -> int:
        return self.current.context_size(model)

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream:
        stream = self.current.generate(request, timeout_s)
        on_piece = self._taps.get(request.request_id)
        return ObservedStream(stream, on_piece) if on_piece else stream

    def embed(self, model: str, texts: Sequence[str], timeout_s: float = 120.0) -> tuple[list[list[float]], int]:
        return self.current.embed(model, texts, timeout_s)

    def tokenize(self, model: str, text: str) -> list[int]:
        return self.current.tokenize(model, text)

    def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        return self.current.detokenize(model, tokens)

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
