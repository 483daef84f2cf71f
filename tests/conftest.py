"""Shared fixtures: real components (built once, cached by source hash), the real model, a real server."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from amphibia.config import AppSpec, Config, Limits, PoolConfig, ServerConfig, default_models, discover_apps
from amphibia.inference.inprocess import InProcessEngine
from amphibia.inference.pool.spawn import spawn_worker
from amphibia.inference.service import InferenceService
from amphibia.loopback import free_port, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEST_APPS = Path(__file__).resolve().parent / "apps"
CACHE = ROOT / ".amphibia" / "cache"


@pytest.fixture(scope="session")
def engine(config: Config) -> Iterator[InProcessEngine]:
    eng = InProcessEngine(config.models)
    eng.warm("smollm2")
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def service(engine: InProcessEngine) -> InferenceService:
    return InferenceService(engine)


@pytest.fixture(scope="session")
def caller(config: Config) -> AppSpec:
    """An app that may use the default model (the open APIs' own app)."""
    return config.api_app("api")


@pytest.fixture(scope="session")
def config() -> Config:
    apps = {**discover_apps(EXAMPLES), **discover_apps(TEST_APPS)}
    server = replace(ServerConfig(), cache_dir=CACHE, guest_threads=6, queue_limit=16)
    models = default_models()
    # A second registered model that no test app is allowed to use.
    models["other"] = replace(models["smollm2"], name="other", browser=False)  # never sent to pages
    return Config(server=server, models=models, apps=apps, root=ROOT)


@pytest.fixture(scope="session")
def server(config: Config, engine: InProcessEngine) -> Iterator[str]:
    """The real gateway on a real loopback port, with the session's engine."""
    from amphibia.http.app import create_app

    served = serve_in_thread(create_app(config, engine=engine))  # the first run builds every app
    yield served.url
    served.stop()


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

    def start_worker(self, worker_id: str, slots: int = 2, model: str = "smollm2") -> None:
        # Two workers on this 2-core machine: one thread each. Two threads each would make
        # four spinning OpenMP threads fight over two cores and slow every decode many times.
        self.workers[worker_id] = spawn_worker(f"ws://127.0.0.1:{self.port}/pool", TOKEN, slots=slots, model=model,
                                               worker_id=worker_id, threads=max(1, (os.cpu_count() or 2) // 2))

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
    from amphibia.http.app import create_app

    apps = {**discover_apps(EXAMPLES), **discover_apps(TEST_APPS)}
    apps["limited"] = replace(apps["misbehave"], name="limited", limits=Limits(max_concurrent=2, timeout_s=5, wall_timeout_s=3),
                               bridge=False)  # pages may not use it
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
    served = serve_in_thread(asgi, port)
    p = Pool(served.url, port, asgi)
    p.third_party_url = third_party_url
    p.start_worker("wA")
    p.start_worker("wB")
    p.start_worker("wE", model="minilm")  # the default embedding model's (idle unless something embeds)
    p.wait_for(lambda s: len(s["workers"]) == 3, "three workers")
    yield p
    for proc in p.workers.values():
        proc.terminate()
    for proc in p.workers.values():
        proc.wait(10)
    third_party.terminate()
    served.stop()


