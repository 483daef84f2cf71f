"""`amphibia bench pool`: the pool against llama-cpp-python's own OpenAI server, same model, same
machine, same load generator (streaming /v1/completions over HTTP).

1. throughput: 16 concurrent requests of 64 tokens: aggregate tokens/s, p50/p99 time to first token;
2. noisy neighbour: app A keeps 16 long requests in flight, app B sends one short request per
   second; B's p99 TTFT under the flood divided by B's TTFT alone;
3. fairness: 4 apps keeping 4/8/16/32 requests in flight; Jain's index of the tokens each received
   in the window (after a warm-up third);
4. overhead: one request through gateway + WebSocket + worker vs the same generation in-process.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from ..config import default_models
from ..loopback import free_port

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"  # continues for as long as it is allowed: no early end of text
SLOTS = 16
FAIR_LOADS = {"p": 4, "q": 8, "r": 16, "s": 32}  # requests each app keeps in flight


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    keyed: bool  # per-app API keys (Amphibia) or one anonymous client (the peer)
    log: Path = field(default=Path(os.devnull))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not start")


def start_amphibia(workdir: Path) -> Server:
    port = free_port()
    # Each scenario uses apps of its own, so service counted in one does not skew the next.
    keys = "\n".join(f'"key-{a}" = "{a}"' for a in ("t", "a", "b", *FAIR_LOADS))
    (workdir / "amphibia.toml").write_text(
        f"[pool]\ntoken = \"bench\"\nlocal_slots = {SLOTS}\nmax_queue = 1024\n"
        f"[limits]\nmax_concurrent = 128\nmax_queue_wait_s = 600\n"
        f"[models.smollm2]\nn_ctx = 1024\n[api_keys]\n{keys}\n")
    log = workdir / "amphibia.log"
    proc = subprocess.Popen([sys.executable, "-m", "amphibia.cli", "up", str(workdir / "amphibia.toml"), "--port",
                             str(port), "--log-level", "warning"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/healthz")
    deadline = time.time() + 120
    while not httpx.get(url + "/pool").json()["workers"]:
        if time.time() > deadline:
            raise RuntimeError("no worker joined")
        time.sleep(0.3)
    return Server("amphibia", url, proc, keyed=True, log=log)


def start_peer(workdir: Path) -> Server:
    port = free_port()
    model = default_models()["smollm2"].gguf_path()
    log = workdir / "peer.log"
    proc = subprocess.Popen([sys.executable, "-m", "amphibia.bench.peer_server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2",
                             # By default it aborts a running stream whenever a new request arrives;
                             # a user who wants every request answered turns that off.
                             "--interrupt_requests", "false", "--verbose", "false"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models")
    return Server("llama_cpp.server", url, proc, keyed=False, log=log)


@dataclass
class Outcome:
    app: str
    ttft: float
    tokens: int
    total: float


async def complete(client: httpx.AsyncClient, server: Server, app: str, max_tokens: int,
                   on_token: Callable[[str], None] | None = None) -> Outcome:
    headers = {"authorization": f"Bearer key-{app}"} if server.keyed else {}
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as res:
        if res.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {res.status_code}: {await res.aread()!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{server.name}: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0].get("text"):
                tokens += 1
                if on_token is not None:
                    on_token(app)
                if ttft is None:
                    ttft = time.perf_counter() - started
    now = time.perf_counter()
    return Outcome(app, ttft if ttft is not None else now - started, tokens, now - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def throughput(server: Server, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=100)) as client:
        await complete(client, server, "t", 4)  # warm-up
        started = time.perf_counter()
        outs = await asyncio.gather(*(complete(client, server, "t", max_tokens) for _ in range(clients)))
        wall = time.perf_counter() - started
    ttfts = [o.ttft * 1000 for o in outs]
    return {"tok_s": round(sum(o.tokens for o in outs) / wall, 1), "ttft_p50_ms": round(pct(ttfts, 50)),
            "ttft_p99_ms": round(pct(ttfts, 99)), "tokens": sum(o.tokens for o in outs), "wall_s": round(wall, 2)}


async def keep_busy(client: httpx.AsyncClient, server: Server, app: str, in_flight: int, max_tokens: int,
                    until: float, sink: list[Outcome], on_token: Callable[[str], None] | None = None) -> None:
    async def loop() -> None:
        while time.perf_counter() < until:
            try:
                sink.append(await complete(client, server, app, max_tokens, on_token))
            except (httpx.HTTPError, RuntimeError):
                await asyncio.sleep(0.1)

    # At `until`, requests still in flight are abandoned (their clients hang up), not waited for.
    tasks = [asyncio.create_task(loop()) for _ in range(in_flight)]
    await asyncio.wait(tasks, timeout=max(0.0, until - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def noisy_neighbour(server: Server, seconds: float) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200)) as client:
        alone = [(await complete(client, server, "b", 8)).ttft for _ in range(4)]
        flood: list[Outcome] = []
        until = time.perf_counter() + seconds
        flooding = asyncio.create_task(keep_busy(client, server, "a", SLOTS, 256, until, flood))
        await asyncio.sleep(2.0)  # let A fill every slot
        probes = []
        for _ in range(max(3, int(seconds - 2))):
            probes.append(asyncio.create_task(complete(client, server, "b", 8)))
            await asyncio.sleep(1.0)
        b = [(await p).ttft for p in probes]
        flooding.cancel()
        try:
            await flooding
        except asyncio.CancelledError:
            pass
    base = statistics.median(alone)
    return {"b_alone_ttft_ms": round(base * 1000), "b_flooded_p50_ttft_ms": round(pct(b, 50) * 1000),
            "b_flooded_p99_ttft_ms": round(pct(b, 99) * 1000), "ratio": round(pct(b, 99) / base, 2),
            "probes": len(b), "b_flooded_ttft_ms": [round(x * 1000) for x in b]}


async def fairness(server: Server, seconds: float) -> dict:
    loads = FAIR_LOADS
    start = time.perf_counter()
    until = start + seconds
    tokens = {app: 0 for app in loads}

    def count(app: str) -> None:  # every token received inside the window, after a warm-up third
        if start + seconds / 3 <= time.perf_counter() <= until:
            tokens[app] += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200)) as client:
        outs: list[Outcome] = []
        await asyncio.gather(*(keep_busy(client, server, app, n, 48, until, outs, count) for app, n in loads.items()))
    values = list(tokens.values())
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0
    return {"jain": round(jain, 3), "tokens_per_app": tokens, "in_flight_per_app": loads}


def overhead(server: Server, reps: int, max_tokens: int = 64) -> dict:
    """The same greedy generation through the pool and in this process (median of `reps`)."""
    from ..inference.llama_model import LlamaModel
    from ..inference.pool import wire
    from ..inference.pool.batcher import Batcher

    def pooled() -> float:
        t = time.perf_counter()
        res = httpx.post(f"{server.url}/v1/completions", headers={"authorization": "Bearer key-t"}, timeout=120,
                         json={"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
        res.raise_for_status()
        return time.perf_counter() - t

    # The same context shape as the pool's worker (16 slots of 1024 tokens) and the same batching loop
    # on this (main) thread, as a worker runs it, so the difference is the gateway, the broker, the
    # WebSocket hops and HTTP, not the KV layout or the thread.
    model = LlamaModel(default_models()["smollm2"].gguf_path(), n_ctx=1024, slots=SLOTS)
    ended: list[wire.Message] = []
    batcher = Batcher(model, lambda m: ended.append(m) if isinstance(m, (wire.Done, wire.Failed)) else None)
    params = {"max_tokens": max_tokens, "temperature": 0.0}

    def local() -> float:
        ended.clear()
        t = time.perf_counter()
        batcher.submit(wire.Assign(id="local", model="smollm2", params=params, prompt=PROMPT))
        while not ended:
            batcher.turn()
        return time.perf_counter() - t

    pooled(), local()  # warm-up
    p = statistics.median(pooled() for _ in range(reps))
    q = statistics.median(local() for _ in range(reps))
    model.close()
    return {"pool_ms": round(p * 1000, 1), "in_process_ms": round(q * 1000, 1), "overhead_pct": round((p - q) / q * 100, 1)}


def run(quick: bool, say) -> dict:
    tokens = 32 if quick else 64
    noisy_s, fair_s, reps = (6, 9, 2) if quick else (20, 60, 5)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for start in (start_amphibia, start_peer):
            server = start(Path(tmp))
            try:
                say(f"{server.name}: throughput ({SLOTS} clients x {tokens} tokens)")
                results.setdefault("throughput", {})[server.name] = asyncio.run(throughput(server, SLOTS, tokens))
                say(f"{server.name}: noisy neighbour ({noisy_s} s)")
                results.setdefault("noisy", {})[server.name] = asyncio.run(noisy_neighbour(server, noisy_s))
                say(f"{server.name}: fairness ({fair_s} s)")
                results.setdefault("fairness", {})[server.name] = asyncio.run(fairness(server, fair_s))
                if server.name == "amphibia":
                    say("amphibia: overhead vs in-process")
                    results["overhead"] = overhead(server, reps)
            finally:
                server.stop()
            say(json.dumps({k: v.get(server.name) for k, v in results.items() if k != "overhead"}))
    t, n = results["throughput"], results["noisy"]
    return {
        "benchmark": "pool", "quick": quick, "slots": SLOTS, "max_tokens": tokens,
        "throughput": {"amphibia_tok_s": t["amphibia"]["tok_s"], "peer_tok_s": t["llama_cpp.server"]["tok_s"],
                       "ratio": round(t["amphibia"]["tok_s"] / t["llama_cpp.server"]["tok_s"], 2),
                       "amphibia": t["amphibia"], "peer": t["llama_cpp.server"]},
        "noisy_neighbour": {"amphibia_ratio": n["amphibia"]["ratio"], "peer_ratio": n["llama_cpp.server"]["ratio"],
                            "amphibia": n["amphibia"], "peer": n["llama_cpp.server"]},
        "fairness": {"jain": results["fairness"]["amphibia"]["jain"],
                     "peer_jain": results["fairness"]["llama_cpp.server"]["jain"],
                     "amphibia": results["fairness"]["amphibia"], "peer": results["fairness"]["llama_cpp.server"]},
        "overhead_pct": results["overhead"]["overhead_pct"], "overhead": results["overhead"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }


def main(args: argparse.Namespace) -> int:
    say = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    print(json.dumps(run(args.quick, say)))
    return 0
