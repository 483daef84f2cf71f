"""The Starlette gateway: app routes, health, and the index page.

One app request: HTTP -> `app_route` -> `Runtime.handle_async` (fresh instance in a guest thread)
-> the app's `llm` imports -> `host.llm` -> the engine -> tokens back.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import api
from .bridge import bridge_socket, token_endpoint
from .browser_files import PublicAssets, browser_file, version_of
from .build import BROWSER_DIR, build
from .config import BROWSER_ENGINES, AppSpec, Config
from .engine import Engine
from .errors import AmphibiaError, AppNotFound, BadRequest, error_response
from .host.llm import LlmHost
from .model_files import browser_model, model_file
from .pool.broker import Broker
from .pool.engine import PoolEngine
from .pool.local import start_local_worker
from .pool.local import stop as stop_worker
from .pool.routes import metrics, pool_status, worker_socket
from .runtime import HttpRequest, Runtime

log = logging.getLogger("amphibia.gateway")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_pages = jinja2.Environment(
    loader=jinja2.PackageLoader("amphibia", "templates"), autoescape=jinja2.select_autoescape(["html"])
)


@dataclass
class LoadedApp:
    spec: AppSpec
    component: Any
    manifest: dict


@dataclass
class Gateway:
    """What the routes share: set up once at startup, read-only afterwards."""

    config: Config
    engine: Engine
    runtime: Runtime
    broker: Broker | None = None
    pool_token: str = ""
    bridge_secret: bytes = b""  # signs browser bridge tokens; new per gateway process
    apps: dict[str, LoadedApp] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # app name -> build error, shown on the index


def load_apps(gateway: Gateway) -> None:
    """Build (if sources changed) and load every configured app; a broken app does not stop the others."""
    for spec in gateway.config.apps.values():
        try:
            result = build(spec.path, name=spec.name)
            component = gateway.runtime.load(result.wasm, result.sha256)
            gateway.apps[spec.name] = LoadedApp(spec, component, result.manifest)
            log.info("app %s ready (%s, %s)", spec.name, result.sha256[:12], "built" if result.rebuilt else "cached")
        except AmphibiaError as exc:
            gateway.failed[spec.name] = exc.message
            log.error("app %s not served: %s", spec.name, exc.message)


async def app_route(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    name = request.path_params["name"]
    rid = request.headers.get("x-request-id", "")
    rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex[:12]
    if _is_page_visit(request) and name in gateway.apps:
        return await app_page(request)
    try:
        app = gateway.apps.get(name)
        if app is None:
            why = gateway.failed.get(name)
            raise AppNotFound(f"app {name!r} failed to build: {why}" if why else f"no app named {name!r}")
        body = await _read_body(request, gateway.config.server.max_body_bytes)
        http = HttpRequest(
            method=request.method,
            path="/" + request.path_params.get("path", ""),
            query=request.url.query,
            headers=[(k, v) for k, v in request.headers.items()],
            body=body,
        )
        res = await gateway.runtime.handle_async(app.spec, app.component, http, rid)
    except AmphibiaError as exc:
        log.warning("app=%s request=%s %s %s -> %d %s: %s", name, rid, request.method, request.url.path,
                    exc.status, exc.type, exc.message)
        return error_response(exc, rid)
    headers = [(k.lower(), v) for k, v in res.headers if k.lower() not in ("content-length", "transfer-encoding")]
    response = Response(res.body, res.status)
    for key, value in headers:
        response.headers.append(key, value)
    response.headers["x-request-id"] = rid
    return response


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
    gateway: Gateway = request.app.state.gateway
    name = request.path_params["name"]
    app = gateway.apps.get(name)
    if app is None:
        return error_response(AppNotFound(f"no app named {name!r}"))
    engine = request.query_params.get("engine", app.spec.browser_engine)  # `?engine=remote` overrides the app's policy
    if engine not in BROWSER_ENGINES:
        engine = app.spec.browser_engine
    page = _pages.get_template("app.html").render(app=app.spec, engine=engine, browser=bool(app.manifest.get("browser")))
    return HTMLResponse(page, headers={**ISOLATION_HEADERS, "cache-control": "no-cache"})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BadRequest:
    exc = BadRequest(f"request body is larger than {limit} bytes")
    exc.status, exc.type = 413, "body_too_large"
    return exc


async def app_root(request: Request) -> Response:
    return RedirectResponse(f"/apps/{request.path_params['name']}/", 308)


async def index(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    page = _pages.get_template("index.html").render(
        apps=[a.spec for a in gateway.apps.values()], failed=gateway.failed,
        models=sorted(gateway.config.models),
    )
    return HTMLResponse(page)


async def healthz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return JSONResponse({
        "status": "ok",
        "apps": sorted(gateway.apps),
        "failed": sorted(gateway.failed),
        "models": sorted(gateway.config.models),
        "in_flight": gateway.runtime.in_flight,
        "workers": len(gateway.broker.workers) if gateway.broker else None,
    })


async def list_apps(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return JSONResponse({"apps": [
        {"name": a.spec.name, "description": a.spec.description, "model": a.spec.model,
         "allowed_models": list(a.spec.allowed_models), "url": f"/apps/{a.spec.name}/",
         "wasm_sha256": a.manifest.get("wasm_sha256"),
         "browser": f"/apps/{a.spec.name}/browser/@{version_of(a.manifest)}/" if a.manifest.get("browser") else None,
         "page": f"/apps/{a.spec.name}/browser/",
         "core_wasm": sorted(f for f in (a.manifest.get("browser") or {}) if f.endswith(".wasm")),
         "engine": a.spec.browser_engine,
         "local_model": browser_model(gateway.config, a.spec.model)}
        for a in gateway.apps.values()
    ], "max_local_model_bytes": int(gateway.config.server.browser_max_model_mb * 1e6)})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"type": kind, "message": exc.detail}}, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": {"type": "internal_error", "message": str(exc)}}, 500)


def default_models_of(config: Config) -> list[str]:
    """The models the configured apps use by default (the first registered one if there are no apps):
    what a local worker serves and what the in-process engine loads before the first request."""
    return sorted({a.model for a in config.apps.values()}) or list(config.models)[:1]


def create_app(config: Config, engine: Engine | None = None, warm_model: bool = True,
               local_worker_port: int | None = None, config_target: str | None = None) -> Starlette:
    """The ASGI app.

    With no `engine`, every LLM call goes through the pool's broker (apps, the open APIs and, later,
    the browser bridge alike), and with `local_worker_port` a local worker process is started that
    dials back to this gateway on that port. An `engine` (e.g. in-process llama.cpp) bypasses the pool.
    """
    broker = pool_engine = None
    if engine is None:
        broker = Broker(config.pool)
        pool_engine = PoolEngine(broker, config.models, config.api_app("api"))
        engine = pool_engine
    runtime = Runtime([LlmHost(engine)], config.server.cache_dir, config.server.guest_threads,
                      config.server.queue_limit)
    token = config.pool.token or os.environ.get("AMPHIBIA_POOL_TOKEN") or secrets.token_urlsafe(24)
    gateway = Gateway(config, engine, runtime, broker, token, secrets.token_bytes(32))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background: list[asyncio.Task] = []
        workers = []
        if pool_engine is not None and broker is not None:
            pool_engine.attach(asyncio.get_running_loop())
            background.append(asyncio.create_task(broker.housekeeping()))
            if local_worker_port and config.pool.local_worker:
                for model in default_models_of(config):
                    workers.append(start_local_worker(local_worker_port, model, config.pool.local_slots, token,
                                                      config_target))
        await asyncio.to_thread(load_apps, gateway)
        if warm_model and hasattr(engine, "warm"):
            for model in default_models_of(config):
                await asyncio.to_thread(engine.warm, model)
        yield
        for task in background:
            task.cancel()
        for proc in workers:
            await asyncio.to_thread(stop_worker, proc)
        runtime.close()
        engine.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/api/apps", list_apps),
            Route("/apps/{name}", app_root, methods=METHODS),
            Route("/apps/{name}/browser/", app_page),
            Route("/apps/{name}/browser/{path:path}", browser_file, methods=["GET", "HEAD"]),
            Route("/apps/{name}/{path:path}", app_route, methods=METHODS),
            WebSocketRoute("/pool", worker_socket),
            WebSocketRoute("/bridge", bridge_socket),
            Route("/bridge/token", token_endpoint),
            Route("/pool", pool_status),
            Route("/metrics", metrics),
            Route("/models/@{version}/{name}.gguf", model_file, methods=["GET", "HEAD"]),
            Route("/models/{name}.gguf", model_file, methods=["GET", "HEAD"]),
            # The in-page runtime and the WASI shim it hands to guests (from browser/, see browser/README.md).
            Mount("/amphibia/wllama", StaticFiles(directory=BROWSER_DIR / "node_modules/@wllama/wllama/esm",
                                                  check_dir=False)),
            Mount("/amphibia/shim", StaticFiles(directory=BROWSER_DIR / "node_modules/@bytecodealliance/preview2-shim/dist/browser",
                                                check_dir=False)),
            Mount("/amphibia", StaticFiles(directory=BROWSER_DIR / "src", html=True, check_dir=False)),
            *api.routes,
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(PublicAssets)],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
