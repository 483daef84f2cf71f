"""The kernel's one session: a Runtime, the inference service and engine behind it, the apps loaded,
the gateways started.

A notebook experiments in one process for hours; everything expensive (the model, the wasmtime
engine, compiled components) is made once here and reused by every cell. This module knows nothing
of apps or gateways beyond the `Stoppable` they are to it, so they can import it and not the reverse.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Protocol

from ..config import Config, ServerConfig, default_models
from ..inference.engine import Engine
from ..inference.inprocess import InProcessEngine
from ..inference.service import InferenceService
from ..sandbox.llm_host import LlmHost
from ..sandbox.runtime import Runtime
from .engines import EngineSwitch


class Stoppable(Protocol):
    """What the session needs of a gateway a notebook started: to stop it when the kernel ends."""

    stopped: bool

    def stop(self) -> None: ...


def default_config() -> Config:
    """No amphibia.toml is needed: the built-in model, and compiled components cached across kernels
    (in $AMPHIBIA_CACHE_DIR, else ~/.cache/amphibia) so a restarted kernel loads an app in ms."""
    cache = os.environ.get("AMPHIBIA_CACHE_DIR")
    cache_dir = Path(cache) if cache else Path.home() / ".cache" / "amphibia"
    server = replace(ServerConfig(), cache_dir=cache_dir, guest_threads=4, queue_limit=32)
    return Config(server=server, models=default_models(), root=Path.cwd())


class GuestOutput(logging.Handler):
    """Collects what a guest prints during one notebook request (the runtime logs it line by line),
    so the cell that made the request can show it, as a normal Python call would."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lines: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) != 2 or not isinstance(args[0], str):
            return
        # The runtime's prefix: "app=NAME request=ID stream:"
        fields = dict(part.split("=", 1) for part in args[0].split()[:2] if "=" in part)
        lines = self._lines.get(fields.get("request", ""))
        if lines is not None:
            stream = args[0].rsplit(" ", 1)[-1].rstrip(":")
            lines.append(f"[{stream}] {args[1]}")

    @contextlib.contextmanager
    def capture(self, request_id: str) -> Iterator[list[str]]:
        lines: list[str] = []
        self._lines[request_id] = lines
        try:
            yield lines
        finally:
            self._lines.pop(request_id, None)

    def install(self) -> None:
        guest = logging.getLogger("amphibia.guest")
        if self not in guest.handlers:
            guest.addHandler(self)
        if guest.level == logging.NOTSET:  # the runtime logs guest output at INFO
            guest.setLevel(logging.INFO)


class Session:
    """Everything a kernel shares. `engine`: an engine to use instead of loading the model (tests).

    `engine` is the switch the kernel's `llm` calls go through (the in-process model or a remote
    pool, see `connect`); `service` is the inference service over it that the Runtime's guests use.
    """

    def __init__(self, config: Config | None = None, engine: Engine | None = None) -> None:
        self.config = config or default_config()
        self.engine = EngineSwitch(lambda: InProcessEngine(self.config.models), local=engine)
        self.service = InferenceService(self.engine)
        self.runtime = Runtime([LlmHost(self.service)], self.config.server.cache_dir,
                               self.config.server.guest_slots, self.config.server.queue_limit)
        self.apps: dict[str, Any] = {}  # name -> the NotebookApp loaded under it (`apps.load`)
        self.gateways: list[Stoppable] = []  # every BackgroundGateway started, stopped with the session
        self.gateway: Stoppable | None = None  # the BackgroundGateway `serve` and `show` use
        self.output = GuestOutput()
        self.output.install()
        self.closed = False

    def close(self) -> None:
        """Stop every gateway and worker this session started, and free the model."""
        if self.closed:
            return
        self.closed = True
        for gateway in list(self.gateways):
            gateway.stop()
        logging.getLogger("amphibia.guest").removeHandler(self.output)
        self.engine.close()
        self.runtime.close()


_session: Session | None = None
_session_lock = threading.Lock()


def session() -> Session:
    """The kernel's session, made on first use and closed when the kernel exits."""
    global _session
    with _session_lock:
        if _session is None or _session.closed:
            _session = Session()
            atexit.register(_session.close)
        return _session


def use_session(new: Session | None) -> Session | None:
    """Make `new` the kernel's session (tests hand in one that shares their engine); returns the old one."""
    global _session
    with _session_lock:
        old, _session = _session, new
        return old
