"""Pool workers as Ray actors: placed by resources on a cluster, restarted by Ray, scaled by the broker.

Each actor runs the ordinary worker (`worker.run`: one model, continuous batching, the same wire
protocol) and dials the gateway's `/pool` back with the pool token, exactly like `amphibia worker`
on a machine of its own; the broker cannot tell them apart. What Ray adds:
- placement: an actor asks for `num_cpus`, `num_gpus` and custom resources, so a GPU worker lands
  on a GPU node (and, on a cluster with Ray's autoscaler, asking for one is what brings a GPU node up);
- restarts: an actor that dies (its node lost, the OOM killer, a kill) is restarted by Ray up to
  `max_restarts` times and its `serve` call retried; it dials in with the same worker id, and the
  broker's failover has already re-placed the requests it held;
- scaling: `Autoscaler` decides from the broker's queue waits and idle time; this module carries it out.

A worker that fails to start (a model that is not there, say) raises in `serve`: that is reported
(GET /pool, the log) and not retried; after `max_failures` such failures in a row, placing stops.

Ray is an optional dependency (`pip install 'amphibia[ray]'`), imported only here, only when used.
Every Ray call blocks, so they run in a thread; the broker is read on the event loop only.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import Counter, Gauge

from ...config import ModelSpec, RayConfig
from ...errors import AmphibiaError
from ...sandbox.signals import kept_signal_handlers
from .autoscale import Autoscaler, Decision
from .broker import Broker

log = logging.getLogger("amphibia.ray")
TICK_S = 1.0


class WorkerActor:
    """The body of a worker actor (made a Ray actor class by `_actor_class`)."""

    def __init__(self, spec: ModelSpec, gateway: str, token: str, slots: int, worker_id: str) -> None:
        self.spec, self.gateway, self.token, self.slots, self.worker_id = spec, gateway, token, slots, worker_id

    def serve(self) -> None:
        """Run the worker until the actor is killed. On the actor's main thread: llama.cpp's decode
        is about a third slower from any other thread (see worker.py)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .worker import WorkerOptions, run

        self.spec.gguf_path()  # a model that is not there fails here, as a clear error, before any loading
        run(WorkerOptions(gateway=self.gateway, token=self.token, model=self.spec, slots=self.slots,
                          worker_id=self.worker_id))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise AmphibiaError("placing workers with Ray needs Ray: pip install 'amphibia[ray]'") from None
    return ray


@dataclass
class Placed:
    id: str
    actor: Any
    ref: Any  # serve()'s result: ready only when the worker ended or failed
    since: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting -> joined (the broker has it); failed
    error: str = ""
    stopping: bool = False
    extra: bool = False  # an embedding model's worker: one per model, placed on demand, never scaled

    def as_json(self, now: float) -> dict:
        return {"id": self.id, "state": self.state, "for_s": round(now - self.since, 1),
                **({"error": self.error} if self.error else {})}


class RayWorkers:
    def __init__(self, config: RayConfig, model: ModelSpec, gateway_url: str, token: str, broker: Broker,
                 extra_models: dict[str, ModelSpec] | None = None) -> None:
        self.config, self.broker, self.gateway_url, self.token = config, broker, gateway_url, token
        # Embedding models the apps use: one small actor each (1 CPU, 1 slot), placed when a request
        # first needs it, as the local gateway starts its embedding worker.
        self.extra_models = {name: replace(spec, threads=1) for name, spec in (extra_models or {}).items()}
        threads = max(1, int(config.num_cpus))
        gpu_layers = config.gpu_layers if config.num_gpus > 0 else model.gpu_layers
        self.model = replace(model, threads=threads, gpu_layers=gpu_layers)
        self.autoscaler = Autoscaler(config)
        self.placed: dict[str, Placed] = {}
        self.failed: list[Placed] = []  # the last few workers that could not start or died for good
        self.decisions: list[Decision] = []
        self.failures_in_a_row = 0
        self.extra_failures: dict[str, int] = {}  # embedding worker id -> its failed starts
        self.error = ""  # why placing stopped, if it did
        self._numbers = itertools.count(1)
        self._actor_cls: Any = None
        self._task: asyncio.Task | None = None
        registry = broker.metrics.registry
        self.decided = Counter("amphibia_autoscale_decisions", "Workers added or removed by the autoscaler",
                               ["direction"], registry=registry)
        self.states = Gauge("amphibia_ray_workers", "Ray worker actors by state", ["state"], registry=registry)
        broker.wait_listeners.append(lambda waited: self.autoscaler.observe_wait(time.monotonic(), waited))
        broker.unserved_listeners.append(self._unserved)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the cluster (a clear error if there is none) and start the placing loop."""
        await asyncio.to_thread(self._connect)
        self._task = asyncio.create_task(self._run(), name="ray-workers")

    def _connect(self) -> None:
        ray = _ray()
        try:
            # ray.init installs fault handlers in front of wasmtime's: the next guest trap would kill
            # the gateway instead of ending one request (see sandbox/signals.py).
            with kept_signal_handlers():
                ray.init(address=self.config.address, namespace="amphibia", log_to_driver=False,
                         ignore_reinit_error=True, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise AmphibiaError(f"no Ray cluster at {self.config.address!r} ({exc}); start one with "
                                f"`ray start --head` or set [pool.ray] address") from None
        self._actor_cls = ray.remote(WorkerActor)
        log.info("ray: connected to %s (%s); placing %d-%d worker(s) of %s, %d slots, %g CPU, %g GPU each",
                 self.config.address, ray.cluster_resources(), self.config.min_workers, self.config.max_workers,
                 self.model.name, self.config.slots, self.config.num_cpus, self.config.num_gpus)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        actors = [p.actor for p in self.placed.values() if p.actor is not None]
        self.placed.clear()
        await asyncio.to_thread(self._kill, actors)

    @staticmethod
    def _kill(actors: list[Any]) -> None:
        ray = _ray()
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone: nothing to stop
                log.debug("ray: kill: %s", exc)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad tick (the cluster briefly unreachable) must not end the loop
                log.exception("ray: placing loop")
            await asyncio.sleep(TICK_S)

    # --- one look at the cluster and the broker ----------------------------------------------------------
    async def tick(self) -> None:
        ended = await asyncio.to_thread(self._ended, [p for p in self.placed.values()])
        for placed, error in ended:
            self._lost(placed, error)
        for placed in self.placed.values():
            if placed.state == "starting" and placed.id in self.broker.workers:
                placed.state = "joined"
                self.failures_in_a_row = 0
                log.info("ray: worker %s joined after %.1f s", placed.id, time.monotonic() - placed.since)
        now = time.monotonic()
        waiting = [now - j.enqueued for q in self.broker.queues.values() for j in q if not j.started]
        busy = any(w.running or w.calls for w in self.broker.workers.values())
        live = [p for p in self.placed.values() if not p.stopping and not p.extra]
        decision = self.autoscaler.decide(now, time.time(), len(live), waiting, busy)
        if decision is not None:
            await self._carry_out(decision)
        self._count()

    def _ended(self, placed: list[Placed]) -> list[tuple[Placed, str]]:
        """The workers whose `serve` ended, and why (it only ends by failing)."""
        if not placed:
            return []
        ray = _ray()
        refs = {p.ref: p for p in placed if p.ref is not None}
        if not refs:
            return []
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            try:
                ray.get(ref)
                error = "the worker exited"
            except Exception as exc:  # RayTaskError (it raised) or RayActorError (it died past its restarts)
                error = _reason(exc)
            out.append((refs[ref], error))
        return out

    def _lost(self, placed: Placed, error: str) -> None:
        self.placed.pop(placed.id, None)
        if placed.stopping:
            return
        placed.state, placed.error = "failed", error
        self.failed = [*self.failed[-9:], placed]
        if placed.extra:  # an embedding worker's failures stop only its own placing
            self.extra_failures[placed.id] = self.extra_failures.get(placed.id, 0) + 1
            log.error("ray: worker %s failed: %s", placed.id, error)
            return
        self.failures_in_a_row += 1
        log.error("ray: worker %s failed: %s", placed.id, error)
        if self.failures_in_a_row >= self.config.max_failures and not self.error:
            self.error = (f"{self.failures_in_a_row} workers in a row failed to start or died; placing stopped "
                          f"(last: {error})")
            log.error("ray: %s", self.error)

    async def _carry_out(self, decision: Decision) -> None:
        if decision.direction == "up":
            if self.error:  # placing stopped: a worker that cannot start is not retried forever
                return
            worker_id = f"ray-{self.model.name}-{next(self._numbers)}"
            placed = await asyncio.to_thread(self._place, worker_id)
            self.placed[worker_id] = placed
        else:
            idle = [p for p in self.placed.values() if not p.stopping and not p.extra and not self._working(p.id)]
            if not idle:
                return  # every worker is busy after all: decide again next tick
            victim = min(idle, key=lambda p: (p.state == "joined", -p.since))  # a starting one, else the newest
            victim.stopping = True
            self.placed.pop(victim.id, None)
            await asyncio.to_thread(self._kill, [victim.actor])
        self.decisions = [*self.decisions[-49:], decision]
        self.decided.labels(decision.direction).inc()
        log.info("ray: scale %s (%s): %s", decision.direction, decision.reason,
                 f"placed {worker_id}" if decision.direction == "up" else f"stopped {victim.id}")

    def _unserved(self, model: str) -> None:
        """The broker has a request for `model` and no worker for it (on the event loop)."""
        worker_id = f"ray-{model}"
        if (model not in self.extra_models or worker_id in self.placed or self._actor_cls is None
                or self.extra_failures.get(worker_id, 0) >= self.config.max_failures):
            return
        log.info("ray: placing a worker for embedding model %s", model)
        self.placed[worker_id] = Placed(worker_id, None, None, extra=True)  # held while the actor is asked for
        asyncio.get_running_loop().create_task(self._place_extra(model, worker_id))

    async def _place_extra(self, model: str, worker_id: str) -> None:
        try:
            placed = await asyncio.to_thread(self._place, worker_id, self.extra_models[model], 1, 1.0, 0.0)
        except Exception as exc:  # Ray refused (no such resources, say): reported like a failed start
            self._lost(self.placed[worker_id], f"{type(exc).__name__}: {exc}")
            return
        placed.extra = True
        self.placed[worker_id] = placed

    def _working(self, worker_id: str) -> bool:
        link = self.broker.workers.get(worker_id)
        return link is not None and bool(link.running or link.calls)

    def _place(self, worker_id: str, model: ModelSpec | None = None, slots: int | None = None,
               num_cpus: float | None = None, num_gpus: float | None = None) -> Placed:
        cfg = self.config
        actor = self._actor_cls.options(
            num_cpus=cfg.num_cpus if num_cpus is None else num_cpus,
            num_gpus=cfg.num_gpus if num_gpus is None else num_gpus,
            resources=(dict(cfg.resources) or None) if model is None else None,
            max_restarts=cfg.max_restarts, max_task_retries=-1 if cfg.max_restarts else 0,
            name=f"amphibia-{worker_id}-{int(time.time())}",
        ).remote(model or self.model, self.gateway_url, self.token, slots or cfg.slots, worker_id)
        return Placed(worker_id, actor, actor.serve.remote())

    def _count(self) -> None:
        for state in ("starting", "joined"):
            self.states.labels(state).set(sum(1 for p in self.placed.values() if p.state == state))
        self.states.labels("failed").set(len(self.failed))

    # --- what GET /pool shows ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.monotonic()
        cfg = self.config
        return {
            "address": cfg.address, "model": self.model.name, "min_workers": cfg.min_workers,
            "max_workers": cfg.max_workers, "workers": [p.as_json(now) for p in self.placed.values()],
            "failed": [p.as_json(now) for p in self.failed], "decisions": [d.as_json() for d in self.decisions[-20:]],
            **({"error": self.error} if self.error else {}),
        }


def _reason(exc: BaseException) -> str:
    """The first line that says what went wrong, not Ray's whole traceback."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else type(exc).__name__)[:500]
