"""The kernel's one session: a Runtime, the engine behind it, the apps loaded, the gateways started.

A notebook experiments in one process for hours; everything expensive (the model, the wasmtime
engine, compiled components) is made once here and reused by every cell.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..config import Config, ServerConfig, default_models
from ..engine import Engine
from ..host.llm import LlmHost
from ..local_engine import LocalEngine
from ..runtime import Runtime
from .engines import EngineSwitch

if TYPE_CHECKING:
    from .apps import NotebookApp
    from .server import BackgroundGateway


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
    """Everything a kernel shares. `engine`: an engine to use instead of loading the model (tests)."""

    def __init__(self, config: Config | None = None, engine: Engine | None = None) -> None:
        self.config = config or default_config()
        self.engine = EngineSwitch(lambda: LocalEngine(self.config.models), local=engine)
        self.runtime = Runtime([LlmHost(self.engine)], self.config.server.cache_dir,
                               self.config.server.guest_threads, self.config.server.queue_limit)
        self.apps: dict[str, NotebookApp] = {}
        self.gateways: list[BackgroundGateway] = []
        self.gateway: BackgroundGateway | None = None  # the one `serve` and `show` use
        self.output = GuestOutput()
        self.output.install()
        self._lock = threading.Lock()
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
