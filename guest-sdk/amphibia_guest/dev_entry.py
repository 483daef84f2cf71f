"""The dev component's entry module (`amphibia dev`, `up --watch`): one component for every edit.

It is built once per toolchain with no app; the host mounts an edit's files read-only at /0 (where
a build mounts the app folder), and each fresh instance imports the app at its first request. An
edit then answers without waiting for componentize-py, at the cost of importing the app per
request (a few ms), until its real build replaces it. Only the standard-library modules imported
here are in the snapshot (nothing else of the library is reachable at run time); an edit that needs
another one fails its trial import, and the host waits for the real build instead.
"""
from __future__ import annotations

# The standard library apps commonly use, in the snapshot (pure-Python apps import nothing else).
import abc, base64, bisect, collections, contextlib, copy, csv, dataclasses, datetime, decimal, difflib  # noqa: E401,F401
import enum, fnmatch, fractions, functools, hashlib, heapq, hmac, html, inspect, io, itertools, json  # noqa: E401,F401
import logging, math, numbers, operator, pprint, random, re, secrets, shlex, statistics, string  # noqa: E401,F401
import struct, textwrap, time, traceback, types, typing, unicodedata, uuid, zlib  # noqa: E401,F401
import urllib.parse, xml.etree.ElementTree  # noqa: E401,F401
import importlib
import sys

from wit_world.imports import http as wit_http

from . import serving
from .http import TRIAL_IMPORT, App, Response, current_app

_app: App | None = None


def _current() -> App:
    global _app
    if _app is None:
        sys.path_importer_cache.pop("/0", None)  # the snapshot saw /0 empty: look again
        importlib.import_module("app")
        _app = current_app()
    return _app


class WitWorld:
    def handle(self, request: wit_http.Request) -> wit_http.Response:
        if request.method == TRIAL_IMPORT:  # import only: 204, or 500 with the traceback
            try:
                _current()
            except BaseException:  # noqa: BLE001 - the host shows whatever the edit raised
                return serving.to_wit(Response.text(traceback.format_exc(), status=500))
            return serving.to_wit(Response(204, [], b""))
        return serving.handle(_current(), request)
