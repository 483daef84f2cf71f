"""The app front door: server-side app routes, app pages, the index, health and the app list.

One app request: HTTP -> `app_route` -> `Runtime.handle_async` (a fresh instance in a guest thread)
-> the app's `llm` imports -> `sandbox.llm_host` -> the inference service -> an engine -> tokens back.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from ..config import BROWSER_ENGINES
from ..errors import ClientGone
from ..sandbox.context import RequestEnd
from ..sandbox.response_host import StreamChannel
from ..sandbox.runtime import HttpRequest
from .assets import browser_model, version_of
from .body import read_body, request_id
from .gateway import component_of, gateway_of, health_problems, progress, served_app

log = logging.getLogger("amphibia.gateway")
_pages = jinja2.Environment(
    loader=jinja2.PackageLoader("amphibia", "templates"), autoescape=jinja2.select_autoescape(["html"])
)


async def app_route(request: Request) -> Response:
    """One request to a server-side app: a fresh instance of its component answers it."""
    gateway = gateway_of(request)
    name = request.path_params["name"]
    rid = request_id(request)
    if _is_page_visit(request) and name in gateway.apps:
        return await app_page(request)
    app = served_app(gateway, name)
    http = HttpRequest(
        method=request.method,
        path="/" + request.path_params.get("path", ""),
        query=request.url.query,
        headers=[(k, v) for k, v in request.headers.items()],
        body=await read_body(request),
    )
    # A client that hangs up ends its request: the guest's inference is cancelled, its slot freed.
    component = await component_of(gateway, app)
    channel, end = StreamChannel(asyncio.get_running_loop()), RequestEnd()

    async def gone() -> bool:
        # Until the answer starts streaming; then the streamed response itself notices a client that
        # leaves (polling the ASGI receive beside it took a live client for gone within 0.25 s).
        return not channel.head.done() and await request.is_disconnected()

    work = asyncio.ensure_future(gateway.runtime.handle_async(
        app.spec, component, http, rid, disconnected=gone, channel=channel, end=end))
    await asyncio.wait({work, channel.head}, return_when=asyncio.FIRST_COMPLETED)
    if channel.head.done():  # the app streams: status and headers now, then each piece as it comes
        status, head = channel.head.result()
        response: Response = StreamingResponse(_pieces(channel, work, end), status)
    else:
        res = work.result()
        status, head, response = res.status, res.headers, Response(res.body, res.status)
    for key, value in head:
        if key.lower() not in ("content-length", "transfer-encoding"):
            response.headers.append(key.lower(), value)
    return response


async def _pieces(channel: StreamChannel, work: asyncio.Future, end: RequestEnd) -> AsyncIterator[bytes]:
    """The streamed body: pieces until the guest has returned (the channel's end mark, queued after
    its last piece). A client that goes away closes this iterator, which ends the request (its writes
    fail, its llm streams stop)."""
    work.add_done_callback(lambda _: channel.finish())
    try:
        while (piece := await channel.pieces.get()) is not None:
            channel.taken()
            yield piece
        if not work.cancelled() and work.exception() is not None:  # after the head: the body just ends here
            log.warning("app request ended mid-stream: %s", work.exception())
    finally:
        end.end(ClientGone("the client of a streamed answer went away"))


def _is_page_visit(request: Request) -> bool:
    """A person opening `/apps/NAME/` in a browser gets the app's page; curl, fetch() and forms
    (anything but a top-level navigation asking for HTML) reach the app's own `/` route."""
    return (request.method == "GET" and request.path_params.get("path", "") == ""
            and request.headers.get("sec-fetch-mode") == "navigate" and "text/html" in request.headers.get("accept", ""))


# Cross-origin isolation lets the page's workers share memory: wllama runs multi-threaded, and
# a browser without JSPI can run the guest's sync build with SharedArrayBuffer + Atomics.
ISOLATION_HEADERS = {"cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp"}


async def app_page(request: Request) -> Response:
    """`/apps/NAME/browser/` (and a browser's visit to `/apps/NAME/`): the app running in the page."""
    gateway = gateway_of(request)
    app = served_app(gateway, request.path_params["name"])
    engine = request.query_params.get("engine", app.spec.browser_engine)  # `?engine=remote` overrides the app's policy
    if engine not in BROWSER_ENGINES:
        engine = app.spec.browser_engine
    page = _pages.get_template("app.html").render(app=app.spec, engine=engine, browser=app.page is not None)
    return HTMLResponse(page, headers={**ISOLATION_HEADERS, "cache-control": "no-cache"})


async def app_root(request: Request) -> Response:
    return RedirectResponse(f"/apps/{request.path_params['name']}/", 308)


async def index(request: Request) -> Response:
    gateway = gateway_of(request)
    page = _pages.get_template("index.html").render(
        apps=[a.spec for a in gateway.apps.values()], failed=gateway.failed, building=gateway.building,
        updating=gateway.updating,
        served=gateway.apps.keys(), dev=gateway.dev,
        from_source={name for name, a in gateway.apps.items() if a.spec.source is not None},
        progress=progress(gateway), models=sorted(gateway.config.models),
    )
    return HTMLResponse(page)


async def healthz(request: Request) -> Response:
    """Status (always HTTP 200: the gateway is up and serves what it can): "starting" while apps are
    still building, "degraded" with `reasons` when an app failed to load or a model the apps use has
    no worker, else "ok"."""
    gateway = gateway_of(request)
    problems = health_problems(gateway)
    building = [f"app {name!r} is still building" for name in sorted(gateway.building)]
    return JSONResponse({
        "status": "degraded" if problems else "starting" if building else "ok",
        "reasons": problems + building,
        "apps": sorted(gateway.apps),
        "failed": sorted(gateway.failed),
        "building": sorted(gateway.building),
        "updating": sorted(gateway.updating),
        "progress": progress(gateway),
        "models": sorted(gateway.service.models()),
        "in_flight": gateway.runtime.in_flight,
        "workers": len(gateway.broker.workers) if gateway.broker else None,
    })


async def list_apps(request: Request) -> Response:
    gateway = gateway_of(request)
    # Per model, not per app: a gateway may serve 1,000 apps on one model.
    local = {m: browser_model(gateway.config, m) for m in {a.spec.model for a in gateway.apps.values()}}
    return JSONResponse({"apps": [
        {"name": a.spec.name, "description": a.spec.description, "model": a.spec.model,
         "embedding_model": a.spec.embedding_model,
         "allowed_models": list(a.spec.allowed_models), "url": f"/apps/{a.spec.name}/",
         "wasm_sha256": a.manifest.get("wasm_sha256"),
         # the browser build pages load: this build's, or the one before while this one's is made
         "browser": f"/apps/{a.spec.name}/browser/@{version_of(a.page.manifest)}/" if a.page else None,
         "page": f"/apps/{a.spec.name}/browser/",
         "core_wasm": sorted(f for f in (a.page.manifest.get("browser") or {}) if f.endswith(".wasm")) if a.page else [],
         "engine": a.spec.browser_engine,
         "updating": a.spec.name in gateway.updating, "build_error": gateway.failed.get(a.spec.name),
         "from_source": a.spec.source is not None,  # an edit served by the dev component (--watch)
         "local_model": local[a.spec.model]}
        for a in gateway.apps.values()
    ], "building": dict(sorted(gateway.building.items())), "updating": sorted(gateway.updating),
        "failed": dict(sorted(gateway.failed.items())),
        "dev_component": gateway.dev_component is not None,  # --watch: edits answer before their builds
        "progress": progress(gateway), "max_local_model_bytes": int(gateway.config.server.browser_max_model_mb * 1e6)})
