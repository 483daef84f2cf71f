"""`amphibia bench broker`: where one gateway process stops routing tokens, by simulation.

One asyncio loop holds the real `Broker` and speaks the real wire codec to simulated workers: no
model, no sockets. Each worker has `slots` slots and steps on a timer, one token per running
sequence a step, in the messages the batcher sends (Started, then Token per sequence or one
`tokens` frame per step, Done at max_tokens, Preempted, heartbeats). What the broker sends a worker
is encoded as the gateway's sender does and decoded on the worker's side; what a worker sends is
encoded, becomes readable on the loop after the step (a socket's read), and is decoded and handed to
`broker.on_message` exactly as `http/pool.py` does. Requests are real `GenerationJob`s submitted as
`PoolEngine.generate` does, read by a sink that counts what a stream would hand its reader.

Load: `apps` apps of mixed weights; `backlogged` of them always want more than their share (Poisson
arrivals well over what they are served, each client holding at most about twice its share of
slots in flight), the rest arrive now and then (Poisson), so the fair queue keeps lifting returning
apps. Requests are short or long (`max_tokens`), enough to keep every slot busy.

Measured over a window after the slots fill: tokens delivered to clients per second; process CPU
per token (the simulated workers included: they live in this process), and the gateway's share of it
(frames decoded and handled, requests submitted, housekeeping) and the broker's alone; from a Done
frame that frees a slot while requests wait, until the Assign for that slot is sent (a frame is read
when the loop gets to it, so loop lag counts); Jain's index of weighted service (the fair queue's
cost: prompt_weight per prefilled, generated_weight per generated token, over the app's weight) among
the apps that stayed backlogged; RSS. Then arrivals stop and every request must finish with all its
tokens. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import platform
import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from ..config import AppSpec, Limits, PoolConfig
from ..errors import AmphibiaError
from ..inference.pool import wire
from ..inference.pool.broker import Broker, WorkerLink
from ..inference.pool.jobs import GenerationJob
from ..inference.types import Generation, SamplingParams, Usage
from .chaos import pct, rss_mb

MODEL = "sim"
TOKEN_TEXT = " tok"  # every simulated token's text: four characters, about an average token's
WEIGHTS = (0.5, 1.0, 2.0, 4.0)  # app i has WEIGHTS[i % 4]


@dataclass(frozen=True)
class Shape:
    apps: int = 1000
    backlogged: int = 50  # apps that always want more than their share; Jain's index is over them
    workers: int = 64
    slots: int = 32
    step_ms: float = 20.0  # one token per running sequence per step: 50 tokens/s a slot
    warmup_s: float = 6.0
    measure_s: float = 40.0
    drain_s: float = 90.0  # at most, for every request to finish once arrivals stop
    drain_step_ms: float = 2.0  # workers step faster while draining: nothing is measured then
    coalesce: bool = True  # a `tokens` frame per worker step; else a `token` frame per sequence
    quantum_tokens: int = PoolConfig.quantum_tokens
    long_share: float = 0.2  # of requests
    short_tokens: tuple[int, int] = (16, 128)  # max_tokens, uniform between
    long_tokens: tuple[int, int] = (256, 768)
    prompt_tokens: tuple[int, int] = (16, 256)
    light_share: float = 0.15  # of arrivals, spread over the apps that are not backlogged
    # A backlogged app's client keeps at most this many times its share of the slots in flight: the
    # least-served app may hold far more than its share for a while (time slices take turns), and
    # all it holds must drain at the end.
    client_depth: float = 2.5
    overload: float = 1.5  # arrivals per second over the requests per second the slots can finish
    seed: int = 1

    @property
    def mean_tokens(self) -> float:
        return ((1 - self.long_share) * sum(self.short_tokens) + self.long_share * sum(self.long_tokens)) / 2

    @property
    def offered_tok_s(self) -> float:
        """What the workers generate with every slot busy and every step on time."""
        return self.workers * self.slots * 1000 / self.step_ms


QUICK = Shape(warmup_s=3.0, measure_s=6.0)


class Client:
    """One request's reader, as cheap as one can be: it counts what a stream hands its reader."""

    __slots__ = ("sim", "app", "max_tokens", "pieces", "chars", "usage", "reason", "error")

    def __init__(self, sim: "Simulation", app: str, max_tokens: int) -> None:
        self.sim, self.app, self.max_tokens = sim, app, max_tokens
        self.pieces = self.chars = 0
        self.usage: Usage | None = None
        self.reason = ""
        self.error: AmphibiaError | None = None

    def token(self, text: str) -> None:
        self.pieces += 1
        self.chars += len(text)
        self.sim.delivered[self.app] += 1

    def done(self, usage: Usage, finish_reason: str) -> None:
        self.usage, self.reason = usage, finish_reason
        self.sim.ended(self)

    def fail(self, error: AmphibiaError) -> None:
        self.error = error
        self.sim.ended(self)


class SimWorker:
    """A worker without a model. The gateway's side of its link encodes what the broker sends into
    `inbox`; its own side reads that with the wire codec at the next step, like the batcher's turn:
    handle messages, admit waiting sequences into free slots, then one token for every sequence."""

    def __init__(self, sim: "Simulation", index: int) -> None:
        self.sim = sim
        self.link = WorkerLink(id=f"sim{index}", models=[MODEL], slots=sim.shape.slots, device="simulated",
                               send=self.receive)
        self.inbox: list[str] = []  # frames the gateway wrote, not read yet
        self.waiting: deque[wire.Assign] = deque()
        self.active: dict[str, list] = {}  # id -> [generated, max_tokens, prompt_tokens]
        self.token_ids = index * 1000
        self.next_beat = 0.0
        self.freed_at: float | None = None  # a Done frame being handled: when it became readable

    def receive(self, msg: wire.Message) -> None:
        """The gateway's sender: the frame it would write to this worker's socket."""
        self.inbox.append(msg.encode())
        if self.freed_at is not None and type(msg) is wire.Assign:  # the freed slot, given again
            self.sim.reassign.append(time.perf_counter() - self.freed_at)
            self.freed_at = None

    def step(self, now: float) -> None:
        out: list[wire.Message] = []
        frames, self.inbox = self.inbox, []
        for frame in frames:
            self._handle(wire.decode(frame, wire.GATEWAY_TO_WORKER), out)
        slots, active, cost = self.sim.shape.slots, self.active, self.sim.prefilled
        while self.waiting and len(active) < slots:
            assign = self.waiting.popleft()
            prompt = assign.prompt.count(" ") if assign.prompt else 0
            active[assign.id] = [assign.resume_tokens, assign.params["max_tokens"], prompt]
            prefill = prompt + assign.resume_tokens  # the slot's old KV is not reused here
            cost[self.sim.app_of[assign.id]] += prefill
            out.append(wire.Started(assign.id, prompt, prefill))
        ended: list[wire.Message] = []
        jobs: list[str] = []
        ids: list[list[int]] = []
        for job_id, seq in active.items():
            seq[0] += 1
            self.token_ids += 1
            jobs.append(job_id)
            ids.append([self.token_ids & 0xFFFF])
            if seq[0] >= seq[1]:
                ended.append(wire.Done(job_id, seq[2], seq[0], "length"))
        for done in ended:
            del active[done.id]  # type: ignore[attr-defined]
        if jobs:
            if self.sim.shape.coalesce:
                count = len(jobs)
                out.append(wire.Tokens(jobs, [TOKEN_TEXT] * count, [1] * count, ids))
            else:
                out += [wire.Token(job_id, TOKEN_TEXT, 1, i) for job_id, i in zip(jobs, ids)]
        out += ended
        if now >= self.next_beat:
            self.next_beat = now + self.sim.config.heartbeat_s
            out.append(wire.Heartbeat(jobs=[*active, *(a.id for a in self.waiting)]))
        if out:
            self.sim.readable(self, [m.encode() for m in out])

    def _handle(self, msg: wire.Message, out: list[wire.Message]) -> None:
        if isinstance(msg, wire.Assign):
            self.waiting.append(msg)
        elif isinstance(msg, (wire.Cancel, wire.Preempt)):
            cancel = isinstance(msg, wire.Cancel)
            for i, waiting in enumerate(self.waiting):
                if waiting.id == msg.id:
                    del self.waiting[i]
                    if cancel:
                        out.append(wire.Done(waiting.id, 0, waiting.resume_tokens, "cancelled"))
                    break
            seq = self.active.pop(msg.id, None)
            if seq is not None and cancel:
                out.append(wire.Done(msg.id, seq[2], seq[0], "cancelled"))
            if not cancel:
                self.sim.preemptions += 1
                out.append(wire.Preempted(msg.id))


class Simulation:
    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.config = PoolConfig(max_queue=1_000_000, quantum_tokens=shape.quantum_tokens)
        self.broker = Broker(self.config)
        self.rng = random.Random(shape.seed)
        limits = Limits(max_concurrent=1_000_000, llm_timeout_s=3600.0, max_queue_wait_s=3600.0)
        self.apps = [AppSpec(name=f"app{i}", path=Path("."), weight=WEIGHTS[i % len(WEIGHTS)], limits=limits)
                     for i in range(shape.apps)]
        self.heavy = self.apps[:shape.backlogged]
        self.light = self.apps[shape.backlogged:]
        total_weight = sum(a.weight for a in self.heavy) or 1.0
        slots = shape.workers * shape.slots
        self.share = {a.name: slots * a.weight / total_weight for a in self.heavy}  # of the slots, at most
        self.cap = {a.name: int(shape.client_depth * self.share[a.name]) + 8 for a in self.heavy}
        self.heavy_weights = [a.weight for a in self.heavy]
        self.rate = shape.overload * shape.offered_tok_s / shape.mean_tokens  # arrivals per second
        self.prompts = {n: "w " * n for n in range(shape.prompt_tokens[0], shape.prompt_tokens[1] + 1)}
        self.workers = [SimWorker(self, i) for i in range(shape.workers)]
        self.app_of: dict[str, str] = {}  # job id -> app, for the workers' prefill accounting
        self.outstanding: dict[str, int] = defaultdict(int)
        self.delivered: dict[str, int] = defaultdict(int)  # tokens each app's clients read
        self.prefilled: dict[str, int] = defaultdict(int)  # tokens the workers prefilled for each app
        self.clients: list[Client] = []
        self.finished = self.held = 0
        self.reassign: list[float] = []
        self.lag: list[float] = []
        self.gateway_cpu = self.broker_cpu = self.sim_cpu = 0.0
        self.frames = self.preemptions = 0
        self.step_s = shape.step_ms / 1000
        self.arriving = True
        self.running = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self.all_done: asyncio.Event | None = None

    # --- clients ---------------------------------------------------------------------------------
    def submit(self, app: AppSpec | None = None) -> None:
        shape, rng = self.shape, self.rng
        if app is not None:
            pass
        elif rng.random() < shape.light_share or not self.heavy:
            app = rng.choice(self.light)
        else:
            app = rng.choices(self.heavy, self.heavy_weights)[0]
            if self.outstanding[app.name] >= self.cap[app.name]:
                self.held += 1  # that client has enough in flight: it holds this one back
                return
        span = shape.long_tokens if rng.random() < shape.long_share else shape.short_tokens
        max_tokens = rng.randint(*span)
        prompt = self.prompts[rng.randint(*shape.prompt_tokens)]
        client = Client(self, app.name, max_tokens)
        job = GenerationJob(app, Generation(MODEL, SamplingParams(max_tokens=max_tokens), prompt=prompt), client)
        self.app_of[job.id] = app.name
        self.outstanding[app.name] += 1
        self.clients.append(client)
        started = time.thread_time()
        self.broker.submit(job)  # as PoolEngine.generate does on the loop
        spent = time.thread_time() - started
        self.broker_cpu += spent
        self.gateway_cpu += spent

    def ended(self, client: Client) -> None:
        self.outstanding[client.app] -= 1
        self.finished += 1
        if not self.arriving and self.finished == len(self.clients) and self.all_done is not None:
            self.all_done.set()

    async def arrivals(self) -> None:
        assert self.loop is not None
        next_at = self.loop.time()
        while self.arriving:
            now = self.loop.time()
            while next_at <= now:
                self.submit()
                next_at += self.rng.expovariate(self.rate)
            await asyncio.sleep(0.005)

    # --- the gateway's side of the workers' sockets ---------------------------------------------
    def readable(self, worker: SimWorker, frames: list[str]) -> None:
        assert self.loop is not None
        self.loop.call_soon(self.read, worker, frames, time.perf_counter())

    def read(self, worker: SimWorker, frames: list[str], sent_at: float) -> None:
        """What `http/pool.py` does with each frame a worker sends."""
        started = time.thread_time()
        link, broker = worker.link, self.broker
        in_broker = 0.0
        for frame in frames:
            msg = wire.decode(frame, wire.WORKER_TO_GATEWAY)
            if type(msg) is wire.Done:
                worker.freed_at = sent_at
            entered = time.thread_time()
            broker.on_message(link, msg)
            in_broker += time.thread_time() - entered
            worker.freed_at = None
        self.frames += len(frames)
        self.broker_cpu += in_broker
        self.gateway_cpu += time.thread_time() - started

    async def housekeeping(self) -> None:
        while self.running:
            await asyncio.sleep(0.25)  # as Broker.housekeeping
            started = time.thread_time()
            self.broker.expire()
            spent = time.thread_time() - started
            self.broker_cpu += spent
            self.gateway_cpu += spent

    # --- the workers ----------------------------------------------------------------------------
    def start_worker(self, worker: SimWorker, first: float) -> None:
        assert self.loop is not None
        loop = self.loop

        def tick(due: float) -> None:
            if not self.running:
                return
            now = loop.time()
            self.lag.append(now - due)
            started = time.thread_time()
            worker.step(now)
            self.sim_cpu += time.thread_time() - started
            # Each worker keeps its own phase (real ones do not wait on the gateway): a step the loop
            # reached late is not made up for, and the next is the next on its own clock, so that
            # the workers do not drift into stepping all at once.
            due += self.step_s * max(1, math.ceil((now - due) / self.step_s))
            loop.call_at(due, tick, due)

        loop.call_at(first, tick, first)

    # --- the run ----------------------------------------------------------------------------------
    def sample(self) -> tuple[set[str], float]:
        """The apps backlogged now (more requests in the broker than their share of the slots: they
        could use more than they get), and the share of slots busy."""
        backlogged = {a.name for a in self.heavy if self.outstanding[a.name] > self.share[a.name]}
        busy = sum(len(w.active) for w in self.workers)
        return backlogged, busy / (self.shape.workers * self.shape.slots)

    async def run(self) -> dict:
        shape, broker = self.shape, self.broker
        self.loop = asyncio.get_running_loop()
        self.all_done = asyncio.Event()
        for worker in self.workers:
            broker.add_worker(worker.link)
        t0 = self.loop.time()
        for i, worker in enumerate(self.workers):
            self.start_worker(worker, t0 + self.step_s * i / len(self.workers))
        # The backlogged apps' clients start with all they may have in flight, so that every one is
        # backlogged from the first step: the fair queue's counters start level and stay so.
        for app in self.heavy:
            for _ in range(self.cap[app.name]):
                self.submit(app)
        tasks = [asyncio.create_task(self.arrivals()), asyncio.create_task(self.housekeeping())]
        await asyncio.sleep(shape.warmup_s)

        # the window
        self.lag.clear()
        self.reassign.clear()
        before = self._counters()
        wall, cpu = time.perf_counter(), time.process_time()
        backlogged = {a.name for a in self.heavy}
        occupancy: list[float] = []
        end = self.loop.time() + shape.measure_s
        while self.loop.time() < end:
            await asyncio.sleep(0.1)
            waiting, busy = self.sample()
            backlogged &= waiting
            occupancy.append(busy)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = self._counters()
        rss = rss_mb(os.getpid())
        reassign, lag = sorted(self.reassign), sorted(self.lag)

        # drain: no more arrivals; every request must finish with all its tokens
        self.arriving = False
        self.step_s = shape.drain_step_ms / 1000
        drain_started = time.perf_counter()
        if self.finished < len(self.clients):
            try:
                await asyncio.wait_for(self.all_done.wait(), shape.drain_s)
            except asyncio.TimeoutError:
                pass
        drain_s = time.perf_counter() - drain_started
        self.running = False
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        tokens = after["tokens"] - before["tokens"]
        per_token = 1e6 / max(tokens, 1)
        gateway_us = (after["gateway_cpu"] - before["gateway_cpu"]) * per_token
        weights = {a.name: a.weight for a in self.apps}
        cost = {a: (self.config.prompt_weight * (after["prefilled"][a] - before["prefilled"][a])
                    + self.config.generated_weight * (after["delivered"][a] - before["delivered"][a])) / weights[a]
                for a in backlogged}
        served = {a: (after["delivered"][a] - before["delivered"][a]) / weights[a] for a in backlogged}
        complete = [c for c in self.clients if c.error is None and c.usage is not None and c.reason == "length"
                    and c.pieces == c.max_tokens == c.usage.generated_tokens
                    and c.chars == c.max_tokens * len(TOKEN_TEXT)]
        return {
            "benchmark": "broker", "coalesce": shape.coalesce, "apps": shape.apps, "backlogged_apps": len(backlogged),
            "workers": shape.workers, "slots": shape.slots, "step_ms": shape.step_ms, "window_s": round(wall, 1),
            "offered_tok_s": round(shape.offered_tok_s),
            "routed_tok_s": round(tokens / wall),
            "process_cpu_share": round(cpu / wall, 2),  # near 1: the loop had no idle time left
            "occupancy": round(sum(occupancy) / max(len(occupancy), 1), 3),
            "cpu_us_per_token": round(cpu * per_token, 2),
            "gateway_cpu_us_per_token": round(gateway_us, 2),
            "broker_cpu_us_per_token": round((after["broker_cpu"] - before["broker_cpu"]) * per_token, 2),
            "sim_cpu_us_per_token": round((after["sim_cpu"] - before["sim_cpu"]) * per_token, 2),
            # What one gateway process would route if it did only the gateway's part (the simulated
            # workers are other processes, other machines, in a real pool).
            "gateway_ceiling_tok_s": round(1e6 / gateway_us) if gateway_us else None,
            "frames_in_s": round((after["frames"] - before["frames"]) / wall),
            "reassign_p50_ms": round(pct(reassign, 50) * 1000, 2) if reassign else None,
            "reassign_p99_ms": round(pct(reassign, 99) * 1000, 2) if reassign else None,
            "reassign_max_ms": round(reassign[-1] * 1000, 2) if reassign else None,
            "reassign_samples": len(reassign),
            "step_lag_p99_ms": round(pct(lag, 99) * 1000, 2) if lag else None,
            "jain": round(jain(list(cost.values())), 4),
            "jain_tokens": round(jain(list(served.values())), 4),
            "preemptions_s": round((after["preemptions"] - before["preemptions"]) / wall),
            "requests_s": round((after["finished"] - before["finished"]) / wall),
            "submitted": len(self.clients), "finished": self.finished, "complete": len(complete),
            "held_by_clients": self.held, "drain_s": round(drain_s, 1),
            "left_in_broker": len(broker.jobs),
            "rss_mb": round(rss, 1), "load_avg_1m": round(os.getloadavg()[0], 1),
        }

    def _counters(self) -> dict:
        return {"tokens": sum(self.delivered.values()), "delivered": dict(self.delivered),
                "prefilled": dict(self.prefilled), "gateway_cpu": self.gateway_cpu, "broker_cpu": self.broker_cpu,
                "sim_cpu": self.sim_cpu, "frames": self.frames, "finished": self.finished,
                "preemptions": self.preemptions}


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one has everything."""
    if not values:
        return 0.0
    square = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * square) if square else 1.0


def run(shape: Shape = Shape(), quick: bool = False) -> dict:
    gc.collect()
    started = time.perf_counter()
    broker_log = logging.getLogger("amphibia.broker")
    level = broker_log.level
    broker_log.setLevel(logging.WARNING)  # not 64 "worker joined" lines
    try:
        result = asyncio.run(Simulation(shape).run())
    finally:
        broker_log.setLevel(level)
    result = {**result, "quick": quick, "run_s": round(time.perf_counter() - started, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    return result


def main(args: argparse.Namespace) -> int:
    result = run(QUICK if args.quick else Shape(), quick=args.quick)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    print(json.dumps(result))
    return 0
