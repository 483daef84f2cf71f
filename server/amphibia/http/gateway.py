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

from ..build import (WORLD, BuildResult, background_priority, browser_pending, build_in_store, build_owner,
                     finish_browser, source_hash, toolchain_hash)
from ..contract import interface
from ..config import DEFAULT_EMBEDDING_MODEL, AppSpec, Config
from ..errors import AmphibiaError, AppNotFound, Building
from ..inference.pool.broker import Broker
from ..inference.service import InferenceService
from ..sandbox.runtime import Runtime
from ..store import evict, last_served, remember_served

log = logging.getLogger("amphibia.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class Built:
    """One build in the store: what apps with the same sources share. Its component is loaded when a
    request needs it (`component_of`) and may be unloaded again when others are used more."""

    wasm: Path
    sha256: str
    manifest: dict
    build_dir: Path  # app.wasm, manifest.json and the browser build

    @classmethod
    def of(cls, result: BuildResult) -> "Built":
        return cls(result.wasm, result.sha256, result.manifest, result.wasm.parent)

    def serve_as(self, spec: AppSpec, before: "LoadedApp | None" = None) -> "LoadedApp":
        """This build serving `spec`, after `before` (whose page goes on while this build's browser
        part is still being made)."""
        return LoadedApp(spec, self, before.page if before is not None else None)


@dataclass(frozen=True)
class LoadedApp:
    """An app being served: its configuration and the build that answers for it. Swapping in a new
    build replaces the whole LoadedApp; a request that started on the old one finishes on it."""

    spec: AppSpec
    build: Built
    # The build pages got before this one, while this one's browser part is being made (a gateway
    # serves a new build as soon as its component is ready, and makes the browser part after).
    earlier_page: Built | None = None

    @property
    def manifest(self) -> dict:
        return self.build.manifest

    @property
    def build_dir(self) -> Path:
        return self.build.build_dir

    @property
    def page(self) -> Built | None:
        """The build whose browser part pages get: this one's once made, else the one before (if any)."""
        return self.build if self.build.manifest.get("browser") else self.earlier_page


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
    """Set up once at startup. `apps`, `failed`, `building` and `updating` change as apps are built
    (by `update_apps`, on the event loop); everything else is read-only."""

    config: Config
    service: InferenceService
    runtime: Runtime
    broker: Broker | None = None  # None when an engine other than the pool serves (in-process)
    pool_token: str = ""
    bridge_secret: bytes = b""  # signs browser bridge tokens; new per gateway process
    apps: dict[str, LoadedApp] = field(default_factory=dict)
    # app name -> its last build error, shown on the index. An app can be in `apps` too: its new
    # version failed and the one before still serves.
    failed: dict[str, str] = field(default_factory=dict)
    building: dict[str, str] = field(default_factory=dict)  # not served yet: "waiting" or "building"
    updating: dict[str, str] = field(default_factory=dict)  # served by an older build while a new one builds
    sockets: SocketCounts = field(init=False)  # open WebSockets per client address
    build_slots: asyncio.Semaphore | None = None  # builds at once (one per core), made on first use
    dev_component: Built | None = None  # serves edits before their builds (`--watch`, http/watch.py)
    dev: bool = False  # `amphibia dev`: the dev pages are served (http/dev.py)

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
    return {"ready": len(gateway.apps), "building": len(gateway.building), "updating": len(gateway.updating),
            "failed": len(gateway.failed), "total": len(gateway.apps.keys() | gateway.building.keys() | gateway.failed.keys())}


async def component_of(gateway: Gateway, app: LoadedApp) -> Any:
    """The app's compiled component: from memory, else mapped from the disk cache off the event loop
    (milliseconds; it was compiled when the app was built)."""
    cache = gateway.runtime.cache
    return cache.loaded(app.build.sha256) or await asyncio.to_thread(cache.load, app.build.wasm, app.build.sha256)


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The gateway a request or WebSocket belongs to."""
    gateway = conn.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


def build_and_prepare(runtime: Runtime, spec: AppSpec, store: Path, src: str) -> Built:
    """Build `spec`'s sources into the store (unless that build is there) and compile its component
    to the disk cache, so the app's first request only maps it. Blocking; on a thread of its own,
    whose priority it lowers."""
    background_priority()
    result = build_in_store(spec.path, store, name=spec.name, src=src, browser_later=True)
    runtime.cache.prepare(result.wasm, result.sha256)  # an unwritable compile cache only costs the cache
    log.info("app %s ready (%s, %s)", spec.name, result.sha256[:12], "built" if result.rebuilt else "cached")
    return Built.of(result)


@dataclass(frozen=True)
class Survey:
    """What is known about one app before building: its input's hash (or why there is none) and the
    build it was last served from (to serve while a new one builds)."""

    key: str | BaseException
    previous: Built | None


def survey(specs: list[AppSpec], store: Path) -> dict[str, Survey]:
    """Hash every app's sources (each folder once, the toolchain once) and find their last builds.
    Blocking; one thread for all, not one per app: 1,000 apps may share a folder."""
    toolchain, world = toolchain_hash(), interface(WORLD)
    keys: dict[Path, str | BaseException] = {}
    out = {}
    for spec in specs:
        folder = spec.path.resolve()
        if folder not in keys:
            try:
                keys[folder] = source_hash(folder, toolchain)
            except Exception as exc:  # an unreadable folder fails that app, not the survey
                keys[folder] = exc
        previous = last_served(store, spec.name, folder)
        built = Built.of(previous) if previous else None
        if built is not None and built.manifest.get("world") != world:
            built = None  # built for another version of the contract: it would not link here
        out[spec.name] = Survey(keys[folder], built)
    return out


def start_building(gateway: Gateway) -> "asyncio.Task[None]":
    """Build and serve every configured app in the background while the gateway serves. Until its
    build is ready an app answers 503 `building`, or is served by its last build if it has one."""
    specs = list(gateway.config.apps.values())
    for spec in specs:
        gateway.building[spec.name] = "waiting"
    return asyncio.create_task(update_apps(gateway, specs))


async def update_apps(gateway: Gateway, specs: list[AppSpec],
                      current: Callable[[AppSpec], bool] | None = None) -> None:
    """Build `specs` (each distinct input once, one build per core at a time) and swap each app to
    its new build when it is ready. Meanwhile an app is served by what served it before (in this
    process, or its last build in the store: after an upgrade nothing goes down); an app with
    nothing to serve answers 503 `building`. A failed build leaves the old version serving. With
    `current`, a build is swapped in only if `current(spec)` still holds when it is ready (`--watch`:
    no newer edit arrived meanwhile)."""
    build_owner.set(gateway)  # this task's builds are the gateway's (see `build.stop_builds`)
    if gateway.build_slots is None:
        gateway.build_slots = asyncio.Semaphore(os.cpu_count() or 1)  # a build is mostly its own process
    started = time.monotonic()
    store = gateway.config.server.build_dir
    found = await _in_daemon_thread(survey, specs, store)
    builds: dict[str, asyncio.Future[Built]] = {}  # input hash -> its one build, awaited by every app with it
    browsers: dict[str, asyncio.Future[Built]] = {}  # input hash -> the same build with its browser part made
    served: list[tuple[str, Path, Path]] = []
    pages: list[tuple[AppSpec, Built, str]] = []  # served builds whose browser part is still to be made

    async def build_once(spec: AppSpec, key: str) -> Built:
        assert gateway.build_slots is not None
        async with gateway.build_slots:
            if spec.name in gateway.building:
                gateway.building[spec.name] = "building"
            return await _in_daemon_thread(build_and_prepare, gateway.runtime, spec, store, key)

    async def browser_once(built: Built) -> Built:
        assert gateway.build_slots is not None
        async with gateway.build_slots:
            return await _in_daemon_thread(make_browser_part, built)

    async def one(spec: AppSpec) -> None:
        name, what = spec.name, found[spec.name]
        serving = gateway.apps.get(name)
        if serving is None and what.previous is not None:
            serving = gateway.apps[name] = what.previous.serve_as(spec)
        if serving is not None:
            gateway.building.pop(name, None)
            gateway.updating[name] = "building"
        page_later = False
        try:
            if isinstance(what.key, BaseException):
                raise what.key
            if what.key not in builds:
                builds[what.key] = asyncio.ensure_future(build_once(spec, what.key))
            built = await asyncio.shield(builds[what.key])
        except Exception as exc:
            if current is None or current(spec):  # (an older edit's failure: the newer one is on its way)
                _record_failure(gateway, spec, exc, still_serving=serving is not None)
        else:
            if current is not None and not current(spec):
                log.info("app %s: build %s is for an older edit; not swapped in", name, built.sha256[:12])
                return
            gateway.apps[name] = built.serve_as(spec, serving)
            gateway.failed.pop(name, None)
            served.append((name, spec.path, built.build_dir))
            if serving is not None and serving.build != built:
                log.info("app %s now served by its new build %s", name, built.sha256[:12])
            page_later = browser_pending(built.manifest)
            if page_later:  # served meanwhile; pages get the build before (if any) until it is made
                pages.append((spec, built, what.key))
        finally:
            gateway.building.pop(name, None)
            if page_later:
                gateway.updating[name] = "browser"
            else:
                gateway.updating.pop(name, None)

    async def page(spec: AppSpec, built: Built, key: str) -> None:
        try:
            if key not in browsers:
                browsers[key] = asyncio.ensure_future(browser_once(built))
            finished = await asyncio.shield(browsers[key])
        except Exception as exc:
            _record_failure(gateway, spec, exc, still_serving=True)
        else:
            now = gateway.apps.get(spec.name)
            if now is not None and now.build.sha256 == built.sha256:  # (not swapped again meanwhile)
                gateway.apps[spec.name] = LoadedApp(now.spec, finished)
        finally:
            gateway.updating.pop(spec.name, None)

    await asyncio.gather(*(one(spec) for spec in specs))
    await _in_daemon_thread(remember_served, store, served)  # before the pages: a restart serves these
    await asyncio.gather(*(page(*job) for job in pages))
    await _in_daemon_thread(_evict, gateway)
    if specs:
        log.info("%d app(s) built in %.1f s (%d distinct builds): %d ready, %d failed", len(specs),
                 time.monotonic() - started, len(builds), len(gateway.apps), len(gateway.failed))


def make_browser_part(built: Built) -> Built:
    """The browser part of a build served without it (jco, at a lower priority). Blocking."""
    background_priority()
    return Built.of(finish_browser(BuildResult(built.wasm, built.manifest, rebuilt=False)))


def _evict(gateway: Gateway) -> None:
    """Keep the store within its disk budget, never touching what any app is served by (or its page)."""
    server = gateway.config.server
    in_use = list(gateway.apps.values())  # a copy: the event loop may swap apps meanwhile
    evict(server.build_dir, server.cache_dir, server.store_max_mb,
          keep={a.build_dir for a in in_use} | {a.page.build_dir for a in in_use if a.page is not None},
          keep_sha256={a.build.sha256 for a in in_use})


def _record_failure(gateway: Gateway, spec: AppSpec, error: BaseException, still_serving: bool) -> None:
    """Whatever goes wrong with one app (a build error, but also an OSError such as a full disk) is
    logged with its name and listed in `gateway.failed`; the gateway still serves the others, and
    the app itself if an older build of it serves."""
    message = error.message if isinstance(error, AmphibiaError) else f"{type(error).__name__}: {error}"
    gateway.failed[spec.name] = message
    also = " (its previous build still serves it)" if still_serving else ""
    if isinstance(error, AmphibiaError):
        log.error("app %s not built%s: %s", spec.name, also, message)
    else:  # not ours to expect, so the traceback goes to the log
        log.error("app %s not built%s", spec.name, also, exc_info=error)


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


def embedding_models_of(config: Config) -> list[str]:
    """The embedding models the configured apps (or, with none, the open APIs) embed with by default:
    `amphibia up` starts a local worker for one when a request first needs it."""
    wanted = {a.embedding_model for a in config.apps.values()} or {DEFAULT_EMBEDDING_MODEL}
    return sorted(m for m in wanted if m in config.models and m not in default_models_of(config))


def health_problems(gateway: Gateway) -> list[str]:
    """Why the gateway cannot serve everything it was configured for (empty: healthy): apps that
    failed to load, and (with a pool) models the apps need that no connected worker serves."""
    reasons = [f"app {name!r}: its new version failed to build (the previous one still serves): {why}"
               if name in gateway.apps else f"app {name!r} failed to build: {why}"
               for name, why in sorted(gateway.failed.items())]
    if gateway.broker is not None:
        served = {m for w in gateway.broker.workers.values() for m in w.models}
        reasons += [f"no worker serves model {m!r}" for m in default_models_of(gateway.config) if m not in served]
    return reasons
