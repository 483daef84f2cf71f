"""What every front door shares: the `Gateway` (set up once at startup) and the typed way to reach it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket
from wasmtime.component import Component

from ..build import build
from ..config import AppSpec, Config
from ..errors import AmphibiaError
from ..inference.pool.broker import Broker
from ..inference.service import InferenceService
from ..sandbox.runtime import Runtime

log = logging.getLogger("amphibia.gateway")


@dataclass
class LoadedApp:
    spec: AppSpec
    component: Any
    manifest: dict


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
    """Read-only after startup, except `apps` and `failed` (filled by `load_apps`)."""

    config: Config
    service: InferenceService
    runtime: Runtime
    broker: Broker | None = None  # None when an engine other than the pool serves (in-process)
    pool_token: str = ""
    bridge_secret: bytes = b""  # signs browser bridge tokens; new per gateway process
    apps: dict[str, LoadedApp] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # app name -> build error, shown on the index
    sockets: SocketCounts = field(init=False)  # open WebSockets per client address

    def __post_init__(self) -> None:
        self.sockets = SocketCounts(self.config.server.max_sockets_per_ip)


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The gateway a request or WebSocket belongs to."""
    gateway = conn.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


def load_apps(gateway: Gateway) -> None:
    """Build (if sources changed) and load every configured app. Whatever goes wrong with one app (a
    build error, but also an OSError such as a full disk) is logged with its name and listed in
    `gateway.failed`; the gateway still serves the others."""
    for spec in gateway.config.apps.values():
        try:
            result = build(spec.path, name=spec.name)
            component = _load_component(gateway.runtime, result.wasm, result.sha256, spec.name)
            gateway.apps[spec.name] = LoadedApp(spec, component, result.manifest)
            log.info("app %s ready (%s, %s)", spec.name, result.sha256[:12], "built" if result.rebuilt else "cached")
        except AmphibiaError as exc:
            gateway.failed[spec.name] = exc.message
            log.error("app %s not served: %s", spec.name, exc.message)
        except Exception as exc:  # not ours to expect, so the traceback goes to the log
            gateway.failed[spec.name] = f"{type(exc).__name__}: {exc}"
            log.exception("app %s not served", spec.name)


def _load_component(runtime: Runtime, wasm: Path, sha256: str, app: str) -> Component:
    """The compiled component, from the on-disk cache if it can be used. The cache is only a speed-up:
    if it cannot be written (a full disk, a read-only folder), compile in memory and serve uncached."""
    try:
        return runtime.load(wasm, sha256)
    except OSError as exc:
        log.warning("app %s: the compile cache in %s failed (%s); serving it uncached", app, runtime.cache.dir, exc)
        return Component.from_file(runtime.wasmtime, str(wasm))


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
