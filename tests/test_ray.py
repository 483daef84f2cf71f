"""Workers placed, restarted and scaled on a real local Ray cluster (started here, `num_cpus` pinned
for this 2-core machine; nothing of Ray is mocked), and the autoscaling rules on their own."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from conftest import CACHE, ROOT

from amphibia.config import Config, ModelSpec, PoolConfig, RayConfig, ServerConfig, default_models
from amphibia.inference.pool.autoscale import Autoscaler
from amphibia.loopback import free_port, serve_in_thread
from amphibia.sandbox.signals import kept_signal_handlers

ray = pytest.importorskip("ray")
TOKEN = "ray-test-token"
CHAT = {"model": "smollm2", "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": "Name three rivers of Europe."}]}


# --- the rules, without a cluster ------------------------------------------------------------------------
def test_autoscaler_rules() -> None:
    cfg = RayConfig(min_workers=1, max_workers=3, scale_up_wait_s=1.0, window_s=10, idle_s=5, cooldown_s=4)
    a = Autoscaler(cfg)
    assert a.decide(0, 0, 0, [], False).direction == "up"  # below min_workers
    assert a.decide(0, 0, 1, [0.2, 0.3], True) is None  # short waits: enough workers
    up = a.decide(1, 1, 1, [2.5, 3.0], True)
    assert up is not None and up.direction == "up" and "p90" in up.reason
    assert a.decide(2, 2, 2, [4.0], True) is None  # cooling down: the new worker is still loading
    for t in range(3, 6):
        a.observe_wait(t, 3.0)  # requests that waited, now in the window
    assert a.decide(6, 6, 2, [], True).direction == "up"
    assert a.decide(11, 11, 3, [9.0], True) is None  # at max_workers
    assert a.decide(14, 14, 3, [], False) is None  # busy until t=11: not idle long enough yet
    a.observe_wait(25, 9.0)  # a burst just before the scale-down ...
    down = a.decide(30, 30, 3, [], False)
    assert down is not None and down.direction == "down"
    assert a.decide(30.5, 30.5, 2, [], False) is None  # ... does not undo it
    assert a.decide(31, 31, 2, [], False) is None  # one at a time: another idle period first
    assert a.decide(36, 36, 2, [], False).direction == "down"
    assert a.decide(50, 50, 1, [], False) is None  # never below min_workers
    assert a.decide(50, 50, 5, [], False).direction == "down"  # above max_workers (config lowered)


def test_the_cluster_example_config_loads_and_up_takes_ray(tmp_path: Path) -> None:
    from amphibia.cli import parser
    from amphibia.config import load_config

    (tmp_path / "apps").mkdir()
    (tmp_path / "amphibia.toml").write_text((ROOT / "deploy" / "ray" / "amphibia.toml").read_text())
    ray_config = load_config(str(tmp_path / "amphibia.toml")).pool.ray
    assert ray_config.enabled and ray_config.num_gpus == 1 and ray_config.resources == {"llm": 1.0}
    assert parser().parse_args(["up", "--ray"]).ray == ""  # the address from [pool.ray]
    assert parser().parse_args(["up", "--ray", "ray://head:10001"]).ray == "ray://head:10001"
    assert parser().parse_args(["up"]).ray is None


# --- a real cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    # "auto": the cluster `ray start` runs on this machine (also how the driver finds its auth token;
    # an explicit HOST:PORT needs RAY_AUTH_MODE=token set as well, see README "Scaling out").
    yield "auto"
    with kept_signal_handlers():  # ray.shutdown resets them: later guest traps in this process would crash it
        ray.shutdown()
    subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)


def gateway(cluster: str, models: dict[str, ModelSpec], ray_config: RayConfig):
    from amphibia.http.app import create_app

    port = free_port()
    config = Config(server=replace(ServerConfig(), port=port, cache_dir=CACHE), models=models, apps={},
                    pool=PoolConfig(token=TOKEN, ray=replace(ray_config, enabled=True, address=cluster)), root=ROOT)
    asgi = create_app(config)
    return asgi, serve_in_thread(asgi, port)


def wait_for(url: str, condition, what: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = httpx.get(f"{url}/pool", timeout=10).json()
        if condition(status):
            return status
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {httpx.get(f'{url}/pool', timeout=10).json()}")


def joined(status: dict) -> list[str]:
    return [w["id"] for w in status["ray"]["workers"] if w["state"] == "joined"]


def chat(url: str, body: dict = CHAT) -> str:
    res = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert res.status_code == 200, res.text
    return res.json()["choices"][0]["message"]["content"]


def test_workers_are_placed_scaled_replaced_and_scaled_down(cluster: str) -> None:
    cfg = RayConfig(min_workers=1, max_workers=2, slots=2, num_cpus=1, scale_up_wait_s=0.5, window_s=10,
                    idle_s=4, cooldown_s=5, max_restarts=2)
    asgi, served = gateway(cluster, default_models(), cfg)
    url = served.url
    try:
        # min_workers placed: an actor on the cluster that dialled /pool with the token.
        status = wait_for(url, lambda s: len(joined(s)) == 1, "the first worker to join")
        first = joined(status)[0]
        assert first in {w["id"] for w in status["workers"]}
        alone = chat(url)

        # A load that queues (8 requests, 2 slots) makes it scale up, and says why.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: chat(url, {**CHAT, "max_tokens": 48}), range(8)))
            status = wait_for(url, lambda s: len(joined(s)) == 2, "a second worker")
        assert all(answers)
        up = [d for d in status["ray"]["decisions"] if d["direction"] == "up" and "p90" in d["reason"]]
        assert up, status["ray"]["decisions"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'amphibia_autoscale_decisions_total{direction="up"}' in metrics

        # Killing a worker's actor mid-answer: Ray restarts it, the broker re-places what it held,
        # and the answer is the same greedy text as undisturbed.
        ray_workers = asgi.state.ray_workers
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, url)
            running = wait_for(url, lambda s: any(w["running"] for w in s["workers"]), "the request to start")
            victim = next(w["id"] for w in running["workers"] if w["running"])
            ray.kill(ray_workers.placed[victim].actor, no_restart=False)
            assert pending.result(timeout=300) == alone
        wait_for(url, lambda s: victim in {w["id"] for w in s["workers"]} and len(joined(s)) == 2,
                 "the killed worker to be restarted and rejoin")

        # An embed request places the embedding model's worker on demand (one, never scaled).
        emb = httpx.post(f"{url}/v1/embeddings", json={"input": ["frogs", "toads"]}, timeout=120)
        assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 384, emb.text
        assert "ray-minilm" in {w["id"] for w in httpx.get(f"{url}/pool", timeout=10).json()["ray"]["workers"]}

        # Idle: back down to min_workers, one at a time (the embedding worker stays).
        status = wait_for(url, lambda s: len([w for w in s["ray"]["workers"] if w["id"] != "ray-minilm"]) == 1,
                          "a scale-down to min_workers", timeout=60)
        assert any(d["direction"] == "down" and "idle" in d["reason"] for d in status["ray"]["decisions"])
        assert chat(url) == alone  # the one left still answers
    finally:
        served.stop()


def test_a_worker_that_cannot_start_is_reported_not_retried_forever(cluster: str) -> None:
    models = {**default_models(), "missing": ModelSpec(name="missing", path=Path("/nonexistent/model.gguf"))}
    cfg = RayConfig(model="missing", min_workers=1, max_workers=2, slots=1, num_cpus=0.5, max_failures=2)
    _, served = gateway(cluster, models, cfg)
    try:
        status = wait_for(served.url, lambda s: "error" in s["ray"], "placing to stop", timeout=90)
        assert len(status["ray"]["failed"]) == 2
        assert all("no GGUF file" in f["error"] for f in status["ray"]["failed"]), status["ray"]["failed"]
        time.sleep(3)  # several placing ticks later: nothing new was tried
        again = httpx.get(f"{served.url}/pool", timeout=10).json()["ray"]
        assert len(again["failed"]) == 2 and not again["workers"]
    finally:
        served.stop()


def test_a_guest_trap_after_ray_init_still_ends_only_its_request(cluster: str) -> None:
    """ray.init turns on faulthandler, whose signal handlers would take wasmtime's traps for crashes
    and kill the gateway; placing workers must leave wasmtime's in place."""
    import tempfile

    from amphibia.build import build
    from amphibia.config import load_app
    from amphibia.errors import GuestError
    from amphibia.inference.pool.broker import Broker
    from amphibia.inference.pool.ray_workers import RayWorkers
    from amphibia.bench.echo_engine import EchoEngine
    from amphibia.inference.service import InferenceService
    from amphibia.sandbox.llm_host import LlmHost
    from amphibia.sandbox.runtime import HttpRequest, Runtime

    RayWorkers(RayConfig(address=cluster), default_models()["smollm2"], "ws://127.0.0.1:1/pool", TOKEN,
               Broker(PoolConfig()))._connect()
    misbehave = ROOT / "tests" / "apps" / "misbehave"
    app, built = load_app(misbehave), build(misbehave)
    runtime = Runtime([LlmHost(InferenceService(EchoEngine()))], Path(tempfile.mkdtemp()), guest_threads=1)
    try:
        component = runtime.load(built.wasm, built.sha256)
        for path in ("/trap", "/loop"):
            with pytest.raises(GuestError):
                runtime.handle(app, component, HttpRequest("GET", path), "after-ray")
        assert runtime.handle(app, component, HttpRequest("GET", "/ok"), "after-ray").body == b"ok"
    finally:
        runtime.close()
