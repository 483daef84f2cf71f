"""Pool work as wire messages and back: one place that turns a checked request into the `assign` or
`call` a worker runs, and a worker's answers into sink events (for every engine that speaks the wire)."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

from ...config import AppSpec
from ...errors import AmphibiaError, llm_error, retry_after_ms
from ..engine import CallSink, GenerationSink
from ..types import Call, Generation, Usage
from . import wire

if TYPE_CHECKING:
    from .broker import WorkerLink

_ids = itertools.count(1)


def next_id(prefix: str = "j") -> str:
    return f"{prefix}{next(_ids)}"


def assign_message(job_id: str, generation: Generation, text: str | None = None, generated: int | None = None,
                   ids: Sequence[int] = (), params: dict | None = None) -> wire.Assign:
    """The `assign` for `generation`, resuming after `text` (`generated` tokens, `ids` when known)
    already delivered; by default, after the generation's own `resume_text`. `params`: the
    generation's params as a dict, when the caller has them already."""
    messages = [dict(m) for m in generation.messages] if generation.messages is not None else None
    params = asdict(generation.params) if params is None else params
    return wire.Assign(id=job_id, model=generation.model, params=params, prompt=generation.prompt,
                       messages=messages, resume_text=generation.resume_text if text is None else text,
                       resume_tokens=generation.resume_tokens if generated is None else generated,
                       resume_ids=list(ids))


def call_message(job_id: str, call: Call) -> wire.Call:
    return wire.Call(id=job_id, model=call.model, method=call.method, args=dict(call.args))


def failed_message(job_id: str, error: AmphibiaError) -> wire.Failed:
    return wire.Failed(job_id, error.type, error.message, retry_after_ms(error))


def error_of(msg: wire.Failed) -> AmphibiaError:
    return llm_error(msg.error_type, msg.message, msg.retry_after_ms)


def deliver_generation(msg: wire.Message, sink: GenerationSink) -> bool:
    """Hand a worker's message about a generation to its sink; True once the generation has ended."""
    if isinstance(msg, wire.Token):
        sink.token(msg.text)
        return False
    if isinstance(msg, wire.Done):
        sink.done(Usage(msg.prompt_tokens, msg.generated_tokens), msg.finish_reason)
        return True
    if isinstance(msg, wire.Failed):
        sink.fail(error_of(msg))
        return True
    return False  # started, preempted: the broker's business


def deliver_call(msg: wire.Message, sink: CallSink) -> bool:
    if isinstance(msg, wire.Result):
        sink.result(msg.value)
        return True
    if isinstance(msg, wire.Failed):
        sink.fail(error_of(msg))
        return True
    return False


@dataclass(eq=False)
class GenerationJob:
    """A generation in the broker: queued, running on a worker's slot, or preempted and waiting."""

    app: AppSpec
    generation: Generation
    sink: GenerationSink
    id: str = field(default_factory=next_id)
    text: str = ""  # delivered so far (a resumed page's text included)
    generated: int = 0
    ids: list[int] = field(default_factory=list)  # the tokens of `text`, when the workers said them
    prompt_tokens: int = 0
    worker: "WorkerLink | None" = None
    slice_start: int = 0
    preempting: bool = False
    started: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    last_token: float = 0.0
    preemptions: int = 0
    assigned_at: float = 0.0
    admitted_at: float = 0.0  # when its worker said Started (this slice)
    missed: int = 0  # consecutive heartbeats of its worker that did not list it
    crashes: int = 0  # workers that went away while holding it
    deadline: float = 0.0  # monotonic; the app's llm_timeout_s after submission
    _params: dict | None = field(default=None, repr=False)  # the generation's params as sent, made once

    def __post_init__(self) -> None:
        self.text, self.generated = self.generation.resume_text, self.generation.resume_tokens
        self.deadline = self.enqueued + self.app.limits.llm_timeout_s

    @property
    def model(self) -> str:
        return self.generation.model

    @property
    def request_id(self) -> str:
        return self.generation.request_id

    def assign(self) -> wire.Assign:
        # Resume from the delivered token ids when they cover everything delivered (not after a page's
        # own text), so that a greedy answer goes on exactly as it would have.
        ids = self.ids if not self.generation.resume_text else []
        if self._params is None:  # a preempted job is assigned again and again: asdict copies deeply
            self._params = asdict(self.generation.params)
        return assign_message(self.id, self.generation, self.text, self.generated, ids, self._params)


@dataclass(eq=False)
class CallJob:
    """An embed, tokenize or detokenize call in the broker."""

    app: AppSpec
    call: Call
    sink: CallSink
    id: str = field(default_factory=lambda: next_id("c"))
    worker: "WorkerLink | None" = None
    enqueued: float = field(default_factory=time.monotonic)
    crashes: int = 0  # workers that went away while holding it
    deadline: float = 0.0  # monotonic; the app's llm_timeout_s after submission

    def __post_init__(self) -> None:
        self.deadline = self.enqueued + self.app.limits.llm_timeout_s

    @property
    def model(self) -> str:
        return self.call.model

    @property
    def request_id(self) -> str:
        return self.call.request_id

    def message(self) -> wire.Call:
        return call_message(self.id, self.call)
