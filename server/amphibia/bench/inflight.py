"""`amphibia bench inflight`: gateway memory per guest request in flight.

N requests to the chat example run at once, each in its own fresh instance, each waiting in `llm.chat`
on an engine that holds every answer until all N are in flight; the gateway's RSS then, less its RSS
before, divided by N, is what one guest in flight costs (what `[server] guest_memory_mb` is divided
by). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping

from ..build import build
from ..config import AppSpec, load_app
from ..errors import LLMError
from ..inference.engine import Cancel, CallSink, GenerationSink
from ..inference.service import InferenceService
from ..inference.types import Call, Generation, Usage
from ..sandbox.llm_host import LlmHost
from ..sandbox.runtime import HttpRequest, Runtime
from .chaos import rss_mb

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "chat"


class HeldEngine:
    """Answers every generation once `release` is set, so that requests pile up in flight."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0

    def models(self) -> Mapping[str, int]:
        return {"smollm2": 2048}

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        self.waiting += 1  # several threads; read only as a progress hint

        def answer() -> None:
            self.release.wait()
            sink.token("hi")
            sink.done(Usage(1, 1), "stop")

        threading.Thread(target=answer, daemon=True).start()
        return lambda: None

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        sink.fail(LLMError("this benchmark's engine answers no calls"))
        return lambda: None

    def close(self) -> None:
        pass


def run(app_dir: Path, n: int) -> dict:
    app, built, engine = load_app(app_dir), build(app_dir), HeldEngine()
    with tempfile.TemporaryDirectory() as cache:
        runtime = Runtime([LlmHost(InferenceService(engine))], Path(cache), guest_threads=n)
        component = runtime.load(built.wasm, built.sha256)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        request = HttpRequest("POST", "/", "", [("content-type", "application/json")], body)
        engine.release.set()
        runtime.handle(app, component, request, "warm-up")
        engine.release.clear()
        engine.waiting = 0
        time.sleep(0.5)
        before = rss_mb(os.getpid())
        threads = [threading.Thread(target=runtime.handle, args=(app, component, request, f"r{i}")) for i in range(n)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while engine.waiting < n and time.monotonic() < deadline:
            time.sleep(0.05)
        during = rss_mb(os.getpid())
        engine.release.set()
        for thread in threads:
            thread.join()
        runtime.close()
    return {"benchmark": "inflight", "inflight": engine.waiting, "rss_before_mb": round(before, 1),
            "rss_inflight_mb": round(during, 1), "rss_per_inflight_guest_mb": round((during - before) / n, 2),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}


def main(args: argparse.Namespace) -> int:
    print(json.dumps(run(Path(args.app) if args.app else EXAMPLE, 64)))
    return 0
