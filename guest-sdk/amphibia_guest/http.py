"""Request, Response and a small router: the app-facing half of the `handle` export."""
from __future__ import annotations

import json as _json
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

from .errors import LLMError, Overloaded

Handler = Callable[["Request"], "Response"]


@dataclass
class Request:
    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # Values of `{name}` segments in the matched route.
    params: dict[str, str] = field(default_factory=dict)

    @property
    def args(self) -> dict[str, str]:
        """Query parameters, last value wins."""
        return {k: v[-1] for k, v in parse_qs(self.query, keep_blank_values=True).items()}

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; a malformed body becomes a 400 answer, not a 500."""
        try:
            return _json.loads(self.body or b"null")
        except ValueError as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # A streamed body: the host sends status and headers first, then each piece as it comes.
    chunks: Iterable[bytes | str] | None = None

    @classmethod
    def stream(cls, chunks: Iterable[bytes | str], content_type: str = "text/plain; charset=utf-8",
               status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        """A body sent piece by piece as `chunks` yields them (str pieces are sent as UTF-8). An
        exception midway ends the body there (the client sees it cut short; the log has the traceback)."""
        return cls(status, [("content-type", content_type), *(headers or {}).items()], b"", iter(chunks))

    @classmethod
    def sse(cls, events: Iterable[Any], status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        """Server-sent events: each item becomes one event, `data: <JSON>` (a str is sent as it is, a
        `(name, data)` pair as `event: name`). An exception midway becomes a last `event: error` whose
        data is `{"error": {"type", "message"}}`, and the stream ends cleanly."""
        return cls(status, [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                            *(headers or {}).items()], b"", _sse(events))

    @classmethod
    def bytes(cls, body: bytes, status: int = 200, content_type: str = "application/octet-stream",
              headers: dict[str, str] | None = None) -> "Response":
        return cls(status, [("content-type", content_type), *(headers or {}).items()], body)

    @classmethod
    def text(cls, body: str, status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        return cls.bytes(body.encode(), status, "text/plain; charset=utf-8", headers)

    @classmethod
    def html(cls, body: str, status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        return cls.bytes(body.encode(), status, "text/html; charset=utf-8", headers)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        return cls.bytes(_json.dumps(data).encode(), status, "application/json", headers)

    @classmethod
    def error(cls, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> "Response":
        """The error shape every Amphibia host uses: `{"error": {"type", "message"}}`."""
        return cls.json({"error": {"type": type, "message": message}}, status, headers)


def _sse(events: Iterable[Any]) -> Iterator[str]:
    def event(data: Any, name: str | None = None) -> str:
        text = data if isinstance(data, str) else _json.dumps(data)
        lines = "".join(f"data: {line}\n" for line in text.split("\n"))
        return (f"event: {name}\n" if name else "") + lines + "\n"

    try:
        for item in events:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                yield event(item[1], item[0])
            else:
                yield event(item)
    except LLMError as exc:
        yield event({"error": {"type": exc.type, "message": str(exc)}}, "error")
    except Exception as exc:  # the app's own bug midway: the stream still ends with a clear event
        traceback.print_exc(file=sys.stderr)
        yield event({"error": {"type": "guest_exception", "message": f"{type(exc).__name__}: {exc}"}}, "error")


class HTTPError(Exception):
    """Raise from a handler to answer with a JSON error of this status."""

    def __init__(self, status: int, message: str, type: str = "http_error") -> None:
        super().__init__(message)
        self.status = status
        self.type = type


@dataclass
class _Route:
    pattern: re.Pattern[str]
    methods: frozenset[str]
    handler: Handler


def _compile(path: str) -> re.Pattern[str]:
    if not path.startswith("/"):
        raise ValueError(f"route {path!r} must start with '/'")
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
    return re.compile(f"^{regex}$")


class App:
    """Collects routes; the component's `handle` export dispatches to the one App an app module makes."""

    def __init__(self) -> None:
        self.routes: list[_Route] = []
        _registry.append(self)

    def route(self, path: str, methods: list[str] | tuple[str, ...] = ("GET",)) -> Callable[[Handler], Handler]:
        pattern = _compile(path)

        def register(handler: Handler) -> Handler:
            self.routes.append(_Route(pattern, frozenset(m.upper() for m in methods), handler))
            return handler

        return register

    def get(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["GET"])

    def post(self, path: str) -> Callable[[Handler], Handler]:
        return self.route(path, ["POST"])

    def dispatch(self, request: Request) -> Response:
        """Route `request`; every failure becomes a JSON error response, never an exception."""
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.match(request.path)
            if not match:
                continue
            if request.method.upper() not in route.methods and not (
                request.method.upper() == "HEAD" and "GET" in route.methods
            ):
                allowed |= route.methods
                continue
            request.params = match.groupdict()
            return _call(route.handler, request)
        if allowed:
            return Response.error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}",
                                  {"allow": ", ".join(sorted(allowed))})
        return Response.error(404, "not_found", f"no route for {request.path}")


def _call(handler: Handler, request: Request) -> Response:
    try:
        response = handler(request)
    except HTTPError as exc:
        return Response.error(exc.status, exc.type, str(exc))
    except LLMError as exc:
        headers = {"retry-after": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        return Response.error(exc.status, exc.type, str(exc), headers)
    except MemoryError:
        return Response.error(500, "guest_out_of_memory", "the app ran out of memory")
    except Exception as exc:  # the app's own bug: answer 500 with its text and log the traceback
        traceback.print_exc(file=sys.stderr)
        return Response.error(500, "guest_exception", f"{type(exc).__name__}: {exc}")
    if isinstance(response, str):
        return Response.text(response)
    if isinstance(response, (dict, list)):
        return Response.json(response)
    if not isinstance(response, Response):
        return Response.error(500, "guest_exception",
                              f"handler returned {type(response).__name__}, expected Response, str, dict or list")
    return response


# The method of the host's trial of an edit in the dev component (`dev_entry.py`, `--watch`): it only
# imports the app. No HTTP route takes this method, so no client can send it to an app.
TRIAL_IMPORT = "AMPHIBIA-IMPORT"

_registry: list[App] = []


def current_app() -> App:
    if not _registry:
        raise RuntimeError("the app module created no amphibia_guest.App()")
    return _registry[-1]
