"""The component's entry module: implements the world's `handle` export over the user's App.

`amphibia build` componentizes this module; importing it imports the app's `app.py`, so the app's
imports and route table are part of the pre-initialized snapshot and cost nothing per request.
"""
from __future__ import annotations

import importlib

from wit_world.imports import http as wit_http

from .http import Request, Response, current_app

importlib.import_module("app")
_app = current_app()


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


class WitWorld:
    def handle(self, request: wit_http.Request) -> wit_http.Response:
        return to_wit(_app.dispatch(to_request(request)))
