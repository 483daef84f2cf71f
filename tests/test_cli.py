"""The `amphibia` command as a user runs it: new -> build -> up (a real server process) -> curl."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import EXAMPLES, free_port

AMPHIBIA = [sys.executable, "-m", "amphibia.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*AMPHIBIA, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_models_lists_the_embedded_default() -> None:
    out = run("models", "--json")
    assert out.returncode == 0, out.stderr
    models = {m["name"]: m for m in json.loads(out.stdout)}
    assert models["smollm2"]["available"] and models["smollm2"]["path"].endswith(".gguf")
    assert models["smollm2"]["purpose"] == "generation" and models["minilm"]["purpose"] == "embeddings"
    assert models["minilm"]["available"] and models["minilm"]["path"].endswith(".gguf")  # converted, cached


def test_new_build_up_and_call(tmp_path: Path) -> None:
    out = run("new", "haiku", "--dir", str(tmp_path), "--description", "Haiku on demand")
    assert out.returncode == 0, out.stderr
    assert run("new", "haiku", "--dir", str(tmp_path)).returncode == 1  # refuses to overwrite
    app_dir = tmp_path / "haiku"

    out = run("build", str(app_dir))
    assert out.returncode == 0 and "built" in out.stdout, out.stderr
    out = run("build", str(app_dir))
    assert "up to date" in out.stdout
    assert json.loads((app_dir / ".amphibia" / "manifest.json").read_text())["name"] == "haiku"

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*AMPHIBIA, "up", str(app_dir), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:  # the gateway answers at once; its apps build (here: load) in the background
                health = httpx.get(f"{base}/healthz", timeout=2)
                if health.status_code == 200 and not health.json()["building"]:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        res = httpx.post(f"{base}/apps/haiku/", content="rain", timeout=120)
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["text"].strip() and 0 < body["tokens"] <= 48
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert "haiku" in output and proc.returncode == 0, output


def test_up_serves_at_once_and_stops_at_once_mid_build(tmp_path: Path) -> None:
    """`amphibia up` listens before its apps are built: a building app answers 503 with Retry-After,
    health lists it, and SIGTERM stops the gateway within seconds, mid-build."""
    app_dir = tmp_path / "fresh"
    app_dir.mkdir()
    (app_dir / "app.py").write_text("from amphibia_guest import App, Response\napp = App()\n\n"
                                    "@app.get('/')\ndef hello(req):\n    return Response.json({'hi': 1})\n")
    port = free_port()
    proc = subprocess.Popen([*AMPHIBIA, "up", str(app_dir), "--port", str(port), "--no-local-worker"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                health = httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "server did not come up"
                time.sleep(0.1)
        assert health.json()["building"] == ["fresh"] and "app 'fresh' is still building" in health.json()["reasons"]
        res = httpx.get(f"{base}/apps/fresh/", timeout=10)
        assert res.status_code == 503 and res.json()["error"]["type"] == "building" and res.headers["retry-after"]
        assert httpx.get(f"{base}/api/apps").json()["building"] == {"fresh": "building"}
        stopped = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert time.time() - stopped < 3, f"took {time.time() - stopped:.1f} s to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_dev_serves_the_dev_page_and_pyodide(tmp_path: Path) -> None:
    """`amphibia dev APP` is `up --watch` with the dev page: it prints the page's address and serves the
    page, the app's source bundle and Pyodide itself (from the pinned npm package) at once."""
    app_dir = tmp_path / "fresh"
    app_dir.mkdir()
    (app_dir / "app.py").write_text("from amphibia_guest import App\napp = App()\n")
    port = free_port()
    proc = subprocess.Popen([*AMPHIBIA, "dev", str(app_dir), "--port", str(port), "--no-local-worker"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                page = httpx.get(f"{base}/dev/apps/fresh/", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "server did not come up"
                time.sleep(0.1)
        assert page.status_code == 200 and 'id="editor"' in page.text
        assert page.headers["cross-origin-opener-policy"] == "same-origin"  # the Atomics path needs isolation
        bundle = httpx.get(f"{base}/dev/apps/fresh/bundle", timeout=30).json()
        assert bundle["files"] == {"app.py": "from amphibia_guest import App\napp = App()\n"}
        assert "amphibia_guest/dev_entry.py" in bundle["sdk"] and "wit_world/imports/llm.py" in bundle["bindings"]
        mjs = httpx.get(f"{base}/amphibia/pyodide/pyodide.mjs", timeout=10)
        assert mjs.status_code == 200 and mjs.headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{base}/dev/", timeout=10, follow_redirects=False).headers["location"] == "/dev/apps/fresh/"
        while httpx.get(f"{base}/healthz", timeout=10).json()["building"]:  # the index lists built apps
            assert time.time() < deadline + 120, "the app was not built"
            time.sleep(0.2)
        assert 'href="/dev/apps/fresh/"' in httpx.get(f"{base}/", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert f"dev page: http://127.0.0.1:{port}/dev/apps/fresh/" in output


def test_build_error_is_reported_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("from amphibia_guest import App\napp = App(\n")
    out = run("build", str(tmp_path))
    assert out.returncode == 1 and f"{tmp_path / 'app.py'}:2" in out.stderr and "SyntaxError" in out.stderr


def test_bench_cold_start_prints_json_last(tmp_path: Path) -> None:
    out = run("bench", "cold-start", "--json", "-n", "30")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("instantiate_p50_ms", "instantiate_p99_ms", "cached_load_ms", "compile_s", "baseline_p50_ms", "speedup"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key


def test_bench_pool_quick_prints_the_promised_keys() -> None:
    """Runs the servers for real (Amphibia and llama_cpp.server; llama-server too where `make
    llama-server` built it), shortened."""
    out = run("bench", "pool", "--quick", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["throughput"]["ratio"] > 0 and result["throughput"]["amphibia_tok_s"] > 0
    assert result["throughput"]["peer_tok_s"] > 0
    assert result["noisy_neighbour"]["amphibia_ratio"] > 0 and result["noisy_neighbour"]["peer_ratio"] > 0
    assert 0 < result["fairness"]["jain"] <= 1 and isinstance(result["overhead_pct"], (int, float))
    assert result["ttft_solo"]["amphibia_ms"] > 0 and result["noisy_neighbour"]["step_ms"] > 0
    hops = result["ttft_solo"]["timeline_ms"]
    assert {"queue", "admission", "prefill", "http_and_sse"} <= hops.keys() and hops["prefill"] > 0
    assert result["texts_identical"]["llama_cpp.server"] is True  # pinned greedy: the same text
    assert result["constrained"]["valid_rate"] == 1.0 and result["constrained"]["ratio"] > 0
    assert result["stream_ttfb_ms"] > 0 and result["stream"]["api_ttft_ms"] > 0


def test_bench_chaos_quick_accounts_for_every_request() -> None:
    """Three supervised workers, SIGKILLs, dropped clients and bad inputs under load, shortened: every
    request completes or fails clearly, and the pool ends with no slot held."""
    out = run("bench", "chaos", "--quick", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["worker_kills"] >= 2 and result["completed"] > 50, result
    assert result["lost"] == result["hung"] == result["slots_leaked"] == 0, result
    assert result["requests"] == (result["completed"] + result["failed_clear"] + result["dropped"]
                                  + result["lost"] + result["hung"])


def test_access_log_keeps_bridge_tokens_out() -> None:
    import logging

    from amphibia.cli import RedactTokens

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/bridge?token=eyJhcHAi.c2ln&x=1", "1.1", 101), None)
    assert RedactTokens().filter(record)
    assert "eyJhcHAi" not in record.getMessage() and "token=[redacted]&x=1" in record.getMessage()


def test_build_many_apps_shows_a_summary_and_a_failure_stops_no_other(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "app.py").write_text("from amphibia_guest import App\napp = App(\n")
    config = tmp_path / "amphibia.toml"
    config.write_text(f'[server]\nbuild_dir = "{tmp_path / "builds"}"\n'
                      f'[apps.tokens]\npath = "{EXAMPLES / "tokens"}"\n[apps.broken]\npath = "{broken}"\n')
    out = run("build", str(config))
    assert out.returncode == 1, out.stderr
    # tokens is up to date where another test built it already, else built into the store now
    assert re.search(r"2 app\(s\): (0 built, 1 up to date|1 built, 0 up to date), 1 failed", out.stderr), out.stderr
    assert "SyntaxError" in out.stderr and out.stdout.count("app.wasm") == 1, out.stdout
