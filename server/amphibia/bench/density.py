"""`amphibia bench density`: many apps on one gateway.

Real `amphibia up` processes (no worker: the apps answer without the model) over apps generated from
one template, in a fresh store:
- distinct apps (a constant varies, so each is its own component) from empty caches: the time to
  the first answer, the parallel build time per app, the disk per app, the RSS per loaded component;
- the same apps with `max_loaded_apps` far below their count, asked round robin, so every request
  finds its component unloaded: the latency of such a request;
- identical apps from empty caches: how many builds they cost;
- one component under 1,000 names with warm caches: start to first answer, the index, the app list;
- 64 requests to the chat example at once through a gateway whose engine holds every answer until
  all are in flight (a stand-in for 64 free pool slots): how many guests wait in `llm` at once.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from ..loopback import free_port
from ..store import entries
from .chaos import pct, rss_mb

TEMPLATE = '''"""A generated app for `amphibia bench density`."""
from amphibia_guest import App, Request, Response

app = App()
CONSTANT = {constant!r}


@app.route("/", methods=["GET", "POST"])
def root(req: Request) -> Response:
    return Response.json({{"constant": CONSTANT}})
'''


def write_apps(root: Path, constants: list[str]) -> list[Path]:
    folders = []
    for i, constant in enumerate(constants):
        folder = root / f"app{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "app.py").write_text(TEMPLATE.format(constant=constant))
        folders.append(folder)
    return folders


def write_config(path: Path, apps: dict[str, Path], store: Path, **server: int) -> Path:
    lines = ["[server]", f'build_dir = "{store / "builds"}"', f'cache_dir = "{store / "cache"}"']
    lines += [f"{key} = {value}" for key, value in server.items()]
    for name, folder in apps.items():
        lines += [f"[apps.{name}]", f'path = "{folder}"']
    path.write_text("\n".join(lines) + "\n")
    return path


class Gateway:
    """`amphibia up CONFIG --no-local-worker` in its own process, timed from its start."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amphibia.cli", "up", str(config), "--no-local-worker", "--port", str(self.port),
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        self.client = httpx.Client(timeout=60)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:  # keep the pipe flowing; the log is not needed
            pass

    def get(self, path: str) -> httpx.Response | None:
        try:
            return self.client.get(self.url + path)
        except httpx.TransportError:
            return None

    def until(self, condition, what: str, timeout: float = 900) -> float:
        """Seconds since start when `condition()` first held (polled every 20 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc.returncode}) before {what}")
            if condition():
                return time.monotonic() - self.started
            time.sleep(0.02)
        raise RuntimeError(f"timed out waiting for {what}")

    def answers(self, name: str) -> bool:
        res = self.get(f"/apps/{name}/")
        return res is not None and res.status_code == 200

    def ready(self) -> bool:
        """Every app built, browser part included (a build serves before jco has made that part)."""
        res = self.get("/healthz")
        return res is not None and res.json()["progress"]["building"] == 0 and res.json()["progress"]["updating"] == 0

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def anon_mb(self) -> float:
        """The part of RSS that is not file-backed: a mapped component's code and initial memory are
        clean pages of its artifact on disk, which the kernel can drop and share between processes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> float:
        """SIGTERM; seconds until the process is gone."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.client.close()
        return time.monotonic() - started


def distinct_builds(store: Path) -> int:
    builds = store / "builds"
    return sum(1 for d in builds.iterdir() if (d / "manifest.json").is_file()) if builds.is_dir() else 0


def disk_mb(store: Path) -> float:
    """What the store's disk budget counts: builds and compiled components."""
    return sum(e.bytes for e in entries(store / "builds", store / "cache")) / 2**20


def distinct_apps(work: Path, count: int) -> dict:
    """Phases 1 and 2: `count` distinct apps from empty caches, then evicted on every request."""
    store = work / "distinct-store"
    folders = write_apps(work / "distinct", [f"app {i} of {time.time()}" for i in range(count)])
    apps = {f"d{i}": folder for i, folder in enumerate(folders)}
    gw = Gateway(write_config(work / "distinct.toml", apps, store))
    try:
        first = gw.until(lambda: any(gw.answers(name) for name in apps), "a first answer")
        all_built = gw.until(gw.ready, "every build")
    finally:
        gw.stop()
    out = {"apps_distinct": count, "first_answer_cold_s": round(first, 2),
           "build_s_per_app": round(all_built / count, 2), "all_built_cold_s": round(all_built, 1),
           "disk_per_distinct_app_mb": round(disk_mb(store) / count, 1), "distinct_builds": distinct_builds(store)}

    # Every request to a component that was unloaded (far more apps than max_loaded_apps): it maps
    # again from the disk cache. Against the same apps all loaded.
    for bound, key in ((2, "evicted"), (count + 10, "loaded")):
        gw = Gateway(write_config(work / f"distinct-{key}.toml", apps, store, max_loaded_apps=bound))
        try:
            gw.until(gw.ready, "the warm start")
            gw.answers(next(iter(apps)))
            time.sleep(0.5)
            before, anon_before = gw.rss_mb(), gw.anon_mb()
            for name in apps:  # first touch (and, for "loaded", the last load)
                gw.answers(name)
            time.sleep(0.5)
            if key == "loaded":  # every component in memory now, one more than at `before`
                out["rss_per_loaded_app_mb"] = round((gw.rss_mb() - before) / (count - 1), 2)
                out["anon_rss_per_loaded_app_mb"] = round((gw.anon_mb() - anon_before) / (count - 1), 2)
            times = []
            for _ in range(5):
                for name in apps:
                    started = time.perf_counter()
                    assert gw.answers(name), name
                    times.append((time.perf_counter() - started) * 1000)
        finally:
            gw.stop()
        out[f"{key}_first_request_p99_ms" if key == "evicted" else "loaded_request_p99_ms"] = round(pct(times, 99), 1)
        out[f"{key}_request_p50_ms"] = round(pct(times, 50), 1)
    return out


def identical_apps(work: Path, count: int) -> tuple[dict, Path, Path]:
    """Phase 3: `count` apps with one source, from empty caches."""
    store = work / "identical-store"
    constant = f"the same for all, {time.time()}"
    folders = write_apps(work / "identical", [constant] * count)
    apps = {f"i{i}": folder for i, folder in enumerate(folders)}
    gw = Gateway(write_config(work / "identical.toml", apps, store))
    try:
        built = gw.until(gw.ready, "every build")
        answered = sum(gw.answers(name) for name in apps)
    finally:
        gw.stop()
    return ({"apps_identical": count, "identical_builds": distinct_builds(store), "identical_all_built_s": round(built, 1),
             "identical_answered": answered}, folders[0], store)


def many_names(work: Path, folder: Path, store: Path, count: int) -> dict:
    """Phase 4: one component under `count` names, warm caches."""
    apps = {f"n{i}": folder for i in range(count)}
    gw = Gateway(write_config(work / "names.toml", apps, store))
    try:
        first = gw.until(lambda: gw.answers(f"n{count - 1}"), "the first answer")
        ready = gw.until(gw.ready, "every app")
        timings = {}
        for path in ("/", "/api/apps", "/healthz"):
            started = time.perf_counter()
            res = gw.get(path)
            assert res is not None and res.status_code == 200, path
            timings[path] = round((time.perf_counter() - started) * 1000, 1)
        rss = gw.rss_mb()
        stop_s = gw.stop()
    except BaseException:
        gw.stop()
        raise
    return {"names": count, "startup_warm_s": round(first, 2), "all_names_ready_s": round(ready, 2),
            "index_ms": timings["/"], "api_apps_ms": timings["/api/apps"], "healthz_ms": timings["/healthz"],
            "rss_with_names_mb": round(rss, 1), "sigterm_stop_s": round(stop_s, 2)}


def inflight(count: int) -> dict:
    """Phase 5: `count` requests to the chat example at once through a gateway with default guest
    settings; the engine holds every answer until `count` generations wait (or 60 s pass)."""
    from ..config import Config, ServerConfig, default_models, discover_apps
    from ..http.app import create_app
    from ..loopback import serve_in_thread
    from .inflight import EXAMPLE, HeldEngine

    engine = HeldEngine()
    config = Config(models=default_models(), apps=discover_apps(EXAMPLE), root=EXAMPLE.parent,
                    server=replace(ServerConfig(), cache_dir=EXAMPLE.parents[1] / ".amphibia" / "cache",
                                   build_dir=EXAMPLE.parents[1] / ".amphibia" / "builds"))
    served = serve_in_thread(create_app(config, engine=engine, warm_model=False))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    try:
        engine.release.set()
        assert httpx.post(f"{served.url}/apps/chat/", json=body, timeout=60).status_code == 200
        engine.release.clear()
        engine.waiting = 0
        time.sleep(0.5)
        before = rss_mb(os.getpid())
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(
            httpx.post(f"{served.url}/apps/chat/", json=body, timeout=120).status_code)) for _ in range(count)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while engine.waiting < count and time.monotonic() < deadline:
            time.sleep(0.05)
        peak, during = engine.waiting, rss_mb(os.getpid())
        engine.release.set()
        for thread in threads:
            thread.join()
    finally:
        engine.release.set()
        served.stop()
    return {"inflight_requests": count, "inflight_guests_peak": peak, "inflight_ok": codes.count(200),
            "rss_per_inflight_guest_mb": round((during - before) / max(peak, 1), 2)}


def run(quick: bool = False, work: Path | None = None) -> dict:
    distinct, identical, names = (4, 10, 200) if quick else (20, 50, 1000)
    keep = work is not None
    work = work or Path(tempfile.mkdtemp(prefix="amphibia-density-"))
    try:
        result: dict = {"benchmark": "density", "quick": quick}
        result.update(distinct_apps(work, distinct))
        same, folder, store = identical_apps(work, identical)
        result.update(same)
        result.update(many_names(work, folder, store, names))
        result.update(inflight(64))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    return result


def main(args: argparse.Namespace) -> int:
    result = run(quick=args.quick)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>34}: {value}")
    print(json.dumps(result))
    return 0
