"""Amphibia in Jupyter: write apps in cells, run them in the sandbox against the real model or a
remote pool, watch tokens stream, and look at how the pool shares its slots.

    %load_ext amphibia                    # the %%amphibia_app cell magic
    import amphibia
    chat = amphibia.load("examples/chat")  # build (cached by source hash) and load
    chat.post("/", json={"messages": [{"role": "user", "content": "Hi!"}]})
    chat.stream("/stream", json=...)       # tokens appear in the output as they come
    amphibia.connect("ws://host:8000", app="chat")  # the same apps, served by a remote pool
    amphibia.show(chat)                    # the app's browser page, from a gateway on loopback
    amphibia.pool_view(gateway)            # slots per worker, queues and service, as a picture

Everything is real: the normal build and Runtime, the model in this process (or the remote
gateway's workers), real gateways and worker processes, which stop with the kernel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import Limits
from .apps import NotebookApp, NotebookBuildError, Response
from .apps import load as _load
from .engines import EngineSwitch
from .pool_view import PoolTrace, ensure_figure_display, pool_stats, pool_view
from .remote import BridgeEngine
from .server import BackgroundGateway, page_url
from .server import serve as _serve
from .server import show as _show
from .session import Session, session, use_session

__all__ = ["BackgroundGateway", "BridgeEngine", "EngineSwitch", "Limits", "NotebookApp", "NotebookBuildError",
           "PoolTrace", "Response", "Session", "connect", "current_engine", "load", "load_ipython_extension",
           "page_url", "pool_stats", "pool_view", "serve", "session", "show", "start_gateway", "use_session"]


def load(path: str | Path, name: str | None = None, *, model: str | None = None,
         limits: Limits | dict | None = None, weight: float | None = None, cell_offset: int | None = None) -> NotebookApp:
    """Build the app folder at `path` (skipped when its build is current) and load it in this kernel."""
    return _load(session(), path, name, model=model, limits=limits, weight=weight, cell_offset=cell_offset)


def connect(url: str | None = None, token: str | None = None, app: str | None = None) -> Any:
    """Serve this kernel's `llm` calls from a remote gateway's pool, over its browser bridge.

    `url`: ws://HOST:PORT or http://HOST:PORT; None goes back to the model in this process.
    `token`: a bridge token from `GET /bridge/token?app=NAME` (the calls then act as that app);
    without one, a token is fetched for `app`, or else for the app making each call, so that
    app must be served by the remote gateway too. Apps need no change either way.
    """
    s = session()
    if url is None:
        s.engine.use(None, "local")
        return s.engine.local
    remote = BridgeEngine(url, token=token, app=app)
    s.engine.use(remote, f"pool at {remote.ws_base}")
    return remote


def current_engine() -> str:
    """Which engine serves this kernel's apps now: "local" or the remote pool's address."""
    return session().engine.label


def serve(*apps: NotebookApp) -> BackgroundGateway:
    """Serve `apps` over HTTP from this kernel's background gateway (on 127.0.0.1, with one worker
    process), starting it on first use; it stops with the kernel."""
    return _serve(session(), *apps)


def show(app: NotebookApp, height: int = 480) -> Any:
    """Embed `app`'s browser UI in the output, served by the background gateway."""
    return _show(session(), app, height)


def start_gateway(apps: Iterable[NotebookApp] | Mapping[str, NotebookApp] = (), *, workers: int | Iterable[str] = 2,
                  slots: int = 2, quantum_tokens: int = 16, limits: Limits | None = None,
                  **options: Any) -> BackgroundGateway:
    """Another gateway to experiment with: `apps` (a list, or {name: app} to serve one component as
    several tenants), `workers` worker processes (a count or their ids) with `slots` slots each."""
    return BackgroundGateway(session(), apps, workers=workers, slots=slots, quantum_tokens=quantum_tokens,
                             limits=limits, **options)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext amphibia`: the %%amphibia_app magic, and figures that display without pyplot."""
    from .magics import AmphibiaMagics

    ipython.register_magics(AmphibiaMagics)
    ensure_figure_display(ipython)
