"""`amphibia bench chaos`: a gateway with 3 supervised worker processes under mixed load, while
workers are SIGKILLed, clients drop their connections and bad inputs arrive; then every request is
accounted for.

Load: server-side guests (greedy completions), OpenAI clients (streaming and not), pages over the
browser bridge (real WebSockets), embeddings. Chaos: a random worker SIGKILLed every `kill_every_s`
(the gateway's supervisor restarts it), requests abandoned by their clients, lone surrogates, huge
embedding batches, oversized, garbage and flooding bridge frames, sleeping and spinning guests.

Each request ends as one of: completed (greedy ones with text identical to an undisturbed run,
else counted in `text_mismatch`), failed_clear (an error status with a JSON error, a `failed` frame,
or the close code the protocol promises, within its deadline), dropped (the client gave up on
purpose), lost (anything else: a broken connection, a bad answer) or hung (no answer by its deadline).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import websockets

from ..loopback import free_port
from .pool import wait_ready

APP_DIR = Path(__file__).parent / "apps" / "chaos"
KEY = {"authorization": "Bearer key-chaos"}
WORKERS, SLOTS = 3, 4
LLM_TIMEOUT_S = 30.0
GRACE_S = 10.0  # past a request's own deadline, a client that still has no answer calls it hung
PROMPTS = [f"{start}, {start + 1}, {start + 2}," for start in (1, 10, 20, 40, 70, 100)]
MAX_TOKENS = 24


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    text_mismatch: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # one example per bad outcome, for the log

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.by_kind.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("lost", "hung") and outcome not in self.examples:
            self.examples[outcome] = f"{kind}: {detail}"[:300]


def clear_error(res: httpx.Response) -> bool:
    try:
        error = res.json().get("error")
    except ValueError:
        return False
    return res.status_code >= 400 and isinstance(error, dict) and "type" in error


class Chaos:
    def __init__(self, url: str, gateway: subprocess.Popen, quick: bool, say: Callable[[str], None]) -> None:
        self.url, self.ws_url, self.gateway, self.say = url, url.replace("http://", "ws://"), gateway, say
        self.quick = quick
        self.tally = Tally()
        self.baseline: dict[str, str] = {}
        self.kills: list[float] = []
        self.recoveries: list[float] = []
        self.stop_at = 0.0
        self.client = httpx.AsyncClient(timeout=LLM_TIMEOUT_S + GRACE_S)

    # --- one request of each kind ---------------------------------------------------------------
    async def judged(self, kind: str, request: Awaitable[tuple[str, str]]) -> None:
        try:
            outcome, detail = await asyncio.wait_for(request, LLM_TIMEOUT_S + GRACE_S)
        except asyncio.TimeoutError:
            outcome, detail = "hung", "no answer"
        except (httpx.TransportError, OSError, websockets.WebSocketException) as exc:
            outcome, detail = "lost", repr(exc)
        self.tally.add(kind, outcome, detail)

    def greedy(self, prompt: str, text: str) -> tuple[str, str]:
        if text != self.baseline[prompt]:
            self.tally.text_mismatch += 1
        return "completed", ""

    async def guest(self) -> tuple[str, str]:
        prompt = random.choice(PROMPTS)
        res = await self.client.post(f"{self.url}/apps/chaos/", json={"prompt": prompt, "max_tokens": MAX_TOKENS})
        if res.status_code == 200:
            return self.greedy(prompt, res.json()["text"])
        return ("failed_clear", "") if clear_error(res) else ("lost", f"{res.status_code} {res.text[:200]}")

    async def openai(self, stream: bool) -> tuple[str, str]:
        prompt = random.choice(PROMPTS)
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
        if not stream:
            res = await self.client.post(f"{self.url}/v1/completions", json=body, headers=KEY)
            if res.status_code == 200:
                return self.greedy(prompt, res.json()["choices"][0]["text"])
            return ("failed_clear", "") if clear_error(res) else ("lost", f"{res.status_code} {res.text[:200]}")
        text, finished = "", False
        async with self.client.stream("POST", f"{self.url}/v1/completions", json=body, headers=KEY) as res:
            if res.status_code != 200:
                await res.aread()
                return ("failed_clear", "") if clear_error(res) else ("lost", f"{res.status_code}")
            async for line in res.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "failed_clear", ""
                text += chunk["choices"][0]["text"]
        return self.greedy(prompt, text) if finished else ("lost", "stream ended without [DONE]")

    async def token(self) -> str:
        res = await self.client.get(f"{self.url}/bridge/token", params={"app": "chaos"})
        res.raise_for_status()
        return res.json()["token"]

    async def page(self) -> tuple[str, str]:
        prompt = random.choice(PROMPTS)
        async with websockets.connect(f"{self.ws_url}/bridge?token={await self.token()}", origin=self.url) as ws:
            await ws.send(json.dumps({"type": "assign", "id": "p", "model": "", "prompt": prompt,
                                      "params": {"temperature": 0.0, "max_tokens": MAX_TOKENS}}))
            text = ""
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "token":
                    text += msg["text"]
                elif msg["type"] == "done":
                    return self.greedy(prompt, text)
                elif msg["type"] == "failed":
                    return "failed_clear", ""

    async def embeddings(self) -> tuple[str, str]:
        texts = [f"chaos text {random.randint(0, 10**6)}" for _ in range(random.choice((1, 4, 20)))]
        res = await self.client.post(f"{self.url}/v1/embeddings", json={"model": "minilm", "input": texts},
                                     headers=KEY)
        if res.status_code == 200 and len(res.json()["data"]) == len(texts):
            return "completed", ""
        return ("failed_clear", "") if clear_error(res) else ("lost", f"{res.status_code} {res.text[:200]}")

    # --- bad clients ------------------------------------------------------------------------------
    async def expect_error(self, method: str, path: str, status: int, **kwargs: object) -> tuple[str, str]:
        res = await self.client.request(method, f"{self.url}{path}", **kwargs)  # type: ignore[arg-type]
        if res.status_code == status and clear_error(res):
            return "failed_clear", ""
        return "lost", f"{path}: expected {status}, got {res.status_code} {res.text[:200]}"

    async def expect_close(self, frames: list[str], code: int) -> tuple[str, str]:
        try:
            async with websockets.connect(f"{self.ws_url}/bridge?token={await self.token()}", origin=self.url,
                                          max_size=None) as ws:
                for frame in frames:
                    await ws.send(frame)
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed as closed:
            got = closed.rcvd.code if closed.rcvd else None
            return ("failed_clear", "") if got == code else ("lost", f"closed with {got}, expected {code}")

    async def dropped(self) -> tuple[str, str]:
        """A client that gives up half a second in; the gateway must free what it started."""
        body = {"model": "smollm2", "prompt": random.choice(PROMPTS), "max_tokens": 200, "temperature": 0}
        try:
            await self.client.post(f"{self.url}/v1/completions", json=body, headers=KEY, timeout=0.5)
        except httpx.TimeoutException:
            return "dropped", ""
        return "completed", ""

    def bad_requests(self) -> list[tuple[str, Callable[[], Awaitable[tuple[str, str]]]]]:
        ping = json.dumps({"type": "call", "id": "t", "model": "smollm2", "method": "tokenize", "args": {"text": "x"}})
        return [
            ("lone_surrogate", lambda: self.expect_error(
                "POST", "/v1/embeddings", 400, headers={**KEY, "content-type": "application/json"},
                content=b'{"model": "minilm", "input": ["\\ud800"]}')),
            ("huge_batch", lambda: self.expect_error("POST", "/v1/embeddings", 400, headers=KEY,
                                                     json={"model": "minilm", "input": ["x"] * 300})),
            ("huge_body", lambda: self.expect_error("POST", "/v1/chat/completions", 413, headers=KEY,
                                                    content=b"x" * (3 << 20))),
            ("oversized_frame", lambda: self.expect_close(["x" * (2 << 20)], 1009)),
            ("garbage_frame", lambda: self.expect_close(['{"type": "nonsense"}'], 4400)),
            ("flood", lambda: self.expect_close([ping] * 200, 4429)),
            ("sleeping_guest", lambda: self.expect_error("GET", "/apps/chaos/sleep", 504)),
            ("spinning_guest", lambda: self.expect_error("GET", "/apps/chaos/spin", 504)),
            ("dropped_client", self.dropped),
        ]

    # --- drivers ----------------------------------------------------------------------------------
    async def keep_sending(self, kind: str, make: Callable[[], Awaitable[tuple[str, str]]]) -> None:
        while time.monotonic() < self.stop_at:
            await self.judged(kind, make())

    async def misbehave(self) -> None:
        bad = self.bad_requests()
        while time.monotonic() < self.stop_at:
            kind, make = random.choice(bad)
            await self.judged(kind, make())
            await asyncio.sleep(random.uniform(0.2, 1.0))

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.gateway.pid and b"worker" in cmdline:
                pids.append(int(entry.name))
        return pids

    async def worker_ids(self) -> set[str]:
        return {w["id"] for w in (await self.client.get(f"{self.url}/pool")).json()["workers"]}

    async def killer(self, every_s: float) -> None:
        while time.monotonic() + every_s < self.stop_at:
            await asyncio.sleep(every_s * random.uniform(0.7, 1.3))
            pids = self.worker_pids()
            if not pids:
                continue
            # The pool is whole again when every worker is back: the WORKERS generation workers, and
            # the embedding model's, which `amphibia up` started for the first embeddings request.
            before = await self.worker_ids()
            os.kill(random.choice(pids), signal.SIGKILL)
            killed = time.monotonic()
            self.kills.append(killed)
            await asyncio.sleep(0.3)  # the gateway notices the dropped socket
            while not before <= await self.worker_ids():
                await asyncio.sleep(0.1)
            self.recoveries.append(time.monotonic() - killed)
            self.say(f"worker killed; pool back at {len(before)} workers in {self.recoveries[-1]:.1f} s")

    async def run(self, seconds: float) -> dict:
        self.say("baseline: each prompt once, undisturbed")
        for prompt in PROMPTS:
            body = {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            res = await self.client.post(f"{self.url}/v1/completions", json=body, headers=KEY)
            self.baseline[prompt] = res.json()["choices"][0]["text"]
        rss_before = rss_mb(self.gateway.pid)
        self.stop_at = time.monotonic() + seconds
        self.say(f"load and chaos for {seconds:g} s")
        drivers = [self.keep_sending("guest", self.guest), self.keep_sending("guest", self.guest),
                   self.keep_sending("openai", lambda: self.openai(False)),
                   self.keep_sending("openai_stream", lambda: self.openai(True)),
                   self.keep_sending("openai_stream", lambda: self.openai(True)),
                   self.keep_sending("page", self.page), self.keep_sending("page", self.page),
                   self.keep_sending("embeddings", self.embeddings), self.misbehave(),
                   self.killer(8.0 if self.quick else 15.0)]
        await asyncio.gather(*drivers)
        leaked = await self.drain()
        rss_after = rss_mb(self.gateway.pid)
        await self.client.aclose()
        t = self.tally
        return {
            "requests": sum(t.outcomes.values()), "completed": t.outcomes["completed"],
            "failed_clear": t.outcomes["failed_clear"], "dropped": t.outcomes["dropped"],
            "lost": t.outcomes["lost"], "hung": t.outcomes["hung"], "text_mismatch": t.text_mismatch,
            "slots_leaked": leaked, "worker_kills": len(self.kills),
            "recovery_p99_s": round(pct(self.recoveries, 99), 2) if self.recoveries else None,
            "recovery_max_s": round(max(self.recoveries), 2) if self.recoveries else None,
            "gateway_rss_growth_mb": round(rss_after - rss_before, 1),
            "by_kind": {k: dict(v) for k, v in sorted(t.by_kind.items())}, "examples": t.examples,
        }

    async def drain(self, wait_s: float = 15.0) -> int:
        """Slots still busy and queues still non-empty once the load has stopped (and had time to end)."""
        deadline = time.monotonic() + wait_s
        while True:
            pool = (await self.client.get(f"{self.url}/pool")).json()
            busy = sum(len(w["running"]) for w in pool["workers"]) + pool["queued"]
            if busy == 0 or time.monotonic() > deadline:
                return busy
            await asyncio.sleep(0.25)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_gateway(workdir: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    (workdir / "amphibia.toml").write_text(f"""
[server]
guest_threads = 16
queue_limit = 64
[pool]
token = "chaos"
local_workers = {WORKERS}
local_slots = {SLOTS}
max_queue = 512
[limits]
max_concurrent = 64
max_queue_wait_s = 20
llm_timeout_s = {LLM_TIMEOUT_S}
[models.smollm2]
n_ctx = 1024
[apps.chaos]
path = "{APP_DIR}"
[api_keys]
"key-chaos" = "chaos-api"
""")
    log = (workdir / "gateway.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "amphibia.cli", "up", str(workdir / "amphibia.toml"), "--port",
                             str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/healthz")
    deadline = time.time() + 600  # the first run builds the chaos app
    while httpx.get(url + "/healthz").json()["building"] or len(httpx.get(url + "/pool").json()["workers"]) < WORKERS:
        if time.time() > deadline:
            raise RuntimeError("the app was not built or the workers did not join")
        time.sleep(0.3)
    return url, proc


def run(quick: bool, say: Callable[[str], None]) -> dict:
    seconds = 40.0 if quick else 180.0
    random.seed(7)
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = start_gateway(Path(tmp))
        try:
            result = asyncio.run(Chaos(url, proc, quick, say).run(seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"benchmark": "chaos", "quick": quick, "seconds": seconds, "workers": WORKERS, **result,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}


def main(args: argparse.Namespace) -> int:
    say = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    print(json.dumps(run(args.quick, say)))
    return 0
