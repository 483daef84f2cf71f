"""`amphibia dev`'s front door: the dev page per app, the bundle its Pyodide runs, saving from the page
and telling the page when files change on disk.

Mounted only in dev mode, and every route answers loopback clients only: the page can write the
app's source files, so nothing off this machine may reach them. A save must come from this gateway's
own pages (its Origin, when the browser sends one), and carries a header a cross-site form cannot set.
"""
from __future__ import annotations

import asyncio
import ipaddress
import time

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..build import BROWSER_DIR
from ..config import AppSpec
from ..dev.bundle import MAX_FILES, app_files, bundle, version_of
from ..dev.compat import notes
from ..dev.files import save
from ..errors import AppNotFound, BadRequest, Forbidden
from .apps import ISOLATION_HEADERS, _pages
from .assets import browser_model
from .body import read_body, read_json
from .gateway import gateway_of
from .watch import signatures

SAVE_HEADER = "x-amphibia-dev"
CHANGES_WAIT_S = 25.0  # a long poll answers "unchanged" after this, and the page asks again
CHANGES_POLL_S = 0.2


def _loopback(request: Request) -> None:
    host = request.client.host if request.client else ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise Forbidden(f"the dev routes answer this machine only (loopback), not {host or 'an unknown client'}")


def _spec(request: Request) -> AppSpec:
    _loopback(request)
    name = request.path_params["name"]
    spec = gateway_of(request).config.apps.get(name)
    if spec is None:
        raise AppNotFound(f"no app named {name!r}")
    return spec


async def dev_index(request: Request) -> Response:
    _loopback(request)
    names = sorted(gateway_of(request).config.apps)
    return RedirectResponse(f"/dev/apps/{names[0]}/" if len(names) == 1 else "/", 307)


async def dev_page(request: Request) -> Response:
    spec = _spec(request)
    gateway = gateway_of(request)
    page = _pages.get_template("dev.html").render(app=spec, apps=sorted(gateway.config.apps),
                                                  engine=request.query_params.get("engine", ""))
    return HTMLResponse(page, headers={**ISOLATION_HEADERS, "cache-control": "no-cache"})


async def dev_bundle(request: Request) -> Response:
    spec = _spec(request)
    gateway = gateway_of(request)
    body = await asyncio.to_thread(bundle, spec)
    body.update(engine=spec.browser_engine, bridge=spec.bridge,
                local_model=browser_model(gateway.config, spec.model),
                max_local_model_bytes=int(gateway.config.server.browser_max_model_mb * 1e6),
                path=str(spec.path.resolve()))
    return JSONResponse(body, headers={"cache-control": "no-store"})


async def dev_changes(request: Request) -> Response:
    """Long poll: answers with the files' version as soon as it differs from `?version=`, or after
    CHANGES_WAIT_S with the same one. Cheap: it reads the files only when their mtimes change."""
    spec = _spec(request)
    folder = spec.path.resolve()
    known = request.query_params.get("version", "")
    deadline = time.monotonic() + CHANGES_WAIT_S
    seen = None
    while True:
        now = (await asyncio.to_thread(signatures, {folder}))[folder]
        if now != seen:
            seen = now
            files, _ = await asyncio.to_thread(app_files, folder)
            version = version_of(files)
            if version != known:
                return JSONResponse({"version": version, "changed": True})
        if time.monotonic() >= deadline or await request.is_disconnected():
            return JSONResponse({"version": known, "changed": False})
        await asyncio.sleep(CHANGES_POLL_S)


async def dev_notes(request: Request) -> Response:
    """The notes for files as the editor has them (unsaved): POST {"files": {path: text}}."""
    spec = _spec(request)
    files = (await read_json(request)).get("files")
    if (not isinstance(files, dict) or len(files) > MAX_FILES
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise BadRequest(f"expected {{\"files\": {{path: text}}}} with at most {MAX_FILES} files")
    found, stdlib = await asyncio.to_thread(notes, spec.path.resolve(), files)
    return JSONResponse({"notes": found, "stdlib": stdlib})


async def dev_save(request: Request) -> Response:
    spec = _spec(request)
    if request.headers.get(SAVE_HEADER) != "save":
        raise Forbidden(f"a save needs the `{SAVE_HEADER}: save` header (the dev page sends it)")
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None and origin != own:
        raise Forbidden(f"a save must come from this gateway's own page ({own}), not {origin}")
    rel = request.path_params["path"]
    path = await asyncio.to_thread(save, spec.path, rel, await read_body(request))
    files, _ = await asyncio.to_thread(app_files, spec.path.resolve())
    return JSONResponse({"saved": rel, "bytes": path.stat().st_size, "version": version_of(files)})


routes = [
    Route("/dev/", dev_index),
    Route("/dev/apps/{name}/", dev_page),
    Route("/dev/apps/{name}/bundle", dev_bundle),
    Route("/dev/apps/{name}/changes", dev_changes),
    Route("/dev/apps/{name}/notes", dev_notes, methods=["POST"]),
    Route("/dev/apps/{name}/files/{path:path}", dev_save, methods=["PUT"]),
    # Pyodide itself, from the pinned npm package (browser/package.json): nothing comes from a CDN.
    Mount("/amphibia/pyodide", StaticFiles(directory=BROWSER_DIR / "node_modules/pyodide", check_dir=False)),
]
