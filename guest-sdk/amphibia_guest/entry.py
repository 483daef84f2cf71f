"""The component's entry module: implements the world's `handle` export over the user's App.

`amphibia build` componentizes this module; importing it imports the app's `app.py`, so the app's
imports and route table are part of the pre-initialized snapshot and cost nothing per request.
"""
from __future__ import annotations

import importlib

from wit_world.imports import http as wit_http

from . import serving
from .http import current_app

importlib.import_module("app")
_app = current_app()


class WitWorld:
    def handle(self, request: wit_http.Request) -> wit_http.Response:
        return serving.handle(_app, request)
