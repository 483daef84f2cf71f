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
class AppNotFound(AmphibiaError):
    status = 404
    type = "app_not_found"


class BadRequest(AmphibiaError):
    status = 400
    type = "bad_request"


class Unauthorized(AmphibiaError):
    status = 401
    type = "unauthorized"


class Forbidden(AmphibiaError):
    status = 403
    type = "forbidden"


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


# --- inference (mirrors the WIT `error` variant) -----------------------------------------------------
class LLMError(AmphibiaError):
    status = 502
    type = "runtime_error"


class ModelNotSupported(LLMError):
    status = 404
    type = "model_not_supported"


class InvalidInput(LLMError):
    status = 400
    type = "invalid_input"


class Overloaded(LLMError):
    status = 429
    type = "overloaded"

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms


class InferenceTimeout(LLMError):
    status = 504
    type = "timeout"


def error_response(exc: AmphibiaError, request_id: str = "") -> "JSONResponse":
    """The HTTP answer for any AmphibiaError: its status, the JSON shape, Retry-After when overloaded."""
    from starlette.responses import JSONResponse

    headers = {"x-request-id": request_id} if request_id else {}
    if isinstance(exc, Overloaded):
        headers["retry-after"] = str(max(1, round(exc.retry_after_ms / 1000)))
    return JSONResponse(exc.to_json(), exc.status, headers)
