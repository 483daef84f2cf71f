"""The broker: every LLM request in the gateway, queued per app and placed on workers fairly.

Fairness is the Virtual Token Counter ("Fairness in Serving LLMs", OSDI'24): each app's counter
grows with the weighted tokens it is served (divided by its weight); when a slot frees, the
waiting request of the app with the smallest counter goes next, and an app that returns from idle
is lifted to the smallest counter among the busy ones so it cannot bank credit. Time slices: a
sequence that has generated `quantum_tokens` since it got its slot, while a less-served app
waits and no slot is free, is preempted; it is resumed later from its prompt plus the text it
already delivered, so its client sees only latency. A worker that drops has its sequences resumed
the same way elsewhere.

All state lives on the gateway's event loop thread and is touched only there (no locks). Indexes
kept in step with it (apps that wait, each app's running sequences, workers with a free slot,
deadlines in heaps) spare every token, placement and admission a scan of all apps, jobs or workers:
at 64 workers x 32 slots and 1,000 apps those scans were the gateway's ceiling (`amphibia bench
broker`).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
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
from .metrics import Labelled, PoolMetrics

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
        # Told the model of a request that no joined worker serves (`amphibia up` then starts one).
        self.unserved_listeners: list[Callable[[str], None]] = []
        # Indexes of the state above; `queues` and workers' `running` change only through the helpers
        # that keep them (_enqueue, _pop, _unqueue, _run, _unrun).
        self._waiting: dict[str, None] = {}  # apps whose queue is not empty, in the order they began to wait
        self._queued = 0
        self._jobs_of: dict[str, int] = {}  # per app, its generations in `jobs`
        self._calls_of: dict[str, int] = {}  # ... and its calls in `calls`
        self._running: dict[str, dict[str, GenerationJob]] = {}  # per app, its sequences on workers
        # What preemption may take: per quantum (a quarter one, for a waiting request that has not
        # started yet, and a whole one), the running sequences past it and not being preempted, per
        # app, each app's in the order they got there; `_top`: the most-served such app (None: unknown).
        self._quarter = max(1, config.quantum_tokens // 4)
        self._due: dict[int, dict[str, dict[str, GenerationJob]]] = {self._quarter: {}, config.quantum_tokens: {}}
        self._top: dict[int, str | None] = dict.fromkeys(self._due)
        self._free: dict[WorkerLink, None] = {}  # workers with a free slot
        self._deadlines: list[tuple[float, int, str]] = []  # heap of (deadline, n, id), jobs and calls
        self._waits: list[tuple[float, int, GenerationJob]] = []  # heap of (end of its queue wait, n, job)
        self._n = itertools.count()  # heap ties
        m = self.metrics
        self._depth, self._ttft, self._inter_token = Labelled(m.queue_depth), Labelled(m.ttft), Labelled(m.inter_token)
        self._queue_wait, self._generated = Labelled(m.queue_wait), Labelled(m.tokens)
        self._preempted, self._hops, self._running_gauge = (Labelled(m.preemptions), Labelled(m.first_token_hops),
                                                            Labelled(m.running))

    # --- intake ---------------------------------------------------------------------------------
    def queued(self) -> int:
        return self._queued

    def _active(self, app: str) -> int:
        return self._jobs_of.get(app, 0) + self._calls_of.get(app, 0)

    def _admit(self, app: AppSpec) -> None:
        """Refuse new work for `app` at once (Overloaded) when a limit says so; generations and calls
        count alike."""
        limits, name = app.limits, app.name
        reason = None
        if self._queued + len(self._pending_calls) >= self.config.max_queue:
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
        self._calls_of[job.app.name] = self._calls_of.get(job.app.name, 0) + 1
        self._remember(job)
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
        self._jobs_of[app] = self._jobs_of.get(app, 0) + 1
        self._remember(job)
        heapq.heappush(self._waits, (job.enqueued + job.app.limits.max_queue_wait_s, next(self._n), job))
        self._enqueue(job)
        self._served(job.model)
        self._dispatch()
        if not job.started:  # no free slot: a less-served newcomer need not wait for the next token
            self._maybe_preempt(job.model)

    def cancel(self, job_id: str, error: AmphibiaError | None = None) -> None:
        """Stop a request wherever it is and free its slot. Its sink hears `error`, or else (a client
        that left) a generation ends as "cancelled" with what it used. Unknown ids are ignored."""
        call = self.calls.get(job_id)
        if call is not None:
            self._forget(call)
            if call in self._pending_calls:
                self._pending_calls.remove(call)
            if call.worker is not None:
                call.worker.calls.pop(call.id, None)
                call.worker.send(wire.Cancel(call.id))
            if error is not None:
                call.sink.fail(error)
            return
        job = self.jobs.get(job_id)
        if job is None:
            return
        self._forget(job)
        if error is not None:
            job.sink.fail(error)
        else:
            job.sink.done(Usage(job.prompt_tokens, job.generated), "cancelled")
        self._unqueue(job)
        if job.worker is not None:
            self._unrun(job, job.worker)
            job.worker.send(wire.Cancel(job.id))
            self._event(job, "cancel")
            self._dispatch()

    def _backlogged(self, app: str) -> bool:
        return app in self._waiting or app in self._running

    def _backlogged_apps(self) -> dict[str, int]:
        return self._jobs_of  # the apps with a generation in the broker

    # --- the indexes' upkeep ----------------------------------------------------------------------
    def _remember(self, job: GenerationJob | CallJob) -> None:
        heapq.heappush(self._deadlines, (job.deadline, next(self._n), job.id))
        live = len(self.jobs) + len(self.calls)
        if len(self._deadlines) > 2 * live + 1024:  # mostly ended jobs: keep the live ones' entries
            self._deadlines = [(j.deadline, next(self._n), j.id) for j in (*self.jobs.values(), *self.calls.values())]
            heapq.heapify(self._deadlines)
        if len(self._waits) > 2 * self._queued + 1024:
            self._waits = [entry for entry in self._waits if not entry[2].started and entry[2].id in self.jobs]
            heapq.heapify(self._waits)

    def _forget(self, job: GenerationJob | CallJob) -> None:
        """`job` leaves `jobs` (or `calls`)."""
        table, counts = (self.jobs, self._jobs_of) if isinstance(job, GenerationJob) else (self.calls, self._calls_of)
        if table.get(job.id) is not job:
            return
        del table[job.id]
        app = job.app.name
        counts[app] -= 1
        if not counts[app]:
            del counts[app]

    def _enqueue(self, job: GenerationJob, front: bool = False) -> None:
        app = job.app.name
        queue = self.queues[app]
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        self._queued += 1
        if app not in self._waiting:
            self._waiting[app] = None
        self._depth(app).set(len(queue))

    def _pop(self, app: str) -> GenerationJob:
        queue = self.queues[app]
        job = queue.popleft()
        self._queued -= 1
        if not queue:
            del self._waiting[app]
        self._depth(app).set(len(queue))
        return job

    def _unqueue(self, job: GenerationJob) -> None:
        app = job.app.name
        queue = self.queues.get(app)
        if queue is None or job not in queue:
            return
        queue.remove(job)
        self._queued -= 1
        if not queue:
            del self._waiting[app]
        self._depth(app).set(len(queue))

    def _run(self, job: GenerationJob, worker: WorkerLink) -> None:
        worker.running[job.id] = job
        self._running.setdefault(job.app.name, {})[job.id] = job
        self._touch(worker)

    def _unrun(self, job: GenerationJob, worker: WorkerLink) -> None:
        worker.running.pop(job.id, None)
        mine = self._running.get(job.app.name)
        if mine is not None and mine.pop(job.id, None) is not None and not mine:
            del self._running[job.app.name]
        self._not_due(job)
        self._touch(worker)

    def _not_due(self, job: GenerationJob) -> None:
        app = job.app.name
        for quantum, due in self._due.items():
            mine = due.get(app)
            if mine is not None and mine.pop(job.id, None) is not None and not mine:
                del due[app]
                if self._top[quantum] == app:
                    self._top[quantum] = None

    def _grew(self, app: str) -> None:
        """`app`'s service grew (or it just became due): it may be the most-served due app now."""
        served = self.service[app]
        for quantum, due in self._due.items():
            top = self._top[quantum]
            if top is not None and top != app and app in due and served > self.service[top]:
                self._top[quantum] = app

    def _touch(self, worker: WorkerLink) -> None:
        if worker.free > 0 and self.workers.get(worker.id) is worker:
            self._free[worker] = None
        else:
            self._free.pop(worker, None)

    def _tokens_last_minute(self, app: str) -> int:
        window, now = self._tokens[app], time.monotonic()
        while window and now - window[0][0] > 60:
            window.popleft()
        return sum(n for _, n in window)

    # --- placement --------------------------------------------------------------------------------
    def _worker_for(self, model: str, need_slot: bool) -> WorkerLink | None:
        if need_slot:
            candidates = [w for w in self._free if model in w.models]
        else:
            candidates = [w for w in self.workers.values() if model in w.models]
        return max(candidates, key=lambda w: (w.free, -len(w.calls)), default=None)

    def _dispatch(self) -> None:
        """Fill free slots, each with the head of the least-served waiting app that a free slot can run."""
        service = self.service
        while self._free and self._waiting:
            app = min(self._waiting, key=service.__getitem__)
            worker = self._worker_for(self.queues[app][0].model, need_slot=True)
            if worker is None:  # no free slot for that app's model (a pool of several): the next app's
                full: set[str] = set()
                for app in sorted(self._waiting, key=service.__getitem__):
                    model = self.queues[app][0].model
                    if model not in full:
                        worker = self._worker_for(model, need_slot=True)
                        if worker is not None:
                            break
                        full.add(model)
                else:
                    return
            self._start(self._pop(app), worker)

    def _start(self, job: GenerationJob, worker: WorkerLink) -> None:
        job.worker, job.slice_start, job.preempting = worker, job.generated, False
        job.assigned_at, job.missed = time.monotonic(), 0
        self._run(job, worker)
        if not job.started:
            waited = time.monotonic() - job.enqueued
            self._queue_wait(job.app.name).observe(waited)
            for listener in self.wait_listeners:
                listener(waited)
        job.started = True
        worker.send(job.assign())
        self._event(job, "start")
        self._running_gauge(worker.id).set(len(worker.running))

    def _served(self, model: str) -> None:
        if not any(model in w.models for w in self.workers.values()):
            for listener in self.unserved_listeners:
                listener(model)

    def _place_call(self, job: CallJob) -> None:
        worker = self._worker_for(job.model, need_slot=False)
        if worker is None:
            self._pending_calls.append(job)
            self._served(job.model)
            return
        job.worker = worker
        worker.calls[job.id] = job
        worker.send(job.message())

    def _maybe_preempt(self, model: str) -> bool:
        """Preempt one sequence for the least-served app waiting for `model`, if one is due; True if so."""
        if not self._waiting or not self._due[self._quarter] or (
                self._free and self._worker_for(model, need_slot=True) is not None):
            return False
        service = self.service
        app = min(self._waiting, key=service.__getitem__)
        if self.queues[app][0].model != model:  # a pool of several models
            waiting = [a for a in self._waiting if self.queues[a][0].model == model]
            if not waiting:
                return False
            app = min(waiting, key=service.__getitem__)
        neediest = service[app]
        head = self.queues[app][0]
        # A request that has not started yet is waiting for its first token, the latency people
        # notice: for it, a quarter quantum is slice enough.
        quantum = self.config.quantum_tokens if head.started else max(1, self.config.quantum_tokens // 4)
        victim = self._victim(model, neediest, quantum)
        if victim is None:
            return False
        victim.preempting = True
        self._not_due(victim)
        worker = victim.worker
        assert worker is not None
        worker.send(wire.Preempt(victim.id))
        # Send the waiting request right behind the preemption: the worker frees the slot and admits
        # it in the same tick, instead of a round trip later.
        self._start(self._pop(app), worker)
        return True

    def _victim(self, model: str, neediest: float, quantum: int) -> GenerationJob | None:
        """The sequence to preempt, on a worker that serves `model`: of the most-served app above
        `neediest` with one past its `quantum` (and not already being preempted), the longest slice."""
        due, service = self._due[quantum], self.service
        if not due:
            return None
        top = self._top[quantum]
        if top is None:
            top = self._top[quantum] = max(due, key=service.__getitem__)
        if service[top] <= neediest:
            return None
        victim = self._longest(due[top], model)
        if victim is None:  # none of that app's on a worker for `model` (a pool of several): the next app's
            for app in sorted(due, key=service.__getitem__, reverse=True):
                if service[app] <= neediest:
                    break
                victim = self._longest(due[app], model)
                if victim is not None:
                    break
        return victim

    @staticmethod
    def _longest(jobs: dict[str, GenerationJob], model: str) -> GenerationJob | None:
        """The one due longest, on a worker for `model`: its slice is the longest, as every running
        sequence gains a token a step (a big app has hundreds due; this looks at the first)."""
        for job in jobs.values():
            if job.worker is not None and model in job.worker.models:
                return job
        return None

    # --- workers ------------------------------------------------------------------------------------
    def add_worker(self, worker: WorkerLink) -> None:
        old = self.workers.get(worker.id)
        if old is not None:  # a restarted worker with the same id: the old link is dead
            self.remove_worker(old)
        self.workers[worker.id] = worker
        self._touch(worker)
        self.metrics.workers.set(len(self.workers))
        log.info("worker %s joined: %s, %d slots, %s", worker.id, ",".join(worker.models), worker.slots, worker.device)
        # Calls held for want of a worker: placed if this one serves their model, else held again (a
        # `while` over the deque would go round forever on a call for a model this worker lacks).
        pending, self._pending_calls = self._pending_calls, deque()
        for call in pending:
            self._place_call(call)
        self._dispatch()

    def remove_worker(self, worker: WorkerLink) -> None:
        """A worker left (it died, or its link did): its work resumes elsewhere, except work that was
        on a worker that went away twice, which is failed as poison rather than placed again."""
        if self.workers.get(worker.id) is not worker:
            return
        del self.workers[worker.id]
        self._free.pop(worker, None)
        self.metrics.workers.set(len(self.workers))
        self._running_gauge(worker.id).set(0)
        lost = list(worker.running.values())
        for job in reversed(lost):  # resume each from what it delivered, ahead of newer requests
            self._unrun(job, worker)
            job.worker = None
            job.crashes += 1
            self._event(job, "lost")
            if job.crashes >= POISON_CRASHES:
                self._fail_poison(job)
            else:
                self._enqueue(job, front=True)
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
        self._forget(job)
        job.sink.fail(LLMError(f"this request was on {job.crashes} workers that went away while serving it; "
                               f"it is not placed again"))

    def on_message(self, worker: WorkerLink, msg: wire.Message) -> None:
        worker.last_seen = time.monotonic()
        if isinstance(msg, wire.Tokens):
            return self._step(worker, msg)
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
            self._token(job, msg.text, msg.n, msg.ids, time.monotonic())
            self._generated(app.name).inc(msg.n)
            self._grew(app.name)
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
            self._unrun(job, worker)
            job.worker = None
            job.preemptions += 1
            self._preempted(app.name).inc()
            self._event(job, "preempt")
            self._enqueue(job, front=True)
            self._dispatch()

    def _token(self, job: GenerationJob, text: str, n: int, ids: list[int], now: float) -> None:
        """A piece of `job`'s text (`n` tokens, `ids` when known) from its worker, for its client (the
        caller counts it in the tokens metric)."""
        app = job.app
        name = app.name
        if job.generated == 0 or not job.text:
            self._ttft(name).observe(now - job.enqueued)
            if job.preemptions == 0 and job.crashes == 0 and job.admitted_at:  # one slice: its hops add up
                self._hops("queue").observe(job.assigned_at - job.enqueued)
                self._hops("admission").observe(job.admitted_at - job.assigned_at)
                self._hops("prefill").observe(now - job.admitted_at)
        elif job.last_token:
            self._inter_token(name).observe(now - job.last_token)
        job.last_token = now
        job.text += text
        job.ids += ids
        job.generated += n
        slice_ = job.generated - job.slice_start
        if slice_ - n < self.config.quantum_tokens and not job.preempting:
            for quantum, due in self._due.items():  # past a quarter or a whole quantum now: preemptible
                if slice_ - n < quantum <= slice_:
                    due.setdefault(name, {})[job.id] = job
        # _charge, inline; the caller tells `_grew`, once per app and message
        self.service[name] += self.config.generated_weight * n / max(app.weight, 1e-6)
        if app.limits.tokens_per_minute:  # the window is only needed where a limit reads it
            self._tokens[name].append((now, n))
        job.sink.token(text)

    def _step(self, worker: WorkerLink, msg: wire.Tokens) -> None:
        """A worker's decode step: each piece as its own `token` message would be, then as many
        preemption checks as there were pieces, each until one finds nothing due."""
        now = time.monotonic()
        jobs = self.jobs
        pieces: dict[str, int] = {}  # per model
        generated: dict[str, int] = {}  # per app, for the tokens metric: one increment each
        for job_id, text, n, ids in zip(msg.jobs, msg.texts, msg.n, msg.ids):
            job = jobs.get(job_id)
            if job is None or job.worker is not worker:
                continue  # as for a `token`: a cancelled job's, or late news from a worker that lost it
            self._token(job, text, n, ids, now)
            model, app = job.generation.model, job.app.name
            pieces[model] = pieces.get(model, 0) + 1
            generated[app] = generated.get(app, 0) + n
        for app, n in generated.items():
            self._generated(app).inc(n)
            self._grew(app)
        for model, count in pieces.items():
            for _ in range(count):
                if not self._maybe_preempt(model):
                    break

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
            self._unrun(job, worker)
            job.worker = None
            self._event(job, "lost")
            self._enqueue(job, front=True)
            lost = True
        if lost:
            self._dispatch()

    def _finish(self, job: GenerationJob) -> None:
        self._forget(job)
        if job.worker is not None:
            self._unrun(job, job.worker)
            self._running_gauge(job.worker.id).set(len(job.worker.running))
            self._event(job, "end")
        job.worker = None
        self._dispatch()

    def _finish_call(self, job: CallJob) -> None:
        self._forget(job)
        if job.worker is not None:
            job.worker.calls.pop(job.id, None)
        job.worker = None

    def _charge(self, app: AppSpec, cost: float) -> None:
        self.service[app.name] += cost / max(app.weight, 1e-6)
        self._grew(app.name)

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
        waits = self._waits  # the heaps hold ended jobs too: they are dropped when their time comes
        while waits and waits[0][0] <= now:
            job = waits[0][2]
            if not job.started and self.jobs.get(job.id) is job:
                if not now - job.enqueued > job.app.limits.max_queue_wait_s:
                    break  # rounding: its wait ends at the next round
                app = job.app.name
                self._unqueue(job)
                self._forget(job)
                self.metrics.rejections.labels(app, "queue_wait").inc()
                job.sink.fail(Overloaded(f"no slot for app {app!r} within {job.app.limits.max_queue_wait_s:g} s", 1000))
            heapq.heappop(waits)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now:
            job_id = heapq.heappop(deadlines)[2]
            late = self.jobs.get(job_id) or self.calls.get(job_id)
            if late is None:
                continue
            if not now > late.deadline:
                heapq.heappush(deadlines, (late.deadline, next(self._n), job_id))
                break
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
