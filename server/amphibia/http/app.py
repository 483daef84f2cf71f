"""The gateway as an ASGI app: its front doors, its error handling, and what starts and stops with it."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from ..build import BROWSER_DIR, stop_builds
from ..config import DEFAULT_MODEL, Config
from ..errors import AmphibiaError, error_response
from ..inference.engine import Engine
from ..inference.pool.broker import Broker
from ..inference.pool.engine import PoolEngine
from ..inference.pool.spawn import Supervisor, spawn_worker
from ..inference.service import InferenceService
from ..sandbox.llm_host import LlmHost
from ..sandbox.runtime import Runtime
from . import dev as dev_routes
from . import openai, spin
from .apps import app_page, app_root, app_route, healthz, index, list_apps
from .assets import PublicAssets, browser_file, model_file
from .bridge import bridge_socket, token_endpoint
from .gateway import Gateway, default_models_of, embedding_models_of, start_building
from .hosts import TrustedHosts
from .pool import metrics, pool_status, worker_socket
from .request_ids import RequestIds
from .watch import watch_apps
from .websocket import capped

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
               local_worker_port: int | None = None, config_target: str | None = None,
               watch: bool = False, dev: bool = False) -> Starlette:
    """The gateway. With no `engine`, inference goes to the pool's broker, and with `local_worker_port`
    a worker process is started (and restarted whenever it exits) that dials back to this gateway on
    that port. An `engine` (e.g. the in-process one) serves every entrance instead: apps, the open
    APIs, the bridge. Only requests for `config.server.hosts` (and the bind host) are served. With
    `watch`, an app whose files change is rebuilt and swapped in (see `http/watch.py`); `dev` adds the
    dev pages (`http/dev.py`: the source in the page's Pyodide, saved from the page) and implies `watch`."""
    watch = watch or dev
    broker = pool_engine = None
    if engine is None:
        broker = Broker(config.pool)
        engine = pool_engine = PoolEngine(broker, config.models)
    service = InferenceService(engine)
    runtime = Runtime([LlmHost(service)], config.server.cache_dir, config.server.guest_slots,
                      config.server.queue_limit, config.server.max_loaded_apps, config.server.spare_instances)
    token = config.pool.token or os.environ.get("AMPHIBIA_POOL_TOKEN") or secrets.token_urlsafe(24)
    gateway = Gateway(config, service, runtime, broker, token, secrets.token_bytes(32), dev=dev)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background: list[asyncio.Task] = []
        if pool_engine is not None and broker is not None:
            pool_engine.attach(asyncio.get_running_loop())
            background.append(asyncio.create_task(broker.housekeeping()))
            if local_worker_port and config.pool.local_worker and not config.pool.ray.enabled:
                app.state.local_workers = _local_workers(config, broker, local_worker_port, token, config_target)
                _embedding_workers(app, config, broker, local_worker_port, token, config_target)
            if config.pool.ray.enabled:
                app.state.ray_workers = _ray_workers(config, broker, local_worker_port or config.server.port, token)
                await app.state.ray_workers.start()
        try:
            for supervisor in app.state.local_workers:
                supervisor.run()
            # Serve at once: apps build in the background (503 `building` until each is ready), and
            # the in-process engine loads its model meanwhile.
            building = start_building(gateway)
            background.append(building)
            if watch:
                background.append(asyncio.create_task(watch_apps(gateway, building)))
            warm = getattr(engine, "warm", None)
            if warm_model and warm is not None:
                for model in default_models_of(config):
                    background.append(asyncio.create_task(asyncio.to_thread(warm, model)))
            yield
        finally:
            for task in background:
                task.cancel()
            stop_builds(gateway)  # a gateway told to stop does not wait for componentize-py
            for supervisor in app.state.local_workers:
                await supervisor.stop()
            if app.state.ray_workers is not None:
                await app.state.ray_workers.stop()
            runtime.close()
            if pool_engine is not None:  # an engine handed in (tests, notebooks) is its owner's to close
                pool_engine.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/api/apps", list_apps),
            Route("/apps/{name}", app_root, methods=METHODS),
            Route("/apps/{name}/browser/", app_page),
            Route("/apps/{name}/browser/{path:path}", browser_file, methods=["GET", "HEAD"]),
            Route("/apps/{name}/{path:path}", app_route, methods=METHODS),
            WebSocketRoute("/pool", capped(worker_socket)),
            WebSocketRoute("/bridge", capped(bridge_socket)),
            Route("/bridge/token", token_endpoint),
            Route("/pool", pool_status),
            Route("/metrics", metrics),
            Route("/models/@{version}/{name}.gguf", model_file, methods=["GET", "HEAD"]),
            Route("/models/{name}.gguf", model_file, methods=["GET", "HEAD"]),
            *(dev_routes.routes if dev else []),
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
        # Outermost: a request for a host that is not ours gets no further than this.
        middleware=[Middleware(TrustedHosts, hosts=(*config.server.hosts, config.server.host)),
                    Middleware(RequestIds), Middleware(PublicAssets)],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.local_workers = []  # Supervisors of the worker processes this gateway started (see lifespan)
    app.state.ray_workers = None  # the worker actors it places on a Ray cluster ([pool.ray], `up --ray`)
    return app


def _ray_workers(config: Config, broker: Broker, port: int, token: str) -> Any:
    """Worker actors on the Ray cluster, dialling this gateway at its public URL."""
    from ..inference.pool.ray_workers import RayWorkers  # Ray is optional: imported only when used

    model = config.pool.ray.model or next(iter(default_models_of(config)), DEFAULT_MODEL)
    if model not in config.models:
        raise AmphibiaError(f"[pool.ray] model {model!r} is not defined in [models]")
    base = config.server.public_url or f"http://{_reachable(config.server.host)}:{port}"
    url = base.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/pool"
    extra = {m: config.models[m] for m in embedding_models_of(config) if m != model}
    return RayWorkers(config.pool.ray, config.models[model], url, token, broker, extra)


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _local_workers(config: Config, broker: Broker, port: int, token: str,
                   config_target: str | None) -> list[Supervisor]:
    """`[pool] local_workers` supervised worker processes per model the apps use, dialling this
    gateway on `port`. They split the model's threads: llama.cpp threads that outnumber the cores
    spin at barriers and slow every worker many times."""
    supervisors = []
    count = max(1, config.pool.local_workers)
    for model in default_models_of(config):
        spec = config.models.get(model)
        threads = max(1, spec.threads // count) if spec else None
        for i in range(count):
            worker_id = f"local-{model}" if i == 0 else f"local-{model}-{i + 1}"
            start = functools.partial(spawn_worker, f"ws://127.0.0.1:{port}/pool", token, model=model,
                                      slots=config.pool.local_slots, worker_id=worker_id, threads=threads,
                                      config=config_target)
            restarts = broker.metrics.worker_restarts.labels(worker_id)  # shown as 0 from the start
            supervisors.append(Supervisor(start, worker_id, on_restart=restarts.inc))
    return supervisors


def _embedding_workers(app: Starlette, config: Config, broker: Broker, port: int, token: str,
                       config_target: str | None) -> None:
    """A supervised worker per embedding model the apps use, started when a request first needs it
    (most apps never embed, and an idle process still holds its memory), then kept like the others
    (stopped with the gateway). One worker with the model's threads (one for the default: it is tiny,
    and a second spinning thread would take a core from the generation workers on a small machine)."""
    waiting: dict[str, Supervisor] = {}
    for model in embedding_models_of(config):
        worker_id = f"local-{model}"
        start = functools.partial(spawn_worker, f"ws://127.0.0.1:{port}/pool", token, model=model, slots=1,
                                  worker_id=worker_id, threads=config.models[model].threads, config=config_target)
        restarts = broker.metrics.worker_restarts.labels(worker_id)
        waiting[model] = Supervisor(start, worker_id, on_restart=restarts.inc)

    def start(model: str) -> None:  # on the event loop, from the broker
        supervisor = waiting.pop(model, None)
        if supervisor is not None:
            log.info("starting a worker for embedding model %s", model)
            supervisor.run()
            app.state.local_workers.append(supervisor)  # stopped at shutdown like the others

    broker.unserved_listeners.append(start)
