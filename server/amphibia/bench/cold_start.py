"""`amphibia bench cold-start`: what a fresh sandbox per request costs.

Measures, for the chat example with the echo engine (no model time): compile time, load from the
on-disk cache, a fresh Store + instance + handle per request (p50/p99), both for requests that arrive
at an idle server (their instance is made ahead, see `sandbox/instances.py`) and for requests sent
back to back (instantiated in-line), and the same request in a new Python process per request. The
last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from importlib import metadata

from wasmtime.component import Component

from ..build import build
from ..config import load_app
from ..inference.service import InferenceService
from ..sandbox.llm_host import LlmHost
from ..sandbox.runtime import ComponentCache, HttpRequest, Runtime
from .echo_engine import EchoEngine

GAP_S = 0.005  # between requests that arrive at an idle server
BODY = json.dumps({"messages": [{"role": "user", "content": "Hello, sandbox!"}]}).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(app_dir: Path, requests: int, say: callable) -> dict:
    app = load_app(app_dir)
    built = build(app_dir)
    with tempfile.TemporaryDirectory() as cache_dir:
        runtime = Runtime([LlmHost(InferenceService(EchoEngine()))], Path(cache_dir), guest_threads=1)
        started = time.perf_counter()
        component = Component.from_file(runtime.wasmtime, str(built.wasm))
        compile_s = time.perf_counter() - started
        say(f"compile: {compile_s:.2f} s")
        runtime.load(built.wasm, built.sha256)  # writes the serialized artifact to the disk cache

        loads = []
        for _ in range(5):
            cache = ComponentCache(runtime.wasmtime, Path(cache_dir))  # empty memory cache: from disk
            t = time.perf_counter()
            component = cache.load(built.wasm, built.sha256)
            loads.append((time.perf_counter() - t) * 1000)
        say(f"load from disk cache: {statistics.median(loads):.1f} ms (median of 5)")

        request = HttpRequest("POST", "/", "", [("content-type", "application/json")], BODY)
        for i in range(10):  # warm-up: first calls fault in the pre-initialised memory image
            runtime.handle(app, component, request, f"warm{i}")

        def timed(req: HttpRequest, gap_s: float, tag: str) -> list[float]:
            out = []
            for i in range(requests):
                if gap_s:
                    time.sleep(gap_s)
                t = time.perf_counter()
                res = runtime.handle(app, component, req, f"{tag}{i}")
                out.append((time.perf_counter() - t) * 1000)
                assert res.status == 200, res.body
            return out

        # Requests arriving at an idle server (5 ms apart): each finds its fresh instance made ahead.
        times = timed(request, GAP_S, "bench")
        taken = runtime.spares.taken
        # Back to back from one client: no idle time to work in, so each request instantiates in-line.
        inline_times = timed(request, 0.0, "inline")
        # The same app on a route that makes no llm call: the sandbox alone.
        plain = HttpRequest("GET", "/", "", [], b"")
        plain_times = timed(plain, GAP_S, "plain")
        runtime.close()
    p50, p99 = percentile(times, 50), percentile(times, 99)
    say(f"fresh instance + handle with an (echo) llm.chat call: p50 {p50:.2f} ms, p99 {p99:.2f} ms over {requests} requests "
        f"arriving {GAP_S * 1000:g} ms apart ({taken} found their instance made ahead)")
    say(f"the same back to back (instantiated in-line): p50 {percentile(inline_times, 50):.2f} ms, "
        f"p99 {percentile(inline_times, 99):.2f} ms")
    say(f"fresh instance + handle, no llm call: p50 {percentile(plain_times, 50):.2f} ms, "
        f"p99 {percentile(plain_times, 99):.2f} ms")

    baseline = []
    script = Path(__file__).with_name("baseline_app.py")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for _ in range(max(10, requests // 15)):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, str(script)], input=BODY, capture_output=True, env=env, check=True)
        baseline.append((time.perf_counter() - t) * 1000)
        assert b"Hello, sandbox!" in out.stdout
    base_p50 = percentile(baseline, 50)
    say(f"process per request: p50 {base_p50:.1f} ms")
    return {
        "benchmark": "cold-start",
        "app": app.name,
        "requests": requests,
        "instantiate_p50_ms": round(p50, 3),
        "instantiate_p99_ms": round(p99, 3),
        "made_ahead": taken,
        "inline_p50_ms": round(percentile(inline_times, 50), 3),
        "inline_p99_ms": round(percentile(inline_times, 99), 3),
        "inline_speedup": round(base_p50 / percentile(inline_times, 50), 1),
        "no_llm_p50_ms": round(percentile(plain_times, 50), 3),
        "no_llm_p99_ms": round(percentile(plain_times, 99), 3),
        "cached_load_ms": round(statistics.median(loads), 2),
        "compile_s": round(compile_s, 2),
        "baseline_p50_ms": round(base_p50, 2),
        "speedup": round(base_p50 / p50, 1),
        "goals": {"p50_le_2ms": p50 <= 2, "p99_le_10ms": p99 <= 10, "cached_load_le_50ms": statistics.median(loads) <= 50,
                  "speedup_ge_20x": base_p50 / p50 >= 20},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"wasmtime-py {metadata.version('wasmtime')}",
    }


def main(args: argparse.Namespace) -> int:
    app_dir = Path(args.app) if args.app else Path(__file__).resolve().parents[3] / "examples" / "chat"
    say = (lambda _msg: None) if args.json else (lambda msg: print(msg, flush=True))
    result = run(app_dir, args.requests, say)
    print(json.dumps(result))
    return 0
