"""The gateway as an ASGI app: its front doors, its error handling, and what starts and stops with it."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from ..build import BROWSER_DIR
from ..config import Config
from ..errors import AmphibiaError, error_response
from ..inference.engine import Engine
from ..inference.pool.broker import Broker
from ..inference.pool.engine import PoolEngine
from ..inference.pool.spawn import spawn_worker, stop_worker
from ..inference.service import InferenceService
from ..sandbox.llm_host import LlmHost
from ..sandbox.runtime import Runtime
from . import openai, spin
from .apps import app_page, app_root, app_route, healthz, index, list_apps
from .assets import PublicAssets, browser_file, model_file
from .bridge import bridge_socket, token_endpoint
from .gateway import Gateway, default_models_of, load_apps
from .pool import metrics, pool_status, worker_socket

log = logging.getLogger("amphibia.gateway")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


async def amphibia_error(request: Request, exc: Exception) -> Response:
    """Every route raises its errors; they are answered and logged here, once."""
    assert isinstance(exc, AmphibiaError)
    rid = getattr(request.state, "request_id", "")
    app = request.path_params.get("name", "-")
    log.warning("app=%s request=%s %s %s -> %d %s: %s", app, rid or "-", request.method, request.url.path,
                exc.status, exc.type, exc.message)
    return error_response(exc, rid)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"type": kind, "message": exc.detail}}, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": {"type": "internal_error", "message": str(exc)}}, 500)


def create_app(config: Config, engine: Engine | None = None, warm_model: bool = True,
               local_worker_port: int | None = None, config_target: str | None = None) -> Starlette:
    """The gateway. With no `engine`, inference goes to the pool's broker, and with `local_worker_port`
    a worker process is started that dials back to this gateway on that port. An `engine` (e.g. the
    in-process one) serves every entrance instead: apps, the open APIs, the bridge."""
    broker = pool_engine = None
    if engine is None:
        broker = Broker(config.pool)
        engine = pool_engine = PoolEngine(broker, config.models)
    service = InferenceService(engine)
    runtime = Runtime([LlmHost(service)], config.server.cache_dir, config.server.guest_threads,
                      config.server.queue_limit)
    token = config.pool.token or os.environ.get("AMPHIBIA_POOL_TOKEN") or secrets.token_urlsafe(24)
    gateway = Gateway(config, service, runtime, broker, token, secrets.token_bytes(32))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background: list[asyncio.Task] = []
        workers = []
        if pool_engine is not None and broker is not None:
            pool_engine.attach(asyncio.get_running_loop())
            background.append(asyncio.create_task(broker.housekeeping()))
            if local_worker_port and config.pool.local_worker:
                for model in default_models_of(config):
                    workers.append(spawn_worker(f"ws://127.0.0.1:{local_worker_port}/pool", token, model=model,
                                                slots=config.pool.local_slots, worker_id=f"local-{model}",
                                                config=config_target))
        await asyncio.to_thread(load_apps, gateway)
        warm = getattr(engine, "warm", None)
        if warm_model and warm is not None:
            for model in default_models_of(config):
                await asyncio.to_thread(warm, model)
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
            *openai.routes,
            *spin.routes,
        ],
        exception_handlers={AmphibiaError: amphibia_error, HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(PublicAssets)],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
