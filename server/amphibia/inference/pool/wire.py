"""The wire protocol of the pool's workers and the browser bridge: every message type, defined once.

Messages are JSON text frames `{"type": ..., ...}`. `decode` refuses anything that is not exactly
one of these (unknown type, missing or mistyped field, oversized frame) with `ProtocolError`, so a
bad peer is told why and never reaches the broker's state.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

PROTOCOL_VERSION = 3  # checked at hello: a worker of another version is refused with a clear reason
# 3: workers send a decode step's pieces as one `tokens` frame, which a version-2 gateway would refuse
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
        # A message's fields are its instance dict, in order; json.dumps walks them without copies and
        # asks `_plain` only about what it cannot write itself (a dataclass inside a value).
        return _dumps({"type": self.type, **self.__dict__})

    def check(self) -> None:
        """Raise ProtocolError if the fields, each of the right type, do not fit together (decode)."""


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` without its deep copies, for what json.dumps cannot write itself: messages
    are encoded on every token, and the copies were most of the cost."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_dumps = json.JSONEncoder(default=_plain).encode


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
class Tokens(Message):
    """One decode step's `token` messages, for every sequence that had text in it, in one frame: entry
    i is `Token(jobs[i], texts[i], n[i], ids[i])`. A worker with many slots sends one frame per step
    instead of one per sequence, and sends it as the step ends, so no token waits longer for it."""

    type: ClassVar[str] = "tokens"
    jobs: list[str]
    texts: list[str]
    n: list[int]
    ids: list[list[int]]

    @classmethod
    def of(cls, tokens: "list[Token]") -> "Tokens":
        return cls([t.id for t in tokens], [t.text for t in tokens], [t.n for t in tokens], [t.ids for t in tokens])

    def split(self) -> "list[Token]":
        return [Token(*entry) for entry in zip(self.jobs, self.texts, self.n, self.ids)]

    def check(self) -> None:
        count = len(self.jobs)
        if not len(self.texts) == len(self.n) == len(self.ids) == count:
            raise ProtocolError("tokens: jobs, texts, n and ids must be as long as each other")
        # type() rather than isinstance: a bool is not a count, and these are JSON's own types
        if not (set(map(type, self.jobs)) | set(map(type, self.texts))) <= {str}:
            raise ProtocolError("tokens: jobs and texts must be strings")
        if not set(map(type, self.n)) <= {int} or not set(map(type, self.ids)) <= {list}:
            raise ProtocolError("tokens: n must be integers and ids lists")
        if not {type(i) for ids in self.ids for i in ids} <= {int}:
            raise ProtocolError("tokens: ids must be lists of integers")


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
    for cls in (Hello, Heartbeat, Started, Token, Tokens, Done, Preempted, Result, Failed, Welcome, Assign, Call,
                Cancel, Preempt)
}
_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list[str]": list,
          "list[int]": list, "list[list[int]]": list,
          "list[dict] | None": (list, type(None)), "str | None": (str, type(None)), "Any": object}
# Per message type, what decode checks (it runs per frame): each field's name, its type as written,
# the Python types it accepts, whether it may be left out, and whether a bool would pass for a number.
_CHECKS = {cls: [(f.name, f.type, _TYPES.get(str(f.type), object),
                  f.default is not MISSING or f.default_factory is not MISSING, str(f.type) in ("int", "float"))
                 for f in fields(cls)] for cls in MESSAGES.values()}
_NAMES = {cls: {f.name for f in fields(cls)} for cls in MESSAGES.values()}


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
    if not _NAMES[cls].issuperset(data):
        raise ProtocolError(f"{cls.type}: unknown field(s) {', '.join(sorted(set(data) - _NAMES[cls]))}")
    for name, written, expected, optional, number in _CHECKS[cls]:
        if name not in data:
            if not optional:
                raise ProtocolError(f"{cls.type}: missing field {name!r}")
            continue
        value = data[name]
        if not isinstance(value, expected) or (number and isinstance(value, bool)):
            raise ProtocolError(f"{cls.type}.{name} must be {written}")
    message = cls(**data)
    message.check()
    return message


WORKER_TO_GATEWAY = (Hello, Heartbeat, Started, Token, Tokens, Done, Preempted, Result, Failed)
GATEWAY_TO_WORKER = (Welcome, Assign, Call, Cancel, Preempt)
