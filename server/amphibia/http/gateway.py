"""What every front door shares: the `Gateway` (set up once at startup) and the typed way to reach it."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from ..build import build_in_store, build_owner, source_hash
from ..config import AppSpec, Config
from ..errors import AmphibiaError, AppNotFound, Building
from ..inference.pool.broker import Broker
from ..inference.service import InferenceService
from ..sandbox.runtime import Runtime

log = logging.getLogger("amphibia.gateway")
T = TypeVar("T")


@dataclass
class LoadedApp:
    spec: AppSpec
    component: Any
    manifest: dict
    build_dir: Path  # app.wasm, manifest.json and the browser build; shared by apps with the same sources


class SocketCounts:
    """Open WebSockets per client address, so one client cannot hold every socket the gateway can
    serve. Touched only on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def take(self, websocket: WebSocket) -> str | None:
        """The client's address if it may open one more socket (release it later), else None."""
        ip = websocket.client.host if websocket.client else "?"
        if self.open.get(ip, 0) >= self.limit:
            return None
        self.open[ip] = self.open.get(ip, 0) + 1
        return ip

    def release(self, ip: str) -> None:
        left = self.open.get(ip, 0) - 1
        if left > 0:
            self.open[ip] = left
        else:
            self.open.pop(ip, None)


@dataclass
class Gateway:
    """Set up once at startup. `apps`, `failed` and `building` change as apps are built (by
    `start_building`, on the event loop); everything else is read-only."""

    config: Config
    service: InferenceService
    runtime: Runtime
    broker: Broker | None = None  # None when an engine other than the pool serves (in-process)
    pool_token: str = ""
    bridge_secret: bytes = b""  # signs browser bridge tokens; new per gateway process
    apps: dict[str, LoadedApp] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # app name -> build error, shown on the index
    building: dict[str, str] = field(default_factory=dict)  # app name -> "waiting" or "building"
    sockets: SocketCounts = field(init=False)  # open WebSockets per client address

    def __post_init__(self) -> None:
        self.sockets = SocketCounts(self.config.server.max_sockets_per_ip)


def served_app(gateway: Gateway, name: str) -> LoadedApp:
    """The app called `name`, or the error that says why it cannot answer (yet)."""
    app = gateway.apps.get(name)
    if app is not None:
        return app
    if name in gateway.building:
        raise Building(f"app {name!r} is being built ({gateway.building[name]}); try again in a moment")
    why = gateway.failed.get(name)
    raise AppNotFound(f"app {name!r} failed to build: {why}" if why else f"no app named {name!r}")


def progress(gateway: Gateway) -> dict[str, int]:
    return {"ready": len(gateway.apps), "building": len(gateway.building), "failed": len(gateway.failed),
            "total": len(gateway.apps) + len(gateway.building) + len(gateway.failed)}


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The gateway a request or WebSocket belongs to."""
    gateway = conn.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


@dataclass(frozen=True)
class Built:
    """One build in the store and its loaded component: what apps with the same sources share."""

    component: Any
    manifest: dict
    build_dir: Path

    def serve_as(self, spec: AppSpec) -> LoadedApp:
        return LoadedApp(spec, self.component, self.manifest, self.build_dir)


def build_and_load(runtime: Runtime, spec: AppSpec, store: Path) -> Built:
    """Build `spec`'s sources into the store (unless that build is there) and load the component. Blocking."""
    result = build_in_store(spec.path, store, name=spec.name)
    component = runtime.load(result.wasm, result.sha256)  # an unwritable compile cache only costs the cache
    log.info("app %s ready (%s, %s)", spec.name, result.sha256[:12], "built" if result.rebuilt else "cached")
    return Built(component, result.manifest, result.wasm.parent)


def _record(gateway: Gateway, spec: AppSpec, outcome: LoadedApp | BaseException) -> None:
    """Whatever goes wrong with one app (a build error, but also an OSError such as a full disk) is
    logged with its name and listed in `gateway.failed`; the gateway still serves the others."""
    if isinstance(outcome, LoadedApp):
        gateway.apps[spec.name] = outcome
    elif isinstance(outcome, AmphibiaError):
        gateway.failed[spec.name] = outcome.message
        log.error("app %s not served: %s", spec.name, outcome.message)
    else:  # not ours to expect, so the traceback goes to the log
        gateway.failed[spec.name] = f"{type(outcome).__name__}: {outcome}"
        log.error("app %s not served", spec.name, exc_info=outcome)


def start_building(gateway: Gateway, parallel: int | None = None) -> "asyncio.Task[None]":
    """Build and load every configured app in the background while the gateway serves, `parallel` at
    a time (default: one per core; a build is mostly componentize-py's own process). Until it is
    done an app is listed in `gateway.building` (from now on) and answers 503 `building`."""
    specs = list(gateway.config.apps.values())
    for spec in specs:
        gateway.building[spec.name] = "waiting"
    return asyncio.create_task(_build_apps(gateway, specs, parallel))


async def _build_apps(gateway: Gateway, specs: list[AppSpec], parallel: int | None) -> None:
    build_owner.set(gateway)  # this task's builds are the gateway's (see `build.stop_builds`)
    slots = asyncio.Semaphore(parallel or os.cpu_count() or 1)
    started = time.monotonic()
    store = gateway.config.server.build_dir
    builds: dict[str, asyncio.Future[Built]] = {}  # source hash -> its one build, awaited by every app with it

    async def build_once(spec: AppSpec) -> Built:
        async with slots:
            gateway.building[spec.name] = "building"
            return await _in_daemon_thread(build_and_load, gateway.runtime, spec, store)

    async def one(spec: AppSpec) -> None:
        try:
            key = await _in_daemon_thread(source_hash, spec.path.resolve())
            if key not in builds:
                builds[key] = asyncio.ensure_future(build_once(spec))
            outcome: LoadedApp | BaseException = (await asyncio.shield(builds[key])).serve_as(spec)
        except Exception as exc:
            outcome = exc
        _record(gateway, spec, outcome)
        gateway.building.pop(spec.name, None)
        log.info("apps: %d ready, %d failed, %d to go", len(gateway.apps), len(gateway.failed),
                 len(gateway.building))

    await asyncio.gather(*(one(spec) for spec in specs))
    if specs:
        log.info("all %d app(s) built in %.1f s (%d distinct builds): %d ready, %d failed", len(specs),
                 time.monotonic() - started, len(builds), len(gateway.apps), len(gateway.failed))


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a daemon thread: unlike an executor's threads, a gateway that is told to stop
    does not wait for it (a wasmtime compile cannot be interrupted) before the process exits."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the gateway is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the gateway stopped meanwhile
            pass

    context = contextvars.copy_context()  # e.g. whose build this is
    threading.Thread(target=context.run, args=(run,), name=f"build-{getattr(fn, '__name__', 'job')}",
                     daemon=True).start()
    return await future


def default_models_of(config: Config) -> list[str]:
    """The models the configured apps use by default (the first registered one if there are no apps):
    what a local worker serves and what the in-process engine loads before the first request."""
    return sorted({a.model for a in config.apps.values()}) or list(config.models)[:1]


def health_problems(gateway: Gateway) -> list[str]:
    """Why the gateway cannot serve everything it was configured for (empty: healthy): apps that
    failed to load, and (with a pool) models the apps need that no connected worker serves."""
    reasons = [f"app {name!r} failed to build: {why}" for name, why in sorted(gateway.failed.items())]
    if gateway.broker is not None:
        served = {m for w in gateway.broker.workers.values() for m in w.models}
        reasons += [f"no worker serves model {m!r}" for m in default_models_of(gateway.config) if m not in served]
    return reasons
