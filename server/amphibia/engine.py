"""The one interface between the `llm` host capability and whatever runs the model.

Issue-2's in-process engine (`local_engine.LocalEngine`) implements it; the pool of workers
implements the same interface, so the runtime and host interfaces never change when it does.
Calls are blocking: they come from guest threads, never from the event loop.
"""
from __future__ import annotations

import codecs
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from .errors import AmphibiaError, InferenceTimeout, InvalidInput, LLMError, ModelNotSupported


@dataclass(frozen=True)
class SamplingParams:
    """Spin's defaults, plus stop strings and a seed."""

    max_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """From a wire message's `params` (unknown keys ignored); a malformed value is InvalidInput."""
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            if "stop" in values:
                values["stop"] = tuple(values["stop"])
            return cls(**values)
        except TypeError as exc:
            raise InvalidInput(f"invalid params: {exc}") from None

    def validate(self, max_context: int | None = None) -> "SamplingParams":
        def bad(msg: str) -> InvalidInput:
            return InvalidInput(f"invalid params: {msg}")

        for name in ("temperature", "top_p", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(f"{name} must be a finite number")
        if self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if max_context is not None and self.max_tokens > max_context:
            raise bad(f"max_tokens {self.max_tokens} exceeds the model's context of {max_context} tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad(f"temperature must be between 0 and 2, got {self.temperature}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repeat_penalty <= 10.0:
            raise bad(f"repeat_penalty must be in (0, 10], got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise bad(f"repeat_penalty_last_n_token_count must be >= 0, got {self.repeat_last_n}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise bad("stop takes at most 16 non-empty strings of at most 256 characters")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad("seed must fit in a u64")
        return self


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: str  # "stop" (end of text or a stop string) or "length"


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    # Exactly one of prompt / messages; messages are rendered with the model's chat template.
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # Who asked, for fairness, logs and metrics.
    app: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class _End:
    usage: Usage
    finish_reason: str


class TokenStream:
    """Text pieces handed from the thread that runs the model to the thread that asked.

    The producer calls `put`/`finish`/`fail`; the consumer iterates or calls `next_piece`, and may
    `cancel`, which the producer sees through `cancelled` and answers by freeing its slot.
    """

    def __init__(self, timeout_s: float = 120.0) -> None:
        self._queue: queue.Queue[str | _End | AmphibiaError] = queue.Queue()
        self._cancelled = threading.Event()
        # Called once on cancel, from the consumer's thread: lets a remote engine free the slot.
        self.on_cancel: Callable[[], None] | None = None
        self._timeout_s = timeout_s
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    # producer side
    def put(self, piece: str) -> None:
        if piece:
            self._queue.put(piece)

    def finish(self, usage: Usage, finish_reason: str) -> None:
        self._queue.put(_End(usage, finish_reason))

    def fail(self, error: AmphibiaError) -> None:
        self._queue.put(error)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # consumer side
    def cancel(self) -> None:
        if self.finish_reason is None and not self._cancelled.is_set():
            self._cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel()

    def next_piece(self) -> str | None:
        """The next piece, or None once generation has ended; raises the engine's error."""
        if self.finish_reason is not None:
            return None
        try:
            item = self._queue.get(timeout=self._timeout_s)
        except queue.Empty:
            self.cancel()
            raise InferenceTimeout(f"no token within {self._timeout_s:g} s") from None
        if isinstance(item, _End):
            self.usage, self.finish_reason = item.usage, item.finish_reason
            return None
        if isinstance(item, AmphibiaError):
            self.finish_reason = "error"
            raise item
        return item

    def __iter__(self) -> Iterator[str]:
        while (piece := self.next_piece()) is not None:
            yield piece

    def collect(self) -> Completion:
        text = "".join(self)
        assert self.usage is not None and self.finish_reason is not None
        return Completion(text, self.usage, self.finish_reason)


class Engine(Protocol):
    """What the `llm` host interface needs from whatever runs models."""

    def has_model(self, model: str) -> bool: ...

    def context_size(self, model: str) -> int: ...

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream: ...

    def embed(self, model: str, texts: Sequence[str], timeout_s: float = 120.0) -> tuple[list[list[float]], int]:
        """One vector per text, and the number of prompt tokens used."""
        ...

    def tokenize(self, model: str, text: str) -> list[int]: ...

    def detokenize(self, model: str, tokens: Sequence[int]) -> str: ...

    def close(self) -> None: ...


class WireCalls:
    """embed, tokenize and detokenize for engines whose model answers `wire.Call(method, args)`
    somewhere else (the pool's workers, a remote gateway's bridge): each engine supplies only
    `_call(model, method, args, timeout_s)`."""

    _call: Callable[[str, str, dict, float], Any]

    def embed(self, model: str, texts: Sequence[str], timeout_s: float = 120.0) -> tuple[list[list[float]], int]:
        value = self._call(model, "embed", {"texts": list(texts)}, timeout_s)
        return value["embeddings"], value["prompt_tokens"]

    def tokenize(self, model: str, text: str, timeout_s: float = 30.0) -> list[int]:
        return self._call(model, "tokenize", {"text": text}, timeout_s)

    def detokenize(self, model: str, tokens: Sequence[int], timeout_s: float = 30.0) -> str:
        return self._call(model, "detokenize", {"tokens": list(tokens)}, timeout_s)


class TextAssembler:
    """Turns token bytes into text pieces: whole UTF-8 characters only, and nothing past a stop string.

    Text that could still become a stop string is held back until it cannot.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """The text that is safe to emit after `data`; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stop:
            out, self._held = self._held, ""
            return out
        cut = min((i for s in self._stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = 0 if final else max(
            (n for s in self._stop for n in range(1, len(s)) if self._held.endswith(s[:n])), default=0
        )
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        return out


def no_such_model(model: str, known: Sequence[str]) -> LLMError:
    return ModelNotSupported(f"model {model!r} is not served here; models: {', '.join(known) or 'none'}")
