"""The wire protocol of the pool's workers and the browser bridge: every message type, defined once.

Messages are JSON text frames `{"type": ..., ...}`. `decode` refuses anything that is not exactly
one of these (unknown type, missing or mistyped field, oversized frame) with `ProtocolError`, so a
bad peer is told why and never reaches the broker's state.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

PROTOCOL_VERSION = 2  # checked at hello: a worker of another version is refused with a clear reason
MAX_FRAME_BYTES = 1 << 20  # both ways, in bytes; the WebSocket servers' maximum message size too
# Close codes of the pool's and the bridge's sockets (4000-4999 are the application's own range)
CLOSE_PROTOCOL = 4400
CLOSE_BAD_TOKEN = 4401
CLOSE_ORIGIN = 4403  # bridge: the page's origin is not the token's or not allowed
CLOSE_NOT_READING = 4408  # the peer lets what it is sent pile up
CLOSE_FLOOD = 4429  # bridge: too many messages
CLOSE_TOO_BIG = 1009


class ProtocolError(ValueError):
    """A frame that breaks the protocol; `code` is the WebSocket close code that says so."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Message:
    type: ClassVar[str]

    def encode(self) -> str:
        return json.dumps({"type": self.type, **_plain(self)})


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` without its deep copies: messages are encoded on every token, and the
    copies were most of the cost (json.dumps copies nothing it is given)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- worker -> gateway ------------------------------------------------------------------------
@dataclass
class Hello(Message):
    type: ClassVar[str] = "hello"
    worker_id: str
    token: str
    models: list[str]
    slots: int
    device: str = "cpu"
    version: str = ""
    protocol: int = PROTOCOL_VERSION


@dataclass
class Heartbeat(Message):
    """Liveness, and the ids of every generation the worker holds (running or waiting), so the broker
    can reconcile: re-place what the worker does not know and cancel what it should not hold."""

    type: ClassVar[str] = "heartbeat"
    jobs: list[str] = field(default_factory=list)


@dataclass
class Started(Message):
    """A generation got its slot: `prompt_tokens` are its prompt's (reported to the client),
    `prefill_tokens` all it prefills, resumed text included (what it is charged)."""

    type: ClassVar[str] = "started"
    id: str
    prompt_tokens: int
    prefill_tokens: int = 0


@dataclass
class Token(Message):
    """Text for the client. `ids`: the tokens sampled since the previous `token` message (a token whose
    bytes the text assembler still holds travels with the next piece), so a generation can be resumed
    elsewhere from exactly the tokens delivered, and continues exactly as it would have."""

    type: ClassVar[str] = "token"
    id: str
    text: str
    n: int = 1  # tokens this piece stands for
    ids: list[int] = field(default_factory=list)


@dataclass
class Done(Message):
    type: ClassVar[str] = "done"
    id: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str


@dataclass
class Preempted(Message):
    """The worker dropped a sequence the broker asked it to; the broker resumes it later."""

    type: ClassVar[str] = "preempted"
    id: str


@dataclass
class Result(Message):
    """The answer to a `Call` (embeddings, tokenize, detokenize)."""

    type: ClassVar[str] = "result"
    id: str
    value: Any


@dataclass
class Failed(Message):
    """A request failed; `error_type` is a kind of `errors.LLM_ERRORS`, `retry_after_ms` its retry hint."""

    type: ClassVar[str] = "failed"
    id: str
    error_type: str
    message: str
    retry_after_ms: int = 0


# --- gateway -> worker ------------------------------------------------------------------------
@dataclass
class Welcome(Message):
    type: ClassVar[str] = "welcome"
    worker_id: str
    heartbeat_s: float = 2.0


@dataclass
class Assign(Message):
    """Generate. `prompt` is final text, or None with `messages` for the worker to template.
    `resume_text`: text already generated and delivered (after preemption or a failed worker);
    the worker continues after it without sending it again."""

    type: ClassVar[str] = "assign"
    id: str
    model: str
    params: dict
    prompt: str | None = None
    messages: list[dict] | None = None
    resume_text: str = ""
    resume_tokens: int = 0
    resume_ids: list[int] = field(default_factory=list)  # the delivered tokens, when known (else resume_text)


@dataclass
class Call(Message):
    type: ClassVar[str] = "call"
    id: str
    model: str
    method: str  # "embed" | "tokenize" | "detokenize"
    args: dict = field(default_factory=dict)


@dataclass
class Cancel(Message):
    type: ClassVar[str] = "cancel"
    id: str


@dataclass
class Preempt(Message):
    type: ClassVar[str] = "preempt"
    id: str


MESSAGES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Hello, Heartbeat, Started, Token, Done, Preempted, Result, Failed, Welcome, Assign, Call, Cancel,
                Preempt)
}
_FIELDS = {cls: {f.name: f for f in fields(cls)} for cls in MESSAGES.values()}  # decode runs per token
_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list[str]": list,
          "list[int]": list,
          "list[dict] | None": (list, type(None)), "str | None": (str, type(None)), "Any": object}


def frame_bytes(frame: str) -> int:
    """A text frame's size on the wire. Our own frames are ASCII (json.dumps escapes the rest), so the
    character count is the byte count; a peer's may not be, and only a long one is worth encoding."""
    if len(frame) * 4 <= MAX_FRAME_BYTES:
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))


def decode(frame: str | bytes, allowed: tuple[type[Message], ...] | None = None) -> Message:
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    size = frame_bytes(frame)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} limit", CLOSE_TOO_BIG)
    try:
        data = json.loads(frame)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("frame must be a JSON object with a string 'type'")
    cls = MESSAGES.get(data.pop("type"))
    if cls is None or (allowed is not None and cls not in allowed):
        raise ProtocolError(f"unexpected message type {frame[:60]!r}")
    known = _FIELDS[cls]
    unknown = set(data) - set(known)
    if unknown:
        raise ProtocolError(f"{cls.type}: unknown field(s) {', '.join(sorted(unknown))}")
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{cls.type}: missing field {name!r}")
            continue
        expected = _TYPES.get(str(f.type), object)
        value = data[name]
        if isinstance(value, bool) and expected in (int, (int, float)):
            raise ProtocolError(f"{cls.type}.{name} must be {f.type}")
        if not isinstance(value, expected):
            raise ProtocolError(f"{cls.type}.{name} must be {f.type}")
    return cls(**data)


WORKER_TO_GATEWAY = (Hello, Heartbeat, Started, Token, Done, Preempted, Result, Failed)
GATEWAY_TO_WORKER = (Welcome, Assign, Call, Cancel, Preempt)
