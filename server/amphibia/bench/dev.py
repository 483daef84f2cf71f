"""`amphibia bench dev`: the dev loop, measured.

1. `pyodide_cold_ms`: a new browser profile (nothing cached) opens the chat app's dev page; from
   navigation to the first answer of a greedy chat request run from source in Pyodide (remote engine);
2. `pyodide_warm_edit_ms`: in that warm page, an edit to the source -> "run" -> the new answer to the
   same request (median of several edits; `pyodide_reload_ms` is the re-import alone);
3. `server_edit_s`: `app.py` of a copy of `examples/chat` is saved -> the gateway (`--watch`) answers
   the chat request with the new version (served from source by the dev component), and
   `server_build_swap_s`: -> the edit's own build serves (`browser_build_ready_s`: and its browser
   build is ready for pages; medians of several edits), with a
   GET's latency from source and built (the dev component imports the app per request).
The gateway uses the in-process engine (one model, no worker processes). The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from ..config import AppSpec, Config, ServerConfig, default_models
from ..inference.inprocess import InProcessEngine
from ..loopback import serve_in_thread
from .browser import CHROMIUM_ARGS

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 8}


def edit(source: str, n: int) -> str:
    """The chat app with its GET answer (and so its version) changed; its chat answers are the same."""
    return source.replace('return Response.json({"usage": ', f'return Response.json({{"edit": {n}, "usage": ', 1)


def _get_ms(client: httpx.Client, url: str, n: int = 20) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.get(f"{url}/apps/chat/").raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def server_edits(url: str, app_py: Path, original: str, edits: int, log) -> dict:
    """Each edit: saved -> the chat request answered by the new version (served from source by the dev
    component), then -> the edit's own build swapped in; with a GET's latency in both states."""
    answer, swap, page, source_ms, built_ms = [], [], [], [], []
    with httpx.Client(timeout=120) as client:
        info = lambda: next(a for a in client.get(f"{url}/api/apps").json()["apps"] if a["name"] == "chat")  # noqa: E731
        for n in range(1, edits + 1):
            started = time.perf_counter()
            app_py.write_text(edit(original, n))
            while client.get(f"{url}/apps/chat/").json().get("edit") != n:
                time.sleep(0.02)
            client.post(f"{url}/apps/chat/", json=CHAT).raise_for_status()
            answer.append(time.perf_counter() - started)
            from_source = info()["from_source"]
            if from_source:
                source_ms.append(_get_ms(client, url))
            while info()["from_source"]:
                time.sleep(0.05)
            swap.append(time.perf_counter() - started)
            while info()["updating"]:
                time.sleep(0.05)
            page.append(time.perf_counter() - started)
            built_ms.append(_get_ms(client, url))
            log(f"server edit {n}: {answer[-1]:.2f} s to the new answer ({'from source' if from_source else 'built'}), "
                f"{swap[-1]:.1f} s to its build serving, {page[-1]:.1f} s to its browser build")
    return {"server_edit_s": round(statistics.median(answer), 2), "server_edit_runs_s": [round(t, 2) for t in answer],
            "server_build_swap_s": round(statistics.median(swap), 1),
            "browser_build_ready_s": round(statistics.median(page), 1),
            "get_from_source_ms": round(statistics.median(source_ms), 1) if source_ms else None,
            "get_built_ms": round(statistics.median(built_ms), 1)}


PAGE_ANSWER = """async (chat) => {
    await window.amphibiaDev.ready;
    amphibiaDev.setRequest({ method: "POST", path: "/", contentType: "application/json", body: JSON.stringify(chat) });
    const out = await amphibiaDev.send();
    if (out.source.status !== 200) throw new Error(out.source.text());
    return [performance.now(), amphibiaDev.source.timings];
}"""

def page_runs(url: str, original: str, edits: int, log) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=CHROMIUM_ARGS)
        context = browser.new_context()  # a new profile: nothing cached
        page = context.new_page()
        page.goto(f"{url}/dev/apps/chat/?engine=remote")
        cold_ms, timings = page.evaluate(PAGE_ANSWER, CHAT)
        log(f"pyodide cold: {cold_ms:.0f} ms from navigation to the first answer ({timings})")
        runs = []
        for n in range(1, edits + 1):
            # `run` sends the request when the source loaded; the answer event resolves the wait above
            out = page.evaluate("""async ([text, n]) => {
                const started = performance.now();
                const answered = new Promise((resolve) => amphibiaDev.events.addEventListener("answer", (e) => resolve(e.detail), { once: true }));
                amphibiaDev.edit("app.py", text);
                const loaded = await amphibiaDev.run();
                const answer = await answered;
                const ms = performance.now() - started;
                const get = await amphibiaDev.source.handle({ method: "GET", path: "/" });
                if (!loaded.ok || get.json().edit !== n || answer.source.status !== 200) throw new Error("the edit did not take: " + get.text());
                return { ms, reload_ms: loaded.load_ms };
            }""", [edit(original, 100 + n), 100 + n])
            runs.append(out)
            log(f"page edit {n}: {out['ms']:.0f} ms to the new answer (re-import {out['reload_ms']} ms)")
        context.close()
        browser.close()
    return {"pyodide_cold_ms": round(cold_ms), "pyodide_start": timings,
            "pyodide_warm_edit_ms": round(statistics.median(r["ms"] for r in runs)),
            "pyodide_warm_edit_max_ms": round(max(r["ms"] for r in runs)),
            "pyodide_reload_ms": statistics.median(r["reload_ms"] for r in runs)}


def run(edits: int, log) -> dict:
    chat = Path("examples/chat").resolve()
    with tempfile.TemporaryDirectory(prefix="amphibia-bench-dev-") as tmp:
        folder = Path(tmp) / "chat"
        shutil.copytree(chat, folder, ignore=shutil.ignore_patterns(".amphibia", "__pycache__"))
        app_py = folder / "app.py"
        original = app_py.read_text()
        app_py.write_text(original + f"\n# bench {time.time_ns()}\n")  # a build of its own, not one from the store
        original = app_py.read_text()
        models = default_models()
        engine = InProcessEngine(models)
        engine.warm("smollm2")
        config = Config(models=models, root=Path(tmp), apps={"chat": AppSpec(name="chat", path=folder, bridge=True)},
                        server=replace(ServerConfig(), cache_dir=Path(tmp) / "cache", build_dir=Path(tmp) / "builds"))
        from ..http.app import create_app

        started = time.perf_counter()
        served = serve_in_thread(create_app(config, engine=engine, dev=True))
        first_build_s = time.perf_counter() - started
        log(f"first build and start: {first_build_s:.1f} s")
        while not httpx.get(f"{served.url}/api/apps", timeout=30).json()["dev_component"]:
            time.sleep(0.1)  # built once per toolchain (kept in the store), then compiled once per process
        dev_ready_s = time.perf_counter() - started
        log(f"dev component ready: {dev_ready_s:.1f} s after start")
        try:
            page = page_runs(served.url, original, edits, log)
            server = server_edits(served.url, app_py, original, edits, log)
        finally:
            served.stop()
            engine.close()
    return {"benchmark": "dev", **page, **server, "first_build_s": round(first_build_s, 1), "dev_component_ready_s": round(dev_ready_s, 1), "edits": edits,
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"}


def main(args: argparse.Namespace) -> int:
    if not Path("examples/chat").is_dir():
        raise SystemExit("amphibia bench dev: run it from the repository root (it copies ./examples/chat)")
    result = run(3 if args.quick else 5, (lambda msg: None) if args.json else (lambda msg: print(msg, flush=True)))
    print(json.dumps(result))
    return 0
