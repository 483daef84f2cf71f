"""The app's view of the `llm` host interface: plain functions, keyword parameters, exceptions.

`model=None` means the app's default model, which the host knows from the app's manifest.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import InvalidInput, InvalidOutput, LLMError, RuntimeFailure, from_wit
from .schema import json_schema_of, value_of

# Spin's defaults; the host applies the same ones when an app passes no parameters at all.
DEFAULTS = {
    "max_tokens": 100,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
    "repeat_penalty_last_n": 64,
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    schema: Any = field(default=None, repr=False)  # what `schema=` asked for, if anything

    def __str__(self) -> str:
        return self.text

    @functools.cached_property
    def value(self) -> Any:
        """The text parsed as JSON, built as the `schema=` type asked for (a dataclass comes back as
        one). The host constrained the output to the schema; only an answer cut short by
        `max_tokens` fails to parse, and that raises InvalidOutput with the text."""
        try:
            data = json.loads(self.text)
        except ValueError as exc:
            raise InvalidOutput(f"the answer is not complete JSON ({exc}); raise max_tokens? text: {self.text[:200]!r}") from None
        return value_of(self.schema, data) if self.schema is not None else data


def _bindings() -> Any:
    # Imported lazily: outside a component (plain Python, tests of the SDK itself) there are no
    # bindings, and only the functions below need them.
    try:
        from wit_world.imports import llm as wit_llm
    except ImportError as exc:
        raise RuntimeFailure("not running inside an Amphibia host: no llm interface") from exc
    return wit_llm


def _call(fn: Any, *args: Any) -> Any:
    from componentize_py_types import Err

    try:
        return fn(*args)
    except Err as err:
        raise from_wit(err.value) from None


def _params(options: Mapping[str, Any]) -> Any:
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return None
    unknown = set(given) - set(DEFAULTS) - {"stop", "seed", "schema", "grammar"}
    if unknown:
        raise TypeError(f"unknown llm parameter(s): {', '.join(sorted(unknown))}")
    values = {**DEFAULTS, **given}
    # The WIT types are unsigned: a negative or huge value would trap in the bindings, so say so here.
    for name in ("max_tokens", "top_k", "repeat_penalty_last_n"):
        _check_u32(name, values[name])
    if values.get("seed") is not None and not 0 <= int(values["seed"]) < 2**64:
        raise InvalidInput(f"invalid params: seed must fit in a u64, got {values['seed']}")
    stop = values.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    return _bindings().InferencingParams(
        max_tokens=int(values["max_tokens"]),
        repeat_penalty=float(values["repeat_penalty"]),
        repeat_penalty_last_n_token_count=int(values["repeat_penalty_last_n"]),
        temperature=float(values["temperature"]),
        top_k=int(values["top_k"]),
        top_p=float(values["top_p"]),
        stop=list(stop),
        seed=None if values.get("seed") is None else int(values["seed"]),
        json_schema=None if values.get("schema") is None else json.dumps(json_schema_of(values["schema"])),
        grammar=values.get("grammar"),
    )


def _check_u32(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 <= int(value) < 2**32:
        raise InvalidInput(f"invalid params: {name} must be between 0 and 2**32-1, got {value!r}")


def _messages(messages: Iterable[Mapping[str, str] | Sequence[str]]) -> list[Any]:
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            role, content = m
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError("each message needs a string 'role' and 'content'")
        out.append(_bindings().Message(role=role, content=content))
    return out


def _completion(result: Any, schema: Any = None) -> Completion:
    return Completion(
        text=result.text,
        usage=Usage(result.usage.prompt_token_count, result.usage.generated_token_count),
        schema=schema,
    )


def _stream(stream: Any) -> Iterator[str]:
    # Leaving the `with` (also when the caller stops iterating early) drops the resource, which
    # tells the host to cancel the generation and free its slot.
    with stream:
        while True:
            piece = _call(stream.next)
            if piece is None:
                return
            yield piece


def infer(prompt: str, model: str | None = None, **options: Any) -> Completion:
    """Complete `prompt` as plain text (no chat template). `schema=` (a JSON schema dict, or a type:
    a dataclass, a TypedDict, list[...] of them ...) or `grammar=` (GBNF text) constrains the output;
    with a schema, `out.value` is the parsed answer."""
    return _completion(_call(_bindings().infer, model or "", prompt, _params(options)), options.get("schema"))


def chat(messages: Iterable[Mapping[str, str] | Sequence[str]], model: str | None = None, **options: Any) -> Completion:
    """Answer a conversation; the host applies the model's own chat template. `schema=` and `grammar=`
    as for `infer`."""
    return _completion(_call(_bindings().chat, model or "", _messages(messages), _params(options)), options.get("schema"))


def stream(prompt: str, model: str | None = None, **options: Any) -> Iterator[str]:
    """Like `infer`, yielding text pieces as they are generated."""
    return _stream(_call(_bindings().infer_stream, model or "", prompt, _params(options)))


def chat_stream(messages: Iterable[Mapping[str, str] | Sequence[str]], model: str | None = None, **options: Any) -> Iterator[str]:
    """Like `chat`, yielding text pieces as they are generated."""
    return _stream(_call(_bindings().chat_stream, model or "", _messages(messages), _params(options)))


def embed(texts: str | Sequence[str], model: str | None = None) -> list[list[float]]:
    """One embedding vector per text."""
    if isinstance(texts, str):
        texts = [texts]
    return [list(v) for v in _call(_bindings().generate_embeddings, model or "", list(texts)).embeddings]


def tokenize(text: str, model: str | None = None) -> list[int]:
    return list(_call(_bindings().tokenize, model or "", text))


def detokenize(tokens: Sequence[int], model: str | None = None) -> str:
    tokens = [int(t) for t in tokens]
    for t in tokens:
        _check_u32("token", t)
    return _call(_bindings().detokenize, model or "", tokens)


__all__ = [
    "Completion",
    "LLMError",
    "Usage",
    "chat",
    "chat_stream",
    "detokenize",
    "embed",
    "infer",
    "stream",
    "tokenize",
]
