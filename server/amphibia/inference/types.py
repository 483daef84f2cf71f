"""What an inference request is, once the inference service has checked it: plain frozen values that
every engine, the broker and the wire build from, so nothing downstream validates again."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidInput

CallMethod = Literal["embed", "tokenize", "detokenize"]
CALL_METHODS: tuple[str, ...] = ("embed", "tokenize", "detokenize")


@dataclass(frozen=True)
class SamplingParams:
    """Spin's defaults, plus stop strings, a seed and constrained output."""

    max_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Constrained output: a JSON schema (JSON text) or a GBNF grammar. The inference service turns a
    # schema into a grammar (`grammar.py`), so engines and the wire only ever see `grammar`.
    json_schema: str | None = None
    grammar: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        """From our field names (a wire message's `params`, an API's mapped options); unknown keys are
        ignored, a value of the wrong type is InvalidInput. Ranges are `validate`'s job."""
        values: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in data or data[name] is None:
                continue
            value = data[name]
            if name in ("json_schema", "grammar"):
                if name == "json_schema" and isinstance(value, dict):
                    value = json.dumps(value)
                if not isinstance(value, str):
                    raise InvalidInput(f"invalid params: {name} must be {'a JSON schema' if name == 'json_schema' else 'GBNF text'}")
            elif name == "stop":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
                    raise InvalidInput("invalid params: stop must be a list of strings")
                value = tuple(value)
            elif f.type in ("int", "int | None"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
                    raise InvalidInput(f"invalid params: {name} must be an integer")
                value = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidInput(f"invalid params: {name} must be a number")
                value = float(value)
            values[name] = value
        return cls(**values)

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
        if self.max_tokens >= 2**32 or self.top_k >= 2**32 or self.repeat_last_n >= 2**32:
            raise bad("max_tokens, top_k and repeat_last_n must fit in a u32")
        if self.json_schema is not None and self.grammar is not None:
            raise bad("give json_schema or grammar, not both")
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
class Generation:
    """A checked generation: exactly one of `prompt` / `messages` (rendered with the model's chat
    template where the model is). `resume_text` is text already delivered to the client (after a
    page's local engine failed mid-answer); the engine continues after it without sending it again,
    and `resume_tokens` counts against `max_tokens`."""

    model: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    resume_text: str = ""
    resume_tokens: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class Call:
    """A checked one-shot call: embed {"texts"}, tokenize {"text"}, detokenize {"tokens"}."""

    model: str
    method: CallMethod
    args: dict[str, Any]
    request_id: str = ""
