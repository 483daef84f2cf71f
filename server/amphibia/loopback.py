"""A gateway served on loopback from inside another program: the tests, the benchmarks and the
notebooks each run one in a thread beside their own work."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from .errors import AmphibiaError
from .inference.pool.wire import MAX_FRAME_BYTES


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ThreadedServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_in_thread(asgi: Any, port: int | None = None, host: str = "127.0.0.1",
                    start_timeout_s: float = 600.0, wait_for_apps: bool = True) -> ThreadedServer:
    """Serve `asgi` with uvicorn in a daemon thread; returns once it accepts connections and, for a
    gateway (unless not `wait_for_apps`), its apps are built. The first start may build every app."""
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning", access_log=False,
                                           ws_max_size=MAX_FRAME_BYTES))
    thread = threading.Thread(target=server.run, name=f"amphibia-gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    # A gateway answers at once and builds its apps in the background: wait for those too.
    gateway = getattr(getattr(asgi, "state", None), "gateway", None) if wait_for_apps else None
    # (and until apps served by an older build meanwhile have their new one: a test must not reach old code)
    while not server.started or (gateway is not None and (gateway.building or gateway.updating)):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AmphibiaError(f"the gateway on {host}:{port} did not start")
        time.sleep(0.05)
    return ThreadedServer(server, thread, f"http://{host}:{port}")
