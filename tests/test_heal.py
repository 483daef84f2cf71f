"""Nothing a client sends (and no single failure) takes the gateway down: a killed local worker comes
back, /healthz says what is missing meanwhile, a bad Host header is refused, a broken app leaves
the others served. Real gateway, real worker process, real components."""
from __future__ import annotations

import os
import re
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from conftest import CACHE, EXAMPLES, ROOT, Pool

from amphibia.build import source_hash
from amphibia.config import AppSpec, Config, PoolConfig, ServerConfig, default_models, discover_apps
from amphibia.http.app import create_app
from amphibia.http.hosts import TrustedHosts, host_name
from amphibia.loopback import free_port, serve_in_thread

WORKER = "local-smollm2"


@pytest.fixture(scope="module")
def healing() -> Iterator[Pool]:
    """`amphibia up` as the CLI sets it up: a pool gateway that starts its own local worker."""
    models = default_models()
    models["smollm2"] = replace(models["smollm2"], threads=1)  # this machine has 2 cores
    config = Config(server=replace(ServerConfig(), cache_dir=CACHE), models=models,
                    apps=discover_apps(EXAMPLES / "tokens"),
                    pool=PoolConfig(token="heal-token", local_worker=True, local_slots=2), root=ROOT)
    port = free_port()
    asgi = create_app(config, local_worker_port=port)
    served = serve_in_thread(asgi, port)
    pool = Pool(served.url, port, asgi)
    try:
        pool.wait_for(lambda s: WORKER in {w["id"] for w in s["workers"]}, "the local worker")
        yield pool
    finally:
        served.stop()
    # Stopped cleanly: the worker is gone and nothing started another one.
    supervisor = asgi.state.local_workers[0]
    last = supervisor.proc
    assert last is not None and last.poll() is not None
    time.sleep(1)
    assert supervisor.proc is last


def health(pool: Pool) -> dict:
    return httpx.get(f"{pool.url}/healthz", timeout=10).json()


def restarts(pool: Pool) -> float:
    text = httpx.get(f"{pool.url}/metrics", timeout=10).text
    match = re.search(r'^amphibia_worker_restarts_total\{worker="local-smollm2"\} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def test_a_killed_local_worker_comes_back(healing: Pool) -> None:
    assert health(healing)["status"] == "ok" and health(healing)["reasons"] == []
    assert restarts(healing) == 0
    supervisor = healing.app.state.local_workers[0]
    first = supervisor.proc
    os.kill(first.pid, signal.SIGKILL)

    deadline = time.monotonic() + 10
    while (seen := health(healing))["status"] != "degraded":  # the worker's socket closes at once
        assert time.monotonic() < deadline, f"never degraded: {seen}"
        time.sleep(0.05)
    assert any("smollm2" in reason for reason in seen["reasons"]), seen
    assert seen["workers"] == 0 and seen["apps"] == ["tokens"]

    healing.wait_for(lambda s: WORKER in {w["id"] for w in s["workers"]}, "the restarted worker", timeout=60)
    assert supervisor.proc.pid != first.pid and first.poll() is not None
    after = health(healing)
    assert after["status"] == "ok" and after["reasons"] == [] and after["workers"] == 1, after
    assert restarts(healing) >= 1
    # And it serves again: the app's LLM calls reach the new process.
    res = httpx.post(f"{healing.url}/apps/tokens/", content="Hello world", timeout=60)
    assert res.status_code == 200 and res.json()["count"] == 2, res.text


def test_a_bad_host_is_refused(healing: Pool) -> None:
    for good in (f"127.0.0.1:{healing.port}", f"localhost:{healing.port}", "LOCALHOST", f"[::1]:{healing.port}"):
        assert httpx.get(f"{healing.url}/healthz", headers={"host": good}).status_code == 200, good
    res = httpx.get(f"{healing.url}/healthz", headers={"host": f"rebind.example:{healing.port}"})
    assert res.status_code == 400
    assert res.json()["error"]["type"] == "bad_host" and "rebind.example" in res.json()["error"]["message"]
    assert httpx.get(f"{healing.url}/apps/tokens/", headers={"host": "rebind.example"}).status_code == 400
    # WebSockets too: the upgrade is answered 400, never 101.
    assert _upgrade(healing.port, "rebind.example").startswith("HTTP/1.1 400")
    assert _upgrade(healing.port, f"127.0.0.1:{healing.port}").startswith("HTTP/1.1 101")


def _upgrade(port: int, host: str) -> str:
    """The status line a WebSocket upgrade of /pool with this Host header gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((f"GET /pool HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        return sock.recv(4096).decode(errors="replace").split("\r\n")[0]


def test_trusted_host_rules() -> None:
    assert host_name("Example.COM:8000") == "example.com" and host_name("[::1]:80") == "::1"
    assert host_name("example.com.") == "example.com" and host_name("::1") == "::1"
    rules = TrustedHosts(lambda *a: None, ("localhost", "*.example.com", "[::1]"))
    assert rules.allows("localhost") and rules.allows("api.example.com") and rules.allows("::1")
    assert not rules.allows("example.com.evil") and not rules.allows("evilexample.com")
    assert rules.allows("10.0.0.5", local_address="10.0.0.5")  # the address the connection came in on
    assert TrustedHosts(lambda *a: None, ("*",)).allows("anything.at.all")


def test_one_broken_app_leaves_the_others_served(tmp_path: Path, engine) -> None:
    """The broken app fails with an OSError (where its build would go is a file), not an
    AmphibiaError; and the compile cache cannot be written (its folder is under a file: a full disk
    looks the same), so the good app is served from a component compiled in memory."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "app.py").write_text((EXAMPLES / "tokens" / "app.py").read_text() + "\n# broken\n")
    store = tmp_path / "builds"
    store.mkdir()
    (store / source_hash(broken)[:32]).write_text("not a folder")  # where its build would go
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    server = replace(ServerConfig(), build_dir=store, cache_dir=tmp_path / "blocker" / "cache")
    config = Config(models=default_models(), root=tmp_path, server=server,
                    apps={"broken": AppSpec(name="broken", path=broken), **discover_apps(EXAMPLES / "tokens")})
    asgi = create_app(config, engine=engine, warm_model=False)
    served = serve_in_thread(asgi)
    try:
        health = httpx.get(f"{served.url}/healthz").json()
        assert health["apps"] == ["tokens"] and health["failed"] == ["broken"] and health["status"] == "degraded"
        why = asgi.state.gateway.failed["broken"]
        assert "FileExistsError" in why or "NotADirectoryError" in why
        res = httpx.post(f"{served.url}/apps/tokens/", content=b"Hello world", timeout=60)
        assert res.status_code == 200 and res.json()["count"] == 2
        res = httpx.get(f"{served.url}/apps/broken/")
        assert res.status_code == 404 and "failed to build" in res.json()["error"]["message"]
    finally:
        served.stop()


def test_apps_with_the_same_sources_share_one_build(tmp_path: Path, engine) -> None:
    """Three apps with one app.py (and app.toml files of their own) cost one build, one compiled
    component and one copy on disk; the gateway builds them in the background and serves each."""
    source = (EXAMPLES / "tokens" / "app.py").read_text() + "\n# shared by three apps\n"
    apps = {}
    for name in ("one", "two", "three"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "app.py").write_text(source)
        (folder / "app.toml").write_text(f'description = "tenant {name}"\n')
        apps[name] = AppSpec(name=name, path=folder, description=f"tenant {name}")
    store = tmp_path / "builds"
    config = Config(models=default_models(), root=tmp_path, apps=apps,
                    server=replace(ServerConfig(), cache_dir=CACHE, build_dir=store))
    asgi = create_app(config, engine=engine, warm_model=False)
    served = serve_in_thread(asgi)
    try:
        answers = [httpx.post(f"{served.url}/apps/{name}/", content=b"Hello world", timeout=60) for name in apps]
        assert all(res.status_code == 200 and res.json()["count"] == 2 for res in answers)
        assert len([d for d in store.iterdir() if d.name != "served"]) == 1  # one build in the store
        assert not any((tmp_path / name / ".amphibia").exists() for name in apps)
        loaded = [asgi.state.gateway.apps[name] for name in apps]
        assert len({a.build_dir for a in loaded}) == 1 and asgi.state.gateway.runtime.cache.count() == 1
    finally:
        served.stop()
