"""Every failure the host reports, as types that carry their HTTP status and JSON `type`.

The gateway turns any of these into `{"error": {"type", "message"}}`; the `llm` host interface turns
the LLM ones into the WIT `error` variant. Logging happens once, where the error is answered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.responses import JSONResponse


class AmphibiaError(Exception):
    status: int = 500
    type: str = "internal_error"
    retry_after_s: float | None = None  # sent as Retry-After: when trying again makes sense

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}


# --- configuration and build -------------------------------------------------------------------
class ConfigError(AmphibiaError):
    type = "config_error"


class BuildError(AmphibiaError):
    """An app that cannot be compiled; `message` points at file and line where we know them."""

    status = 500
    type = "build_error"


# --- requests ------------------------------------------------------------------------------------
class NotFound(AmphibiaError):
    status = 404
    type = "not_found"


class AppNotFound(AmphibiaError):
    status = 404
    type = "app_not_found"


class BadRequest(AmphibiaError):
    status = 400
    type = "bad_request"


class BadHost(BadRequest):
    """A Host header this gateway does not serve (DNS rebinding)."""

    type = "bad_host"


class BodyTooLarge(AmphibiaError):
    status = 413
    type = "body_too_large"


class Unauthorized(AmphibiaError):
    status = 401
    type = "unauthorized"


class Forbidden(AmphibiaError):
    status = 403
    type = "forbidden"


class ClientGone(AmphibiaError):
    """The client left before its answer was ready (499, as nginx logs it; nobody reads it)."""

    status = 499
    type = "client_gone"


class Building(AmphibiaError):
    """The app is still being built (the gateway serves at once and builds in the background)."""

    status = 503
    type = "building"
    retry_after_s = 2.0


class Busy(AmphibiaError):
    """Every guest thread is taken and the wait queue is full."""

    status = 503
    type = "busy"


# --- the guest ------------------------------------------------------------------------------------
class GuestError(AmphibiaError):
    """The guest could not finish: the request ends, the instance is dropped, the server goes on."""

    status = 500
    type = "guest_trap"


class GuestTimeout(GuestError):
    status = 504
    type = "guest_timeout"


class GuestOutOfMemory(GuestError):
    status = 500
    type = "guest_out_of_memory"


# --- inference: the one table from error kind to WIT variant, wire type, HTTP status, retry hint ----
class LLMError(AmphibiaError):
    """An inference failure. `type` is its name on the wire and in HTTP bodies, `wit` the case of the
    WIT `error` variant a guest sees (payload: the message, the retry hint or nothing)."""

    status = 502
    type = "runtime_error"
    wit = "runtime-error"


class ModelNotSupported(LLMError):
    status = 404
    type = "model_not_supported"
    wit = "model-not-supported"


class InvalidInput(LLMError):
    status = 400
    type = "invalid_input"
    wit = "invalid-input"


class ModelNotAllowed(InvalidInput):
    """A served model the caller may not use: one rule for every entrance (guests see invalid-input)."""

    status = 403
    type = "model_not_allowed"


class Overloaded(LLMError):
    status = 429
    type = "overloaded"
    wit = "overloaded"

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms
        self.retry_after_s = retry_after_ms / 1000


class InferenceTimeout(LLMError):
    status = 504
    type = "timeout"
    wit = "timeout"


LLM_ERRORS: dict[str, type[LLMError]] = {
    cls.type: cls for cls in (LLMError, ModelNotSupported, InvalidInput, ModelNotAllowed, Overloaded, InferenceTimeout)
}


def llm_error(error_type: str, message: str, retry_after_ms: int = 0) -> LLMError:
    """The error a wire `failed` message (or a remote gateway) names; unknown kinds are runtime errors."""
    cls = LLM_ERRORS.get(error_type, LLMError)
    if cls is Overloaded:
        return Overloaded(message, retry_after_ms or 1000)
    return cls(message)


def retry_after_ms(exc: AmphibiaError) -> int:
    return exc.retry_after_ms if isinstance(exc, Overloaded) else 0


def as_llm_error(exc: AmphibiaError) -> LLMError:
    """Any failure as an inference error (a non-LLM AmphibiaError reaching a guest is a runtime error)."""
    return exc if isinstance(exc, LLMError) else LLMError(exc.message)


def error_response(exc: AmphibiaError, request_id: str = "") -> "JSONResponse":
    """The HTTP answer for any AmphibiaError: its status, the JSON shape, Retry-After when overloaded.
    (Routes raise; the gateway's one exception handler calls this.)"""
    from starlette.responses import JSONResponse

    headers = {"x-request-id": request_id} if request_id else {}
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse(exc.to_json(), exc.status, headers)
