"""The world's `handle` export over an App: WIT request in, WIT response (or a stream) out. Shared by
the build's entry (`entry.py`, the app imported at build time) and the dev component's
(`dev_entry.py`, the app imported per instance)."""
from __future__ import annotations

import sys
import traceback

from componentize_py_types import Err
from wit_world.imports import http as wit_http
from wit_world.imports import response_stream  # imported here: only modules imported at build time are in the component

from .http import App, Request, Response


def to_request(request: wit_http.Request) -> Request:
    return Request(
        method=request.method,
        path=request.path or "/",
        query=request.query,
        headers={k.lower(): v for k, v in request.headers},
        body=bytes(request.body),
    )


def to_wit(response: Response) -> wit_http.Response:
    return wit_http.Response(status=response.status, headers=list(response.headers), body=bytes(response.body))


def stream(response: Response) -> wit_http.Response:
    """Send a streamed response through the host's `response-stream`: status and headers, then each
    piece. A write the host refuses (the client left, the deadline passed) stops the app's iterator,
    which closes its generators and so drops its `llm` streams; an exception midway ends the body."""
    pieces = response.chunks
    try:
        response_stream.start(response.status, list(response.headers))
        for piece in pieces:
            data = piece.encode() if isinstance(piece, str) else bytes(piece)
            if data:
                response_stream.write(data)
    except Err:
        pass  # the host said stop: the client is gone
    except Exception:  # the app's bug midway: the client sees the body end here
        traceback.print_exc(file=sys.stderr)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    return wit_http.Response(status=response.status, headers=list(response.headers), body=b"")


def handle(app: App, request: wit_http.Request) -> wit_http.Response:
    response = app.dispatch(to_request(request))
    if response.chunks is not None:
        return stream(response)
    return to_wit(response)
