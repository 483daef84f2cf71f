"""Exceptions an app sees when the host's `llm` interface answers with its `error` variant.

Each class knows the HTTP status it becomes when an app lets it escape, so an app that does not
catch it still answers with a clear JSON error instead of a generic 500.
"""
from __future__ import annotations


class LLMError(Exception):
    """Base class of every error from the `llm` host interface."""

    status = 502
    type = "llm_error"


class ModelNotSupported(LLMError):
    status = 400
    type = "model_not_supported"


class InvalidInput(LLMError):
    status = 400
    type = "invalid_input"


class RuntimeFailure(LLMError):
    status = 502
    type = "runtime_error"


class Overloaded(LLMError):
    """The pool is full; `retry_after` (seconds) says when to come back."""

    status = 429
    type = "overloaded"

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"the inference pool is overloaded; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms
        self.retry_after = retry_after_ms / 1000.0


class InvalidOutput(LLMError):
    """A constrained answer that does not parse: it was cut short (max_tokens) before the schema ended."""

    status = 502
    type = "invalid_output"


class InferenceTimeout(LLMError):
    status = 504
    type = "timeout"


def from_wit(error: object) -> LLMError:
    """Turn a `wit_world.imports.llm.Error_*` value into the matching exception."""
    kind = type(error).__name__.removeprefix("Error_")
    value = getattr(error, "value", None)
    if kind == "ModelNotSupported":
        return ModelNotSupported("model not supported by this host")
    if kind == "InvalidInput":
        return InvalidInput(str(value))
    if kind == "Overloaded":
        return Overloaded(int(value or 0))
    if kind == "Timeout":
        return InferenceTimeout(str(value))
    return RuntimeFailure(str(value))
