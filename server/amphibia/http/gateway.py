"""What every front door shares: the `Gateway` (set up once at startup) and the typed way to reach it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

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


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The gateway a request or WebSocket belongs to."""
    gateway = conn.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


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


def default_models_of(config: Config) -> list[str]:
    """The models the configured apps use by default (the first registered one if there are no apps):
    what a local worker serves and what the in-process engine loads before the first request."""
    return sorted({a.model for a in config.apps.values()}) or list(config.models)[:1]
