"""`amphibia bench pool`: the pool against llama.cpp's own `llama-server` (the main peer, built by
`make llama-server` from the llama.cpp sources llama-cpp-python vendors) and llama-cpp-python's
OpenAI server (a second peer), same model, same machine, same load generator, identical work.

Identical work: every sampling parameter is pinned on both sides (greedy, no repeat penalty), both
run 2 threads and 16 slots of the same context, tokens are counted from `usage`, and the greedy
texts are compared (a warning and the difference go to stderr when they are not identical).

1. ttft_solo: one short request alone; with the gateway's per-hop timeline (from /metrics);
2. throughput: 16 concurrent requests: aggregate tokens/s;
3. noisy neighbour: app A keeps 16 long requests in flight, app B sends one short request per
   second; B's p99 time to first token, against one full-batch decode step;
4. prefix: 16 users of a chat app sharing a 400-token system prompt, two rounds: TTFT and tokens/s;
5. interference: 8 running sequences while a 1,500-token prompt is admitted: their inter-token p99
   divided by their steady inter-token time;
6. fairness: 4 apps keeping 4/8/16/32 requests in flight; Jain's index of the tokens each received;
7. overhead: one request through gateway + WebSocket + worker vs the same generation in-process.
Scenarios 4 and 5 run against llama-server only. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import platform
import re
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
N_CTX = 2048  # per slot, on every server
THREADS = 2
FAIR_LOADS = {"p": 4, "q": 8, "r": 16, "s": 32}  # requests each app keeps in flight
# Pinned on every side: llama-server's defaults (top_k 40, min_p 0.05, repeat_penalty 1.0) and ours
# (Spin's: repeat_penalty 1.1) differ; greedy with no penalty leaves nothing to differ.
PINNED = {"temperature": 0.0, "top_k": 40, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "repeat_last_n": 64,
          "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 1}
SYSTEM = ("You are the assistant of a small travel agency. You answer questions about destinations, "
          "transport, visas, weather and prices. Keep answers short and factual, one or two sentences, "
          "and never invent prices. If you do not know, say so and suggest who could know. ") * 8
QUESTIONS = ["Is Lisbon warm in March?", "How do I get from Rome to Naples?", "Do I need a visa for Japan?",
             "What is the best month for Iceland?", "Is Paris expensive?", "How long is the flight to Oslo?",
             "Can I take a ferry to Corsica?", "Where is the Alhambra?", "Is Prague walkable?",
             "What currency does Poland use?", "Is Crete good for hiking?", "How far is Bruges from Ghent?",
             "When is carnival in Venice?", "Is Malta crowded in August?", "What is Porto known for?",
             "Are trains in Switzerland punctual?"]
REPO = Path(__file__).resolve().parents[3]
LLAMA_SERVER = REPO / ".amphibia" / "llama-server" / "bin" / "llama-server"


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    keyed: bool  # per-app API keys (Amphibia) or one anonymous client (the peers)
    log: Path = field(default=Path(os.devnull))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
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
    keys = "\n".join(f'"key-{a}" = "{a}"' for a in ("t", "a", "b", "c", "i", *FAIR_LOADS))
    (workdir / "amphibia.toml").write_text(
        f"[pool]\ntoken = \"bench\"\nlocal_slots = {SLOTS}\nmax_queue = 1024\n"
        f"[limits]\nmax_concurrent = 128\nmax_queue_wait_s = 600\n"
        f"[models.smollm2]\nn_ctx = {N_CTX}\nthreads = {THREADS}\nflash_attn = false\n[api_keys]\n{keys}\n"
        # The chat example, for the streamed-answer scenario; builds are shared with the repository's.
        f"[server]\nbuild_dir = \"{REPO / '.amphibia' / 'builds'}\"\ncache_dir = \"{REPO / '.amphibia' / 'cache'}\"\n"
        f"[apps.chat]\npath = \"{REPO / 'examples' / 'chat'}\"\n")
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


def start_llama_server(workdir: Path) -> Server:
    port = free_port()
    log = workdir / "llama-server.log"
    # The same kernels as our workers: --no-repack (llama_model.USE_EXTRA_BUFFERS; AMX repacking
    # crashes on this machine's CPUs) and no flash attention (`flash_attn = false` on our side: on
    # CPUs small prompt chunks cost a third without it; see llama_model's context settings).
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(default_models()["smollm2"].gguf_path()), "--host", "127.0.0.1",
                             "--port", str(port), "-c", str(N_CTX * SLOTS), "--parallel", str(SLOTS), "-t", str(THREADS),
                             "-tb", str(THREADS), "--cont-batching", "--no-webui", "--no-repack", "--flash-attn", "off"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/health")
    return Server("llama-server", url, proc, keyed=False, log=log)


def start_llama_cpp_server(workdir: Path) -> Server:
    port = free_port()
    log = workdir / "peer.log"
    proc = subprocess.Popen([sys.executable, "-m", "amphibia.bench.peer_server", "--model",
                             str(default_models()["smollm2"].gguf_path()), "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", str(N_CTX), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
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
    tokens: int  # from `usage` where the server reports it, else the chunks that carried text
    total: float
    text: str = ""
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each chunk with text


async def complete(client: httpx.AsyncClient, server: Server, app: str, max_tokens: int,
                   on_token: Callable[[str], None] | None = None, prompt: str = PROMPT,
                   messages: list[dict] | None = None, extra: dict | None = None) -> Outcome:
    headers = {"authorization": f"Bearer key-{app}"} if server.keyed else {}
    body: dict = {"model": "smollm2", "max_tokens": max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}, **PINNED, **(extra or {})}
    if messages is not None:
        body["messages"], path = messages, "/v1/chat/completions"
    else:
        body["prompt"], path = prompt, "/v1/completions"
    started = time.perf_counter()
    ttft, chunks, usage, parts, arrivals = None, 0, None, [], []
    async with client.stream("POST", server.url + path, json=body, headers=headers) as res:
        if res.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {res.status_code}: {await res.aread()!r}")
        async for line in res.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{server.name}: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                now = time.perf_counter()
                chunks += 1
                parts.append(text)
                arrivals.append(now)
                if on_token is not None:
                    on_token(app)
                if ttft is None:
                    ttft = now - started
    now = time.perf_counter()
    return Outcome(app, ttft if ttft is not None else now - started, usage if usage is not None else chunks,
                   now - started, "".join(parts), arrivals)


def new_client(timeout: float, connections: int) -> httpx.AsyncClient:
    """A new connection per request, on every side: llama-server closes a connection after a stream
    now and then, and a client that reuses it sees "disconnected without a response"."""
    return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=connections,
                                                                   max_keepalive_connections=0))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def hop_sums(server: Server) -> dict[str, tuple[float, float]]:
    """The gateway's time-to-first-token hops so far: {hop: (seconds summed, count)}."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[str, list[float]] = {}
    for kind, hop, value in re.findall(r'^amphibia_first_token_hop_seconds_(sum|count)\{hop="(\w+)"\} (\S+)$', text, re.M):
        out.setdefault(hop, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {hop: (v[0], v[1]) for hop, v in out.items()}


async def ttft_solo(server: Server, reps: int) -> dict:
    async with new_client(120, 10) as client:
        await complete(client, server, "t", 2)  # warm-up
        before = hop_sums(server) if server.keyed else {}
        outs = [await complete(client, server, "t", 8) for _ in range(reps)]
    ms = [o.ttft * 1000 for o in outs]
    result: dict = {"ttft_ms": round(statistics.median(ms), 1), "ttft_all_ms": [round(x, 1) for x in ms]}
    if server.keyed:  # the per-hop timeline, as the gateway saw these requests (means)
        after = hop_sums(server)
        timeline = {hop: round((after[hop][0] - before.get(hop, (0, 0))[0])
                               / max(1.0, after[hop][1] - before.get(hop, (0, 0))[1]) * 1000, 2) for hop in after}
        timeline["http_and_sse"] = round(statistics.mean(ms) - sum(timeline.values()), 2)
        result["timeline_ms"] = timeline
    return result


STREAM_ASK = [{"role": "user", "content": "Name three animals that live both in water and on land."}]


async def stream_ttfb(server: Server, reps: int) -> dict:
    """Time to the first body byte of the chat example streaming its answer (server-sent events)
    through the gateway, against time to first token of the same prompt (the app's system message
    included) through the OpenAI API: what an app adds on top of the model's own first token."""
    deadline = time.time() + 300
    while not any(a["name"] == "chat" for a in httpx.get(server.url + "/api/apps", timeout=10).json()["apps"]):
        if time.time() > deadline:
            raise RuntimeError("the chat example did not build")
        await asyncio.sleep(0.5)
    system = [{"role": "system", "content": "You are a concise, friendly assistant."}]  # the app's SYSTEM
    body = json.dumps({"messages": STREAM_ASK, "max_tokens": 8, "temperature": 0}).encode()
    headers = {"content-type": "application/json", "accept": "text/event-stream"}

    async def first_byte(client: httpx.AsyncClient) -> float:
        started = time.perf_counter()
        async with client.stream("POST", server.url + "/apps/chat/", content=body, headers=headers) as res:
            if res.status_code != 200 or "text/event-stream" not in res.headers.get("content-type", ""):
                raise RuntimeError(f"chat did not stream: HTTP {res.status_code} {res.headers.get('content-type')}")
            first = None
            async for chunk in res.aiter_raw():  # read to the end: the next request finds the slot free
                if first is None and chunk:
                    first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("the streamed answer had no body")
        return first

    async with new_client(120, 10) as client:
        await first_byte(client)  # warm-up: the app's component is mapped, its prefix cached
        await complete(client, server, "t", 2, messages=system + STREAM_ASK)
        streamed = [await first_byte(client) * 1000 for _ in range(reps)]
        api = [(await complete(client, server, "t", 8, messages=system + STREAM_ASK)).ttft * 1000 for _ in range(reps)]
    return {"stream_ttfb_ms": round(statistics.median(streamed), 1), "api_ttft_ms": round(statistics.median(api), 1),
            "ratio": round(statistics.median(streamed) / statistics.median(api), 2)}


async def throughput(server: Server, clients: int, max_tokens: int) -> dict:
    async with new_client(600, 100) as client:
        await complete(client, server, "t", 4)  # warm-up
        started = time.perf_counter()
        outs = await asyncio.gather(*(complete(client, server, "t", max_tokens) for _ in range(clients)))
        wall = time.perf_counter() - started
    ttfts = [o.ttft * 1000 for o in outs]
    return {"tok_s": round(sum(o.tokens for o in outs) / wall, 1), "ttft_p50_ms": round(pct(ttfts, 50)),
            "ttft_p99_ms": round(pct(ttfts, 99)), "tokens": sum(o.tokens for o in outs), "wall_s": round(wall, 2),
            "text": outs[0].text, "texts_agree": len({o.text for o in outs}) == 1}


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
    async with new_client(600, 200) as client:
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
            "p99_ms": round(pct(b, 99) * 1000), "ratio": round(pct(b, 99) / base, 2),
            "probes": len(b), "b_flooded_ttft_ms": [round(x * 1000) for x in b]}


async def prefix(server: Server, rounds: int, max_tokens: int = 16) -> dict:
    """16 users of one chat app with a long shared system prompt, all at once, `rounds` times."""
    async with new_client(600, 100) as client:
        outs: list[Outcome] = []
        started = time.perf_counter()
        for r in range(rounds):
            outs += await asyncio.gather(*(complete(
                client, server, "c", max_tokens, messages=[{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": f"{q} (round {r + 1})"}])
                for q in QUESTIONS[:SLOTS]))
        wall = time.perf_counter() - started
    ttfts = [o.ttft * 1000 for o in outs]
    return {"ttft_p50_ms": round(pct(ttfts, 50)), "ttft_p99_ms": round(pct(ttfts, 99)),
            "tok_s": round(sum(o.tokens for o in outs) / wall, 1), "tokens": sum(o.tokens for o in outs),
            "wall_s": round(wall, 2), "texts": [o.text for o in outs]}


async def interference(server: Server, running: int = 8, long_words: int = 1500) -> dict:
    """`running` streams generate; then one prompt of about `long_words` tokens arrives. Inter-token
    gaps of the streams while it is admitted (until its first token) against their gaps before."""
    long_prompt = " ".join(["word"] * long_words)
    async with new_client(600, 50) as client:
        streams = [asyncio.create_task(complete(client, server, "i", 400)) for _ in range(running)]
        await asyncio.sleep(3.0)  # every stream admitted and generating
        t_long = time.perf_counter()
        long = await complete(client, server, "i", 1, prompt=long_prompt)
        t_first = t_long + long.ttft
        outs = await asyncio.gather(*streams)
    steady, during = [], []
    for o in outs:
        for a, b in zip(o.arrivals, o.arrivals[1:]):
            if b < t_long:
                steady.append(b - a)
            elif a < t_first and b > t_long:
                during.append(b - a)
    base = statistics.median(steady) if steady else float("nan")
    worst = pct(during, 99) if during else float("nan")
    return {"steady_itl_ms": round(base * 1000, 1), "admission_itl_p99_ms": round(worst * 1000, 1),
            "itl_p99_ratio": round(worst / base, 2) if steady and during else None,
            "long_prompt_ttft_ms": round(long.ttft * 1000), "gaps_during": len(during)}


async def fairness(server: Server, seconds: float) -> dict:
    loads = FAIR_LOADS
    start = time.perf_counter()
    until = start + seconds
    tokens = {app: 0 for app in loads}

    def count(app: str) -> None:  # every token received inside the window, after a warm-up third
        if start + seconds / 3 <= time.perf_counter() <= until:
            tokens[app] += 1

    async with new_client(600, 200) as client:
        outs: list[Outcome] = []
        await asyncio.gather(*(keep_busy(client, server, app, n, 48, until, outs, count) for app, n in loads.items()))
    values = list(tokens.values())
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0
    return {"jain": round(jain, 3), "tokens_per_app": tokens, "in_flight_per_app": loads}


# A record each of 16 users asks for at once: constrained output against the same load unconstrained.
RECORD = {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                     "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                                     "field": {"enum": ["physics", "chemistry", "mathematics", "biology", "other"]}},
    "required": ["name", "year", "field"], "additionalProperties": False}}
RECORD_ASK = [{"role": "user", "content": "List three famous scientists as JSON: name, a year of a discovery, field."}]


async def constrained(server: Server, clients: int, max_tokens: int = 96) -> dict:
    """Aggregate tokens/s of `clients` schema-constrained chat requests against the same number
    unconstrained, and the share of constrained answers that parse and validate.

    The runs go schema, plain, plain, schema and each kind counts its faster run, so neither kind
    gains from its place in the order. (Writing this found a batching bug: every second burst of 16
    ran at half speed because the batch listed the sequences out of slot order; `LlamaModel.step`
    now orders them.)"""
    schema_extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD}}}
    runs: dict[str, list[tuple[float, list[Outcome]]]] = {"schema": [], "plain": []}
    async with new_client(600, 100) as client:
        await complete(client, server, "t", 4, messages=RECORD_ASK)  # warm-up
        for kind in ("schema", "plain", "plain", "schema"):
            if kind == "plain":  # the same number of tokens per request: the runs differ only by the grammar
                max_tokens = max(1, round(statistics.mean(o.tokens for o in runs["schema"][0][1])))
            started = time.perf_counter()
            outs = await asyncio.gather(*(complete(client, server, "t", max_tokens, messages=RECORD_ASK,
                                                   extra=schema_extra if kind == "schema" else None)
                                          for _ in range(clients)))
            runs[kind].append((sum(o.tokens for o in outs) / (time.perf_counter() - started), outs))
    best = {kind: max(r[0] for r in rs) for kind, rs in runs.items()}
    answers = [o for _, outs in runs["schema"] for o in outs]
    valid = sum(1 for o in answers if _validates(o.text, RECORD))
    return {"plain_tok_s": round(best["plain"], 1), "schema_tok_s": round(best["schema"], 1),
            "ratio": round(best["schema"] / best["plain"], 2) if best["plain"] else None,
            "runs_tok_s": {kind: [round(r[0], 1) for r in rs] for kind, rs in runs.items()},
            "valid_rate": round(valid / len(answers), 3), "tokens_per_request": max_tokens,
            "example": answers[0].text}


def _validates(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema  # installed with the test and notebook extras; parsing alone counts elsewhere
    except ImportError:
        return True
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def in_process(server: Server, reps: int, max_tokens: int = 64) -> dict:
    """The same greedy generation through the pool and in this process (median of `reps`), and one
    full-batch decode step (all slots generating) of the same model and context shape."""
    from ..inference.llama_model import LlamaModel
    from ..inference.pool import wire
    from ..inference.pool.batcher import Batcher

    def pooled() -> float:
        t = time.perf_counter()
        res = httpx.post(f"{server.url}/v1/completions", headers={"authorization": "Bearer key-t"}, timeout=120,
                         json={"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, **PINNED})
        res.raise_for_status()
        return time.perf_counter() - t

    # The same context shape as the pool's worker and the same batching loop on this (main) thread,
    # as a worker runs it, so the difference is the gateway, the broker, the WebSocket hops and HTTP.
    model = LlamaModel(default_models()["smollm2"].gguf_path(), n_ctx=N_CTX, slots=SLOTS, threads=THREADS,
                       flash_attn=False)
    ended: list[wire.Message] = []
    batcher = Batcher(model, lambda m: ended.append(m) if isinstance(m, (wire.Done, wire.Failed)) else None)
    params = {"max_tokens": max_tokens, **PINNED}

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

    ended.clear()
    for i in range(SLOTS):
        batcher.submit(wire.Assign(id=f"full{i}", model="smollm2", params={**params, "max_tokens": 400}, prompt=PROMPT))
    for _ in range(5):  # admitted, prefilled, generating
        batcher.turn()
    steps = []
    for _ in range(20):
        t = time.perf_counter()
        batcher.turn()
        steps.append(time.perf_counter() - t)
    for i in range(SLOTS):
        batcher.submit(wire.Cancel(f"full{i}"))
    batcher.turn()
    model.close()
    return {"pool_ms": round(p * 1000, 1), "in_process_ms": round(q * 1000, 1), "overhead_pct": round((p - q) / q * 100, 1),
            "step_ms": round(statistics.median(steps) * 1000, 1)}


def compare_texts(what: str, ours: list[str], theirs: list[str], peer: str, say_warning: Callable[[str], None]) -> bool:
    same = ours == theirs
    if not same:
        diffs = [f"  #{i}: amphibia {a!r}\n  #{i}: {peer} {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        say_warning(f"warning: {what}: the greedy texts of amphibia and {peer} differ in {len(diffs)} of "
                    f"{len(ours)}:\n" + "\n".join(diffs[:4]) + "\n" + "".join(difflib.unified_diff(
                        [ours[0] + "\n"], [theirs[0] + "\n"], "amphibia", peer)))
    return same


def run(quick: bool, say, warn) -> dict:
    tokens = 32 if quick else 64
    noisy_s, fair_s, reps, rounds = (6, 9, 3, 1) if quick else (20, 60, 5, 2)
    results: dict = {}
    peers = [start_llama_server] if LLAMA_SERVER.exists() else []
    if not peers:
        warn(f"note: {LLAMA_SERVER} is not built (make llama-server); comparing with llama_cpp.server only")
    with tempfile.TemporaryDirectory() as tmp:
        for start in (start_amphibia, *peers, start_llama_cpp_server):
            server = start(Path(tmp))
            main_pair = server.name in ("amphibia", "llama-server")
            try:
                say(f"{server.name}: one request alone")
                results.setdefault("solo", {})[server.name] = asyncio.run(ttft_solo(server, 3 * reps))
                say(f"{server.name}: throughput ({SLOTS} clients x {tokens} tokens)")
                results.setdefault("throughput", {})[server.name] = asyncio.run(throughput(server, SLOTS, tokens))
                say(f"{server.name}: noisy neighbour ({noisy_s} s)")
                results.setdefault("noisy", {})[server.name] = asyncio.run(noisy_neighbour(server, noisy_s))
                if main_pair:
                    say(f"{server.name}: prefix ({SLOTS} users sharing a system prompt, {rounds} round(s))")
                    results.setdefault("prefix", {})[server.name] = asyncio.run(prefix(server, rounds))
                    say(f"{server.name}: interference (a 1,500-token prompt among 8 running sequences)")
                    results.setdefault("interference", {})[server.name] = asyncio.run(interference(server))
                say(f"{server.name}: fairness ({fair_s} s)")
                results.setdefault("fairness", {})[server.name] = asyncio.run(fairness(server, fair_s))
                if server.name == "amphibia":
                    say("amphibia: an app's streamed answer, time to first byte vs the API's first token")
                    results["stream"] = asyncio.run(stream_ttfb(server, 3 * reps))
                    say(f"amphibia: constrained output ({SLOTS} schema requests vs {SLOTS} plain)")
                    results["constrained"] = asyncio.run(constrained(server, SLOTS))
                    say("amphibia: overhead vs in-process, one full-batch step")
                    results["in_process"] = in_process(server, reps)
            finally:
                server.stop()
    return summary(quick, tokens, results, warn)


def summary(quick: bool, tokens: int, r: dict, warn) -> dict:
    ours, peer = "amphibia", ("llama-server" if "llama-server" in r["solo"] else None)
    second = "llama_cpp.server"
    t, n, s, f = r["throughput"], r["noisy"], r["solo"], r["fairness"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    identical = {p: compare_texts("throughput", [t[ours]["text"]], [t[p]["text"]], p, warn) for p in t if p != ours}
    out: dict = {
        "benchmark": "pool", "quick": quick, "slots": SLOTS, "n_ctx_per_slot": N_CTX, "threads": THREADS,
        "max_tokens": tokens, "pinned": PINNED, "texts_identical": identical,
        "ttft_solo": {"amphibia_ms": s[ours]["ttft_ms"], "timeline_ms": s[ours].get("timeline_ms"),
                      "llama_cpp_server_ms": s[second]["ttft_ms"]},
        "throughput": {"amphibia_tok_s": t[ours]["tok_s"], "peer_tok_s": t[second]["tok_s"],
                       "ratio": ratio(t[ours]["tok_s"], t[second]["tok_s"]),
                       "amphibia": _without(t[ours], "text"), "llama_cpp_server": _without(t[second], "text")},
        "noisy_neighbour": {"amphibia_p99_ms": n[ours]["p99_ms"], "amphibia_ratio": n[ours]["ratio"],
                            "peer_ratio": n[second]["ratio"], "step_ms": r["in_process"]["step_ms"],
                            "amphibia": n[ours], "llama_cpp_server": n[second]},
        "fairness": {"jain": f[ours]["jain"], "llama_cpp_server_jain": f[second]["jain"],
                     "amphibia": f[ours], "llama_cpp_server": f[second]},
        "overhead_pct": r["in_process"]["overhead_pct"], "overhead": r["in_process"],
        "constrained": r["constrained"],
        "stream_ttfb_ms": r["stream"]["stream_ttfb_ms"], "stream": r["stream"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    if peer is not None:
        p = r["prefix"]
        same_chat = compare_texts("prefix (chat)", p[ours]["texts"], p[peer]["texts"], peer, warn)
        out["ttft_solo"].update(llama_server_ms=s[peer]["ttft_ms"], ratio=ratio(s[ours]["ttft_ms"], s[peer]["ttft_ms"]))
        out["throughput"].update(llama_server_tok_s=t[peer]["tok_s"], ratio_llama_server=ratio(t[ours]["tok_s"], t[peer]["tok_s"]),
                                 llama_server=_without(t[peer], "text"))
        out["noisy_neighbour"].update(llama_server_p99_ms=n[peer]["p99_ms"], llama_server=n[peer])
        out["fairness"].update(llama_server_jain=f[peer]["jain"], llama_server=f[peer])
        out["prefix"] = {"ttft_ratio": ratio(p[ours]["ttft_p50_ms"], p[peer]["ttft_p50_ms"]),
                         "tok_s_ratio": ratio(p[ours]["tok_s"], p[peer]["tok_s"]), "texts_identical": same_chat,
                         "amphibia": _without(p[ours], "texts"), "llama_server": _without(p[peer], "texts")}
        i = r["interference"]
        out["interference"] = {"itl_p99_ratio": i[ours]["itl_p99_ratio"], "llama_server_itl_p99_ratio": i[peer]["itl_p99_ratio"],
                               "amphibia": i[ours], "llama_server": i[peer]}
    return out


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def main(args: argparse.Namespace) -> int:
    say = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    print(json.dumps(run(args.quick, say, lambda m: print(m, file=sys.stderr, flush=True))))
    return 0
