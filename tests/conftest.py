"""Shared fixtures: real components (built once, cached by source hash), the real model, a real server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from amphibia.config import Config, Limits, PoolConfig, ServerConfig, default_models, discover_apps
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
    models["other"] = replace(models["smollm2"], name="other", browser=False)  # never sent to pages
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


# --- a gateway with a pool of real worker processes (tests of the pool, the bridge, the browser) ----------
TOKEN = "test-pool-token"
KEYS = {"key-chat": "chat", "key-tokens": "tokens", "key-misbehave": "misbehave", "key-limited": "limited"}
FRANCE = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
          {"role": "user", "content": "What is the capital of France? Answer in two sentences."}]


class Pool:
    def __init__(self, url: str, port: int, app=None) -> None:
        self.url, self.port, self.app = url, port, app
        self.third_party_url = ""
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, worker_id: str, slots: int = 2) -> None:
        cmd = [sys.executable, "-m", "amphibia.cli", "worker", "--gateway", f"ws://127.0.0.1:{self.port}/pool",
               "--slots", str(slots), "--worker-id", worker_id,
               # Two workers on this 2-core machine: one thread each. Two threads each would make
               # four spinning OpenMP threads fight over two cores and slow every decode many times.
               "--threads", str(max(1, (os.cpu_count() or 2) // 2))]
        self.workers[worker_id] = subprocess.Popen(cmd, env={**os.environ, "AMPHIBIA_POOL_TOKEN": TOKEN})

    def status(self) -> dict:
        return httpx.get(f"{self.url}/pool", timeout=10).json()

    def wait_for(self, condition, what: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status()
            if condition(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {self.status()}")

    def worker_ids(self) -> set[str]:
        return {w["id"] for w in self.status()["workers"]}


@pytest.fixture(scope="session")
def pool() -> Iterator[Pool]:
    from amphibia.gateway import create_app

    apps = {**discover_apps(EXAMPLES), **discover_apps(TEST_APPS)}
    apps["limited"] = replace(apps["misbehave"], name="limited", limits=Limits(max_concurrent=2, timeout_s=5))
    # A plain "third-party" web server on another origin, serving examples/embed.html.
    third_party_port = free_port()
    third_party = subprocess.Popen([sys.executable, "-m", "http.server", str(third_party_port), "--bind", "127.0.0.1",
                                    "--directory", str(EXAMPLES)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    third_party_url = f"http://127.0.0.1:{third_party_port}"
    server = replace(ServerConfig(), cache_dir=CACHE, allowed_origins=(third_party_url,))
    config = Config(server=server, models=default_models(), apps=apps,
                    pool=PoolConfig(token=TOKEN, quantum_tokens=16), api_keys=KEYS, root=ROOT)
    port = free_port()
    asgi = create_app(config)
    srv = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        assert thread.is_alive()
        time.sleep(0.1)
    p = Pool(f"http://127.0.0.1:{port}", port, asgi)
    p.third_party_url = third_party_url
    p.start_worker("wA")
    p.start_worker("wB")
    p.wait_for(lambda s: len(s["workers"]) == 2, "two workers")
    yield p
    for proc in p.workers.values():
        proc.terminate()
    for proc in p.workers.values():
        proc.wait(10)
    third_party.terminate()
    srv.should_exit = True
    thread.join(10)


