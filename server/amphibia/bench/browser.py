"""`amphibia bench browser`: the app runtime in a real headless Chromium (Debian's, driven by
Playwright), against a real gateway with a local pool worker on this machine.

1. page-to-ready, cold (new browser profile: nothing cached) and warm (the same profile again):
   from navigation start to `load()` resolving (guest compiled and instantiated in its Worker);
2. per-call overhead: the `bench-calls` app makes N `llm.infer` calls per request against the
   in-browser echo engine; (time(N) - time(0)) / N is what one call costs (JSPI included);
3. tokens/s of the same chat generation on the local engine (wllama) and on the remote one
   (bridge -> broker -> worker), counted from streamed token events;
4. model bytes transferred on the first visit and on the second (OPFS should make it zero).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..config import Config, ServerConfig, default_models, discover_apps
from ..loopback import free_port, serve_in_thread

BENCH_APPS = Path(__file__).resolve().parent / "apps"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STORY = [{"role": "user", "content": "Write a long story about a frog who wants to fly."}]

READY = """async (engine) => {
    const { load } = await import("/amphibia/amphibia.js");
    const app = await load("/apps/chat/", { engine });
    const ready = performance.now();  // since this page's navigation started
    app.close();
    return [ready, app.timings];
}"""

CALLS = """async ([n, reps]) => {
    const { load } = await import("/amphibia/amphibia.js");
    const app = await load("/apps/bench-calls/", { engine: "echo" });
    const time = async (k) => {
        const started = performance.now();
        const res = await app.handle({ method: "GET", path: "/", query: `n=${k}` });
        if (res.status !== 200 || res.json().calls !== k) throw new Error(res.text());
        return performance.now() - started;
    };
    await time(n);  // warm-up: the first calls compile the JS paths
    const out = [];
    for (let i = 0; i < reps; i++) out.push([await time(0), await time(n)]);
    app.close();
    return out;
}"""

TOKENS = """async ([engine, messages, maxTokens]) => {
    const { load } = await import("/amphibia/amphibia.js");
    const app = await load("/apps/chat/", { engine });
    const decision = await app.localReady;
    const stamps = [];
    app.addEventListener("token", () => stamps.push(performance.now()));
    const body = JSON.stringify({ messages, temperature: 0, max_tokens: maxTokens });
    const res = await app.handle({ method: "POST", path: "/stream", headers: {"content-type": "application/json"}, body });
    app.close();
    return { decision, status: res.status, stamps };
}"""


def _wait_for_worker(url: str) -> None:
    import httpx

    deadline = time.time() + 120
    while not httpx.get(f"{url}/pool", timeout=10).json()["workers"]:
        if time.time() > deadline:
            raise RuntimeError("the local worker did not join")
        time.sleep(0.2)


def _tok_s(stamps: list[float]) -> float:
    """Decode speed: tokens after the first one over the time they took (prompt time excluded)."""
    if len(stamps) < 2:
        return 0.0
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)


def run(examples: Path, calls: int, reps: int, max_tokens: int, log: Callable[[str], None]) -> dict:
    from playwright.sync_api import sync_playwright

    apps = {**discover_apps(examples), **discover_apps(BENCH_APPS)}
    config = Config(server=replace(ServerConfig(), cache_dir=examples.parent / ".amphibia" / "cache"),
                    models=default_models(), apps=apps, root=examples.parent)
    from ..http.app import create_app

    port = free_port()
    served = serve_in_thread(create_app(config, local_worker_port=port), port, start_timeout_s=900)
    url = served.url
    try:
        _wait_for_worker(url)
        executable = shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            # 1. page-to-ready: each cold run in a new profile, then warm runs in the last one.
            cold, warm = [], []
            for _ in range(reps):
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{url}/amphibia/")
                ready, cold_parts = page.evaluate(READY, "remote")
                cold.append(ready)
                page.close()
                if _ < reps - 1:
                    context.close()
            for _ in range(reps):
                page = context.new_page()
                page.goto(f"{url}/amphibia/")
                ready, warm_parts = page.evaluate(READY, "remote")
                warm.append(ready)
                page.close()
            context.close()
            log(f"page-to-ready cold {statistics.median(cold):.0f} ms, warm {statistics.median(warm):.0f} ms "
                f"(last warm run: {warm_parts})")
            # 2. per-call overhead, echo engine.
            page = browser.new_page()
            page.goto(f"{url}/amphibia/")
            pairs = page.evaluate(CALLS, [calls, reps])
            page.close()
            per_call = [(t_n - t_0) / calls for t_0, t_n in pairs]
            log(f"call overhead {statistics.median(per_call) * 1000:.0f} us/call ({calls} calls x {reps})")
            # 3 + 4. tokens/s local vs remote, and model bytes on the first and second visit (one profile).
            context = browser.new_context()
            model_gets: list[int] = []
            context.on("requestfinished", lambda r: "/models/" in r.url and model_gets.append(r.sizes()["responseBodySize"]))
            visits, wire = [], []
            for engine in ("local", "local", "remote"):
                page = context.new_page()
                # The app's page (cross-origin isolated: wllama multi-threaded); its own element uses
                # the same engine, and the generation starts once that one is idle too.
                page.goto(f"{url}/apps/chat/browser/?engine={engine}")
                page.locator("amphibia-app .status").filter(has_text=f"engine: {engine}").wait_for(timeout=120_000)
                visits.append(page.evaluate(TOKENS, [engine, STORY, max_tokens]))
                page.close()
                wire.append(sum(model_gets))
            context.close()
            browser.close()
        first, second, remote = visits
        for visit in visits:
            if visit["status"] != 200:
                raise RuntimeError(f"a generation failed: {visit}")
        return {
            "benchmark": "browser",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "browser": "Debian chromium, headless",
            "cold_ready_ms": round(statistics.median(cold), 1),
            "warm_ready_ms": round(statistics.median(warm), 1),
            "call_overhead_ms": round(statistics.median(per_call), 4),
            "local_tok_s": round(_tok_s(second["stamps"]), 1),
            "remote_tok_s": round(_tok_s(remote["stamps"]), 1),
            "local_threads": second["decision"].get("load", {}).get("threads"),
            "local_load_s": round(second["decision"].get("load", {}).get("seconds", 0), 2),
            # GGUF bytes the browser fetched during each visit (Playwright's view of the network).
            "first_load_model_bytes": wire[0],
            "second_load_model_bytes": wire[1] - wire[0],
            "warm_ready_parts_ms": warm_parts,
            "runs": {"cold_ready_ms": [round(x, 1) for x in cold], "warm_ready_ms": [round(x, 1) for x in warm],
                     "call_overhead_ms": [round(x, 4) for x in per_call]},
        }
    finally:
        served.stop(30)


def main(args: argparse.Namespace) -> int:
    examples = Path("examples").resolve()
    if not examples.is_dir():
        raise SystemExit("amphibia bench browser: run it from the repository root (it serves ./examples)")
    quiet = args.json
    result = run(examples, calls=200, reps=3 if args.quick else 5, max_tokens=48 if args.quick else 96,
                 log=(lambda msg: None) if quiet else (lambda msg: print(msg, flush=True)))
    print(json.dumps(result))
    return 0
