"""Shared fixtures: real components (built once, cached by source hash), the real model, a real server."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from amphibia.config import Config, ServerConfig, default_models, discover_apps
from amphibia.local_engine import LocalEngine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEST_APPS = Path(__file__).resolve().parent / "apps"
CACHE = ROOT / ".amphibia" / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engine(config: Config) -> Iterator[LocalEngine]:
    eng = LocalEngine(config.models)
    eng.warm("smollm2")
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def config() -> Config:
    apps = {**discover_apps(EXAMPLES), **discover_apps(TEST_APPS)}
    server = replace(ServerConfig(), cache_dir=CACHE, guest_threads=6, queue_limit=16)
    models = default_models()
    # A second registered model that no test app is allowed to use.
    models["other"] = replace(models["smollm2"], name="other")
    return Config(server=server, models=models, apps=apps, root=ROOT)


@pytest.fixture(scope="session")
def server(config: Config, engine: LocalEngine) -> Iterator[str]:
    """The real gateway on a real loopback port, with the session's engine."""
    from amphibia.gateway import create_app

    port = free_port()
    app = create_app(config, engine=engine)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 600  # first run builds every app (~15 s each)
    while not srv.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture()
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client
