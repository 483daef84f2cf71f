"""The broker: every LLM request in the gateway, queued per app and placed on workers fairly.

Fairness is the Virtual Token Counter ("Fairness in Serving LLMs", OSDI'24): each app's counter
grows with the weighted tokens it is served (divided by its weight); when a slot frees, the
waiting request of the app with the smallest counter goes next, and an app that returns from idle
is lifted to the smallest counter among the busy ones so it cannot bank credit. Time slices: a
sequence that has generated `quantum_tokens` since it got its slot, while a less-served app
waits and no slot is free, is preempted; it is resumed later from its prompt plus the text it
already delivered, so its client sees only latency. A worker that drops has its sequences resumed
the same way elsewhere.

All state lives on the gateway's event loop thread and is touched only there (no locks).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

from ...config import AppSpec, PoolConfig
from ...errors import AmphibiaError, InferenceTimeout, LLMError, Overloaded
from ..types import Usage
from . import wire
from .jobs import CallJob, GenerationJob, error_of
from .metrics import PoolMetrics

log = logging.getLogger("amphibia.broker")
POISON_CRASHES = 2  # a request on this many workers that went away is failed, not placed again


@dataclass(eq=False)
class WorkerLink:
    id: str
    models: list[str]
    slots: int
    device: str
    send: Callable[[wire.Message], None]
    running: dict[str, GenerationJob] = field(default_factory=dict)
    calls: dict[str, CallJob] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def free(self) -> int:
        return self.slots - len(self.running)


class Broker:
    def __init__(self, config: PoolConfig, metrics: PoolMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or PoolMetrics()
        self.queues: dict[str, deque[GenerationJob]] = defaultdict(deque)
        self.service: dict[str, float] = defaultdict(float)
        self.jobs: dict[str, GenerationJob] = {}
        self.calls: dict[str, CallJob] = {}
        self.workers: dict[str, WorkerLink] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)  # per-app tokens/min window
        self._pending_calls: deque[CallJob] = deque()
        self.timeline: deque[dict] = deque(maxlen=2000)  # slot events, for pool views
        self.wait_listeners: list[Callable[[float], None]] = []  # told each request's queue wait (autoscaling)

    # --- intake ---------------------------------------------------------------------------------
    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _active(self, app: str) -> int:
        return (sum(1 for j in self.jobs.values() if j.app.name == app)
                + sum(1 for c in self.calls.values() if c.app.name == app))

    def _admit(self, app: AppSpec) -> None:
        """Refuse new work for `app` at once (Overloaded) when a limit says so; generations and calls
        count alike."""
        limits, name = app.limits, app.name
        reason = None
        if self.queued() + len(self._pending_calls) >= self.config.max_queue:
            reason, retry = f"the pool queue is full ({self.config.max_queue} waiting)", 1000
        elif self._active(name) >= limits.max_concurrent:
            reason, retry = f"app {name!r} already has {limits.max_concurrent} requests in the pool", 500
        elif limits.tokens_per_minute and self._tokens_last_minute(name) >= limits.tokens_per_minute:
            oldest = self._tokens[name][0][0]
            reason, retry = (f"app {name!r} used its {limits.tokens_per_minute} tokens per minute",
                             int(max(0.1, 60 - (time.monotonic() - oldest)) * 1000))
        if reason:
            self.metrics.rejections.labels(name, "overloaded").inc()
            raise Overloaded(reason, retry)

    def submit_call(self, job: CallJob) -> None:
        """Place `job` on a worker (or hold it until one joins), or refuse it at once."""
        self._admit(job.app)
        self.calls[job.id] = job
        self._place_call(job)

    def submit(self, job: GenerationJob) -> None:
        """Queue `job` or refuse it at once (Overloaded) when a limit says so."""
        app = job.app.name
        self._admit(job.app)
        if not self._backlogged(app):
            busy = [self.service[a] for a in self._backlogged_apps()]
            if busy:  # VTC lift: returning from idle does not bank credit
                self.service[app] = max(self.service[app], min(busy))
        self.jobs[job.id] = job
        self.queues[app].append(job)
        self.metrics.queue_depth.labels(app).set(len(self.queues[app]))
        self._dispatch()
        if not job.started:  # no free slot: a less-served newcomer need not wait for the next token
            self._maybe_preempt(job.model)

    def cancel(self, job_id: str, error: AmphibiaError | None = None) -> None:
        """Stop a request wherever it is and free its slot. Its sink hears `error`, or else (a client
        that left) a generation ends as "cancelled" with what it used. Unknown ids are ignored."""
        call = self.calls.pop(job_id, None)
        if call is not None:
            if call in self._pending_calls:
                self._pending_calls.remove(call)
            if call.worker is not None:
                call.worker.calls.pop(call.id, None)
                call.worker.send(wire.Cancel(call.id))
            if error is not None:
                call.sink.fail(error)
            return
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if error is not None:
            job.sink.fail(error)
        else:
            job.sink.done(Usage(job.prompt_tokens, job.generated), "cancelled")
        queue = self.queues.get(job.app.name)
        if queue is not None and job in queue:
            queue.remove(job)
            self.metrics.queue_depth.labels(job.app.name).set(len(queue))
        if job.worker is not None:
            job.worker.running.pop(job.id, None)
            job.worker.send(wire.Cancel(job.id))
            self._event(job, "cancel")
            self._dispatch()

    def _backlogged(self, app: str) -> bool:
        return bool(self.queues.get(app)) or any(j.app.name == app and j.worker for j in self.jobs.values())

    def _backlogged_apps(self) -> set[str]:
        return {j.app.name for j in self.jobs.values()}

    def _tokens_last_minute(self, app: str) -> int:
        window, now = self._tokens[app], time.monotonic()
        while window and now - window[0][0] > 60:
            window.popleft()
        return sum(n for _, n in window)

    # --- placement --------------------------------------------------------------------------------
    def _worker_for(self, model: str, need_slot: bool) -> WorkerLink | None:
        candidates = [w for w in self.workers.values() if model in w.models and (w.free > 0 or not need_slot)]
        return max(candidates, key=lambda w: (w.free, -len(w.calls)), default=None)

    def _dispatch(self) -> None:
        while True:
            for app in sorted((a for a, q in self.queues.items() if q), key=lambda a: self.service[a]):
                job = self.queues[app][0]
                worker = self._worker_for(job.model, need_slot=True)
                if worker is not None:
                    self.queues[app].popleft()
                    self.metrics.queue_depth.labels(app).set(len(self.queues[app]))
                    self._start(job, worker)
                    break
            else:
                return

    def _start(self, job: GenerationJob, worker: WorkerLink) -> None:
        job.worker, job.slice_start, job.preempting = worker, job.generated, False
        job.assigned_at, job.missed = time.monotonic(), 0
        worker.running[job.id] = job
        if not job.started:
            waited = time.monotonic() - job.enqueued
            self.metrics.queue_wait.labels(job.app.name).observe(waited)
            for listener in self.wait_listeners:
                listener(waited)
        job.started = True
        worker.send(job.assign())
        self._event(job, "start")
        self.metrics.running.labels(worker.id).set(len(worker.running))

    def _place_call(self, job: CallJob) -> None:
        worker = self._worker_for(job.model, need_slot=False)
        if worker is None:
            self._pending_calls.append(job)
            return
        job.worker = worker
        worker.calls[job.id] = job
        worker.send(job.message())

    def _maybe_preempt(self, model: str) -> None:
        waiting = [a for a, q in self.queues.items() if q and q[0].model == model]
        if not waiting or self._worker_for(model, need_slot=True) is not None:
            return
        neediest = min(self.service[a] for a in waiting)
        head = self.queues[min(waiting, key=lambda a: self.service[a])][0]
        # A request that has not started yet is waiting for its first token, the latency people
        # notice: for it, a quarter quantum is slice enough.
        quantum = self.config.quantum_tokens if head.started else max(1, self.config.quantum_tokens // 4)
        running = [j for w in self.workers.values() if model in w.models for j in w.running.values()]
        victims = [j for j in running if not j.preempting and j.generated - j.slice_start >= quantum
                   and self.service[j.app.name] > neediest]
        if not victims:
            return
        victim = max(victims, key=lambda j: (self.service[j.app.name], j.generated - j.slice_start))
        victim.preempting = True
        worker = victim.worker
        assert worker is not None
        worker.send(wire.Preempt(victim.id))
        # Send the waiting request right behind the preemption: the worker frees the slot and admits
        # it in the same tick, instead of a round trip later.
        app = min(waiting, key=lambda a: self.service[a])
        self._start(self.queues[app].popleft(), worker)
        self.metrics.queue_depth.labels(app).set(len(self.queues[app]))

    # --- workers ------------------------------------------------------------------------------------
    def add_worker(self, worker: WorkerLink) -> None:
        old = self.workers.get(worker.id)
        if old is not None:  # a restarted worker with the same id: the old link is dead
            self.remove_worker(old)
        self.workers[worker.id] = worker
        self.metrics.workers.set(len(self.workers))
        log.info("worker %s joined: %s, %d slots, %s", worker.id, ",".join(worker.models), worker.slots, worker.device)
        while self._pending_calls:
            self._place_call(self._pending_calls.popleft())
        self._dispatch()

    def remove_worker(self, worker: WorkerLink) -> None:
        """A worker left (it died, or its link did): its work resumes elsewhere, except work that was
        on a worker that went away twice, which is failed as poison rather than placed again."""
        if self.workers.get(worker.id) is not worker:
            return
        del self.workers[worker.id]
        self.metrics.workers.set(len(self.workers))
        self.metrics.running.labels(worker.id).set(0)
        lost = list(worker.running.values())
        for job in reversed(lost):  # resume each from what it delivered, ahead of newer requests
            job.worker = None
            job.crashes += 1
            self._event(job, "lost")
            if job.crashes >= POISON_CRASHES:
                self._fail_poison(job)
            else:
                self.queues[job.app.name].appendleft(job)
        for call in list(worker.calls.values()):
            call.worker = None
            call.crashes += 1
            if call.crashes >= POISON_CRASHES:
                self._fail_poison(call)
            else:
                self._place_call(call)
        worker.running.clear()
        worker.calls.clear()
        log.warning("worker %s left; %d running request(s) will resume elsewhere", worker.id, len(lost))
        self._dispatch()

    def _fail_poison(self, job: GenerationJob | CallJob) -> None:
        log.error("app=%s request=%s: job %s was on %d workers that went away; failing it", job.app.name,
                  job.request_id or "-", job.id, job.crashes)
        self.metrics.rejections.labels(job.app.name, "poison").inc()
        self.jobs.pop(job.id, None)
        self.calls.pop(job.id, None)
        job.sink.fail(LLMError(f"this request was on {job.crashes} workers that went away while serving it; "
                               f"it is not placed again"))

    def on_message(self, worker: WorkerLink, msg: wire.Message) -> None:
        worker.last_seen = time.monotonic()
        if isinstance(msg, wire.Heartbeat):
            return self._reconcile(worker, msg)
        job_id = getattr(msg, "id", "")
        call = self.calls.get(job_id)
        if call is not None:
            if call.worker is worker and isinstance(msg, (wire.Result, wire.Failed)):
                self._finish_call(call)
                if isinstance(msg, wire.Result):
                    self._charge_call(call, msg.value)
                    call.sink.result(msg.value)
                else:
                    call.sink.fail(error_of(msg))
            return
        job = self.jobs.get(job_id)
        if job is None or job.worker is not worker:
            return  # the last words about a cancelled job, or late news from a worker that lost it
        app = job.app
        if isinstance(msg, wire.Started):
            # Charged for the prefill its worker does: its prompt and any text it resumes after, less
            # what the worker's KV already held (a shared system prompt, its own preempted KV).
            job.prompt_tokens = msg.prompt_tokens
            job.admitted_at = time.monotonic()
            self._charge(app, self.config.prompt_weight * msg.prefill_tokens)
        elif isinstance(msg, wire.Token):
            now = time.monotonic()
            if job.generated == 0 or not job.text:
                self.metrics.ttft.labels(app.name).observe(now - job.enqueued)
                if job.preemptions == 0 and job.crashes == 0 and job.admitted_at:  # one slice: its hops add up
                    hops = self.metrics.first_token_hops
                    hops.labels("queue").observe(job.assigned_at - job.enqueued)
                    hops.labels("admission").observe(job.admitted_at - job.assigned_at)
                    hops.labels("prefill").observe(now - job.admitted_at)
            elif job.last_token:
                self.metrics.inter_token.labels(app.name).observe(now - job.last_token)
            job.last_token = now
            job.text += msg.text
            job.ids += msg.ids
            job.generated += msg.n
            self._charge(app, self.config.generated_weight * msg.n)
            if app.limits.tokens_per_minute:  # the window is only needed where a limit reads it
                self._tokens[app.name].append((now, msg.n))
            self.metrics.tokens.labels(app.name).inc(msg.n)
            job.sink.token(msg.text)
            self._maybe_preempt(job.model)
        elif isinstance(msg, wire.Done):
            # The worker counts from resume_tokens, so its count is the total.
            job.generated = msg.generated_tokens
            self._finish(job)
            job.sink.done(Usage(job.prompt_tokens, job.generated), msg.finish_reason)
        elif isinstance(msg, wire.Failed):
            self._finish(job)
            job.sink.fail(error_of(msg))
        elif isinstance(msg, wire.Preempted):
            worker.running.pop(job.id, None)
            job.worker = None
            job.preemptions += 1
            self.metrics.preemptions.labels(app.name).inc()
            self._event(job, "preempt")
            self.queues[app.name].appendleft(job)
            self._dispatch()

    def _reconcile(self, worker: WorkerLink, beat: wire.Heartbeat) -> None:
        """Make the worker's view and ours agree, so no slot and no request is stranded by a lost
        message. A sequence the worker holds that we did not give it is cancelled (Cancel is
        idempotent, and any later Assign of that id goes out after it). A job we gave it that is
        missing from two heartbeats in a row, well after it was sent (a Done or Preempted may
        still be on its way behind one heartbeat), is resumed elsewhere like a lost worker's."""
        held = set(beat.jobs)
        for job_id in held - worker.running.keys():
            worker.send(wire.Cancel(job_id))
        grace = 3 * self.config.heartbeat_s
        now = time.monotonic()
        lost = False
        for job in list(worker.running.values()):
            if job.id in held or now - job.assigned_at < grace:
                job.missed = 0
                continue
            job.missed += 1
            if job.missed < 2 or job.preempting:
                continue
            log.warning("worker %s lost job %s (app %s); resuming it", worker.id, job.id, job.app.name)
            worker.running.pop(job.id)
            job.worker = None
            self._event(job, "lost")
            self.queues[job.app.name].appendleft(job)
            lost = True
        if lost:
            self._dispatch()

    def _finish(self, job: GenerationJob) -> None:
        self.jobs.pop(job.id, None)
        if job.worker is not None:
            job.worker.running.pop(job.id, None)
            self.metrics.running.labels(job.worker.id).set(len(job.worker.running))
            self._event(job, "end")
        job.worker = None
        self._dispatch()

    def _finish_call(self, job: CallJob) -> None:
        self.calls.pop(job.id, None)
        if job.worker is not None:
            job.worker.calls.pop(job.id, None)
        job.worker = None

    def _charge(self, app: AppSpec, cost: float) -> None:
        self.service[app.name] += cost / max(app.weight, 1e-6)

    def _charge_call(self, call: CallJob, value: object) -> None:
        """Embeddings cost their prompt tokens, like a generation's prefill; other calls are cheap."""
        used = value.get("prompt_tokens", 0) if isinstance(value, dict) else 0
        if isinstance(used, int) and used > 0:
            self._charge(call.app, self.config.prompt_weight * used)
            if call.app.limits.tokens_per_minute:
                self._tokens[call.app.name].append((time.monotonic(), used))

    def _event(self, job: GenerationJob, kind: str) -> None:
        self.timeline.append({"t": time.time(), "event": kind, "job": job.id, "app": job.app.name,
                              "worker": job.worker.id if job.worker else None, "generated": job.generated})

    # --- housekeeping -------------------------------------------------------------------------------
    def expire(self) -> None:
        """End every wait (run every fraction of a second): requests that waited for a slot longer than
        their app allows are refused, and any request past its deadline (its app's llm_timeout_s, from
        submission, queueing and resumes included) is cancelled with a timeout."""
        now = time.monotonic()
        for app, queue in self.queues.items():
            for job in [j for j in queue if not j.started and now - j.enqueued > j.app.limits.max_queue_wait_s]:
                queue.remove(job)
                self.jobs.pop(job.id, None)
                self.metrics.rejections.labels(app, "queue_wait").inc()
                job.sink.fail(Overloaded(f"no slot for app {app!r} within {job.app.limits.max_queue_wait_s:g} s", 1000))
            self.metrics.queue_depth.labels(app).set(len(queue))
        for late in [j for j in (*self.jobs.values(), *self.calls.values()) if now > j.deadline]:
            self.metrics.rejections.labels(late.app.name, "timeout").inc()
            self.cancel(late.id, InferenceTimeout(
                f"the request did not finish within {late.app.limits.llm_timeout_s:g} s"))
        for call in [c for c in self._pending_calls if now - c.enqueued > c.app.limits.max_queue_wait_s]:
            self.metrics.rejections.labels(call.app.name, "queue_wait").inc()
            self.cancel(call.id, Overloaded(f"no worker for model {call.model!r} within "
                                            f"{call.app.limits.max_queue_wait_s:g} s", 1000))

    async def housekeeping(self, period_s: float = 0.25) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.expire()

    def snapshot(self) -> dict:
        """The pool as JSON: workers and their slots, queues, per-app service."""
        return {
            "workers": [{
                "id": w.id, "models": w.models, "slots": w.slots, "device": w.device, "free": w.free,
                "running": [{"job": j.id, "app": j.app.name, "generated": j.generated, "preemptions": j.preemptions}
                            for j in w.running.values()],
            } for w in self.workers.values()],
            "queues": {a: len(q) for a, q in self.queues.items() if q},
            "service": {a: round(s, 1) for a, s in self.service.items()},
            "queued": self.queued(),
        }
