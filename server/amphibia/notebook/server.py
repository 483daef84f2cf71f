"""Gateways a notebook starts: the real gateway (uvicorn in a thread, on loopback) with its own
pool and real worker processes, stopped with the kernel.

`serve(app)` puts apps on the session's gateway, `show(app)` embeds the app's browser page from it,
and `start_gateway(...)` makes another one to experiment with (workers, slots, limits).
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import httpx

from ..config import Config, Limits, PoolConfig, ServerConfig
from ..errors import AmphibiaError
from ..http.app import create_app
from ..http.gateway import Built
from ..inference.pool.spawn import spawn_worker
from ..inference.pool.spawn import stop_worker as stop_process
from ..loopback import free_port, serve_in_thread
from .apps import NotebookApp, with_overrides
from .session import Session

# The app's browser page (the <amphibia-app> element). Until a gateway serves it, `page_url`
# falls back to the in-page runtime's own page, so the rest of the path works.
PAGE = "/apps/{name}/browser/"
FALLBACK_PAGE = "/amphibia/?app={name}"


try:  # resolved here, not in the forked child, where loading a library could deadlock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGTERM when the thread that started it (the kernel's) dies,
    even by SIGKILL, so no worker outlives a crashed kernel (Linux; elsewhere atexit only)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class BackgroundGateway:
    """A gateway on 127.0.0.1 serving `apps` (a list, or {name: app} to serve one component under
    several names), with a pool fed by `workers` worker processes of `slots` slots each."""

    def __init__(self, session: Session, apps: Iterable[NotebookApp] | Mapping[str, NotebookApp] = (), *,
                 workers: int | Iterable[str] = 1, slots: int = 2, quantum_tokens: int = 16, max_queue: int = 256,
                 limits: Limits | dict | None = None, guest_threads: int = 16, threads: int | None = None,
                 port: int | None = None, start_timeout_s: float = 120.0) -> None:
        self.session = session
        named = dict(apps) if isinstance(apps, Mapping) else {a.name: a for a in apps}
        ids = [f"w{i + 1}" for i in range(workers)] if isinstance(workers, int) else list(workers)
        # llama.cpp's threads spin at barriers: more threads than cores, summed over the workers of
        # one machine, makes every worker many times slower. Split the cores between them.
        self.threads = threads or max(1, (os.cpu_count() or 2) // max(1, len(ids)))
        self.limits = limits  # for every app served here, over the app's own (a dict: only those keys)
        self.host, self.port = "127.0.0.1", port or free_port()
        self.url = f"http://{self.host}:{self.port}"
        self.token = secrets.token_urlsafe(18)
        server = replace(ServerConfig(), host=self.host, port=self.port, guest_threads=guest_threads, queue_limit=64,
                         cache_dir=session.config.server.cache_dir)
        specs = {name: self._spec(app, name) for name, app in named.items()}
        base = limits if isinstance(limits, Limits) else replace(session.config.limits, **(limits or {}))
        self.config = Config(server=server, limits=base, models=session.config.models,
                             apps=specs, pool=PoolConfig(token=self.token, local_worker=False, quantum_tokens=quantum_tokens,
                                                         max_queue=max_queue), root=Path.cwd())
        self.asgi = create_app(self.config, warm_model=False)
        self.gateway = self.asgi.state.gateway
        self.log_dir = Path(tempfile.mkdtemp(prefix="amphibia-notebook-"))
        self.workers: dict[str, subprocess.Popen] = {}
        # An embedding model gets a worker of its own when a request first needs it (as with `amphibia up`).
        self.gateway.broker.unserved_listeners.append(self._embedding_worker)
        self._served = serve_in_thread(self.asgi, self.port, self.host, start_timeout_s)
        self.stopped = False
        session.gateways.append(self)
        atexit.register(self.stop)
        for worker_id in ids:
            self.start_worker(worker_id, slots)
        if ids:
            self.wait_for_workers(len(ids))

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{len(self.workers)} worker process(es)"
        return f"<BackgroundGateway {self.url}: apps {', '.join(self.gateway.apps) or 'none'}; {state}>"

    # --- apps -----------------------------------------------------------------------------------------
    def add(self, app: NotebookApp, name: str | None = None, **overrides: Any) -> str:
        """Serve `app` (as `name`, with other `limits` or `weight`) from now on; returns its URL."""
        spec = self._spec(app, name, **overrides)
        self.gateway.runtime.load(app.build.wasm, app.build.sha256)  # loaded now: its first request is warm
        self.config.apps[spec.name] = spec
        self.gateway.apps[spec.name] = Built.of(app.build).serve_as(spec)
        return self.app_url(spec.name)

    def _spec(self, app: NotebookApp, name: str | None, **overrides: Any) -> Any:
        """`app` as served here: the gateway's `limits` over its own, then `overrides` over both."""
        own = overrides.get("limits")
        if self.limits is not None and own is None:
            overrides["limits"] = self.limits
        elif isinstance(self.limits, dict) and isinstance(own, dict):
            overrides["limits"] = {**self.limits, **own}
        # A notebook's gateway is the user's own: its apps take calls from pages (show, connect).
        overrides.setdefault("bridge", True)
        return with_overrides(app, name, **overrides)

    def app_url(self, name: str) -> str:
        return f"{self.url}/apps/{name}/"

    def request(self, app: str, method: str, path: str = "/", **kwargs: Any) -> httpx.Response:
        """An HTTP request to one of the served apps (kwargs as for httpx.request)."""
        kwargs.setdefault("timeout", 300)
        return httpx.request(method, f"{self.url}/apps/{app}/{path.lstrip('/')}", **kwargs)

    def get(self, app: str, path: str = "/", **kwargs: Any) -> httpx.Response:
        return self.request(app, "GET", path, **kwargs)

    def post(self, app: str, path: str = "/", **kwargs: Any) -> httpx.Response:
        return self.request(app, "POST", path, **kwargs)

    # --- workers --------------------------------------------------------------------------------------
    def start_worker(self, worker_id: str, slots: int = 2, model: str = "smollm2",
                     threads: int | None = None) -> subprocess.Popen:
        """A real worker process (`amphibia worker`) that dials this gateway's pool; its log goes to a file."""
        # A process group of its own: ipykernel signals the children in its group at shutdown and
        # then waits for them to vanish, which a terminated but unreaped worker never does; these
        # workers are stopped by `stop` (atexit) instead, or by the kernel's death (PDEATHSIG).
        proc = spawn_worker(f"ws://{self.host}:{self.port}/pool", self.token, model=model, slots=slots,
                            worker_id=worker_id, threads=threads or self.threads, config=self._models_toml(),
                            log_file=self.log_dir / f"worker-{worker_id}.log", own_session=True,
                            preexec=_die_with_parent if _prctl is not None else None)
        self.workers[worker_id] = proc
        return proc

    def _embedding_worker(self, model: str) -> None:
        """Called by the broker (on the gateway's loop) for a request whose model no worker serves."""
        spec = self.config.models.get(model)
        wanted = spec is not None and spec.purpose == "embeddings"
        if wanted and not getattr(self, "stopped", False) and f"embed-{model}" not in self.workers:
            self.start_worker(f"embed-{model}", slots=1, model=model, threads=spec.threads)

    def _models_toml(self) -> Path:
        """The workers' model registry: this session's models (which may not be the defaults)."""
        lines = []
        for name, spec in self.config.models.items():
            lines += [f"[models.{name}]", f"n_ctx = {spec.n_ctx}",
                      f"gpu_layers = {spec.gpu_layers}", f"purpose = {json.dumps(spec.purpose)}"]
            for key in ("path", "package", "file"):
                if getattr(spec, key) is not None:
                    lines.append(f"{key} = {json.dumps(str(getattr(spec, key)))}")
            lines.append("")
        path = self.log_dir / "amphibia.toml"
        path.write_text("\n".join(lines))
        return path

    def stop_worker(self, worker_id: str) -> None:
        proc = self.workers.pop(worker_id, None)
        if proc is not None:
            stop_process(proc)

    def worker_log(self, worker_id: str) -> str:
        return (self.log_dir / f"worker-{worker_id}.log").read_text(errors="replace")

    def status(self) -> dict:
        """`GET /pool`: workers and their slots, queues, per-app service, the slot timeline."""
        return httpx.get(f"{self.url}/pool", timeout=10).json()

    def wait_for_workers(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.status()["workers"]) < count:
            dead = [wid for wid, proc in self.workers.items() if proc.poll() is not None]
            if dead:
                raise AmphibiaError(f"worker {dead[0]} exited: {self.worker_log(dead[0])[-2000:]}")
            if time.monotonic() > deadline:
                raise AmphibiaError(f"{count} worker(s) did not join {self.url} within {timeout_s:g} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the workers and the gateway (also done when the kernel exits)."""
        if getattr(self, "stopped", True):
            return
        self.stopped = True
        broker_log = logging.getLogger("amphibia.broker")
        level = broker_log.level
        broker_log.setLevel(logging.ERROR)  # "worker left" is news only when nobody asked it to
        try:
            for worker_id in list(self.workers):
                self.stop_worker(worker_id)
            self._served.stop()
        finally:
            broker_log.setLevel(level)
        if self in self.session.gateways:
            self.session.gateways.remove(self)
        if self.session.gateway is self:
            self.session.gateway = None


_pages: dict[tuple[str, str], str] = {}


def page_url(gateway: BackgroundGateway | str, name: str) -> str:
    """The URL of app `name`'s browser page on `gateway` (the one place that knows it)."""
    base = gateway.url if isinstance(gateway, BackgroundGateway) else str(gateway).rstrip("/")
    key = (base, name)
    if key not in _pages:
        url = base + PAGE.format(name=name)
        try:
            served = httpx.get(url, timeout=10).status_code == 200
        except httpx.HTTPError:
            served = False
        _pages[key] = url if served else base + FALLBACK_PAGE.format(name=name)
    return _pages[key]


def serve(session: Session, *apps: NotebookApp) -> BackgroundGateway:
    """The session's background gateway (started on first use, with one worker), serving `apps` too."""
    gateway = session.gateway
    if not isinstance(gateway, BackgroundGateway) or gateway.stopped:
        gateway = session.gateway = BackgroundGateway(session, apps, workers=["notebook"], slots=2)
    for app in apps:
        served = gateway.gateway.apps.get(app.name)
        if served is None or served.manifest.get("wasm_sha256") != app.build.sha256:
            gateway.add(app)
    return gateway


def show(session: Session, app: NotebookApp, height: int = 480) -> Any:
    """The app's browser UI, embedded in the output cell (an IFrame served by the background gateway)."""
    from IPython.display import IFrame

    gateway = serve(session, app)
    return IFrame(page_url(gateway, app.name), width="100%", height=height)
