"""The broker's scheduling decisions, driven at the protocol level: a worker here is the list of
messages the broker sends it, and the test answers as a worker would."""
from __future__ import annotations

from pathlib import Path

import pytest

from amphibia.config import AppSpec, Limits, PoolConfig
from amphibia.errors import AmphibiaError, InferenceTimeout, LLMError, Overloaded
from amphibia.inference.pool import wire
from amphibia.inference.pool.broker import Broker, WorkerLink
from amphibia.inference.pool.jobs import CallJob, GenerationJob
from amphibia.inference.types import Call, Generation, Usage


class Collect:
    def __init__(self) -> None:
        self.text, self.usage, self.error = "", None, None

    def token(self, text: str) -> None:
        self.text += text

    def done(self, usage: Usage, reason: str) -> None:
        self.usage = usage

    def fail(self, error: AmphibiaError) -> None:
        self.error = error


def app(name: str, **limits) -> AppSpec:
    return AppSpec(name=name, path=Path("."), limits=Limits(**limits))


def job(a: AppSpec) -> GenerationJob:
    return GenerationJob(a, Generation("m", prompt="p"), Collect())


def worker(broker: Broker, slots: int = 1) -> tuple[WorkerLink, list]:
    sent: list = []
    link = WorkerLink(id=f"w{len(broker.workers)}", models=["m"], slots=slots, device="cpu", send=sent.append)
    broker.add_worker(link)
    return link, sent


def generate(broker: Broker, link: WorkerLink, j: GenerationJob, tokens: int) -> None:
    broker.on_message(link, wire.Started(j.id, 10))
    for _ in range(tokens):
        broker.on_message(link, wire.Token(j.id, "x"))


def test_least_served_app_goes_next_not_fcfs() -> None:
    broker = Broker(PoolConfig(quantum_tokens=1000))
    link, sent = worker(broker)
    heavy, light = app("heavy"), app("light")
    first = job(heavy)
    broker.submit(first)
    queued = [job(heavy), job(heavy), job(light)]
    for j in queued:
        broker.submit(j)
    generate(broker, link, first, 50)  # heavy is served while light waits
    broker.on_message(link, wire.Done(first.id, 10, 50, "length"))
    # The slot went to `light` although two `heavy` requests were queued before it.
    assert sent[-1].id == queued[2].id


def test_returning_app_is_lifted_and_cannot_bank_credit() -> None:
    broker = Broker(PoolConfig())
    link, _ = worker(broker)
    busy = job(app("busy"))
    broker.submit(busy)
    generate(broker, link, busy, 100)
    broker.submit(job(app("late")))
    assert broker.service["late"] == broker.service["busy"] > 0


def test_long_generation_is_preempted_and_resumed_with_its_text() -> None:
    broker = Broker(PoolConfig(quantum_tokens=8))
    link, sent = worker(broker)
    long = job(app("a"))
    broker.submit(long)
    generate(broker, link, long, 4)
    short = job(app("b"))
    broker.submit(short)
    generate(broker, link, long, 4)  # reaches its quantum while b waits
    # The preemption and b's assignment go out together: the worker swaps them within one tick.
    assert isinstance(sent[-2], wire.Preempt) and sent[-2].id == long.id
    assert isinstance(sent[-1], wire.Assign) and sent[-1].id == short.id
    broker.on_message(link, wire.Preempted(long.id))
    broker.on_message(link, wire.Done(short.id, 10, 0, "stop"))
    resumed = sent[-1]
    assert isinstance(resumed, wire.Assign) and resumed.id == long.id
    assert resumed.resume_text == "x" * 8 and resumed.resume_tokens == 8
    broker.on_message(link, wire.Token(long.id, "y"))
    broker.on_message(link, wire.Done(long.id, 10, 9, "stop"))
    assert long.sink.text == "x" * 8 + "y" and long.sink.usage.generated_tokens == 9


def test_no_preemption_of_an_app_below_its_share() -> None:
    broker = Broker(PoolConfig(quantum_tokens=4))
    link, sent = worker(broker)
    a = job(app("a"))
    broker.submit(a)
    broker.service["b"] = 10_000  # b has had far more than a
    broker.submit(job(app("b")))
    generate(broker, link, a, 20)
    assert not any(isinstance(m, wire.Preempt) for m in sent)


def test_lost_worker_resumes_its_jobs_on_another() -> None:
    broker = Broker(PoolConfig())
    first, _ = worker(broker)
    j = job(app("a"))
    broker.submit(j)
    generate(broker, first, j, 3)
    second, sent = worker(broker)
    broker.remove_worker(first)
    assert isinstance(sent[-1], wire.Assign) and sent[-1].resume_text == "xxx"
    broker.on_message(first, wire.Token(j.id, "late"))  # ignored: first no longer holds it
    broker.on_message(second, wire.Done(j.id, 10, 3, "stop"))
    assert j.sink.text == "xxx" and j.sink.usage.generated_tokens == 3


def test_limits_refuse_at_once() -> None:
    broker = Broker(PoolConfig(max_queue=2))
    limited = app("l", max_concurrent=1)
    broker.submit(job(limited))
    with pytest.raises(Overloaded, match="already has 1"):
        broker.submit(job(limited))
    broker.submit(job(app("x")))
    with pytest.raises(Overloaded, match="queue is full"):
        broker.submit(job(app("y")))


def test_queue_wait_limit_expires_requests() -> None:
    broker = Broker(PoolConfig())
    j = job(app("slow", max_queue_wait_s=0.0))
    broker.submit(j)  # no worker: it waits
    broker.expire()
    assert isinstance(j.sink.error, Overloaded) and not broker.jobs


def test_fair_shares_under_contention() -> None:
    """Four backlogged apps whose requests differ 8x in length get equal service (Jain's index ~1)."""
    broker = Broker(PoolConfig(quantum_tokens=16, max_queue=1000))
    link, _ = worker(broker, slots=2)
    apps = [app(n, max_concurrent=1000) for n in "abcd"]
    length = {"a": 8, "b": 16, "c": 32, "d": 64}
    for a in apps:
        for _ in range(200):
            broker.submit(job(a))
    for _ in range(150):  # each round, every running sequence generates 4 tokens
        for j in list(link.running.values()):
            if j.preempting:
                broker.on_message(link, wire.Preempted(j.id))
                continue
            if not j.prompt_tokens:
                broker.on_message(link, wire.Started(j.id, 10))
            for _ in range(4):
                if j.id in link.running:
                    broker.on_message(link, wire.Token(j.id, "x"))
            if j.id in link.running and j.generated >= length[j.app.name]:
                broker.on_message(link, wire.Done(j.id, 10, j.generated, "length"))
        assert all(broker.queues[a.name] for a in apps)  # everyone stays backlogged
    values = [broker.service[a.name] for a in apps]
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values))
    assert jain > 0.95, values


def test_tokens_per_minute_limit() -> None:
    broker = Broker(PoolConfig())
    link, _ = worker(broker, slots=2)
    metered = app("metered", tokens_per_minute=10)
    first = job(metered)
    broker.submit(first)
    generate(broker, link, first, 10)
    broker.on_message(link, wire.Done(first.id, 10, 10, "length"))
    with pytest.raises(Overloaded, match="10 tokens per minute") as info:
        broker.submit(job(metered))
    assert 0 < info.value.retry_after_ms <= 60_000
    broker.submit(job(app("unmetered")))  # other apps are not affected


def test_heartbeats_reconcile_stale_sequences_and_lost_assignments() -> None:
    broker = Broker(PoolConfig(heartbeat_s=0.0))  # no grace: every heartbeat counts
    link, sent = worker(broker, slots=1)
    stranded = job(app("x"))
    broker.submit(stranded)
    assert stranded.worker is link
    # The worker holds a sequence the broker never gave it (or already took back): cancel it.
    broker.on_message(link, wire.Heartbeat(jobs=[stranded.id, "ghost"]))
    assert [m.id for m in sent if isinstance(m, wire.Cancel)] == ["ghost"]
    # The worker never got `stranded` (a lost message): one missed heartbeat is not enough, two are,
    # and then the job is placed again (here on the same, only worker).
    broker.on_message(link, wire.Heartbeat(jobs=[]))
    assert [m.id for m in sent if isinstance(m, wire.Assign)] == [stranded.id]
    broker.on_message(link, wire.Heartbeat(jobs=[]))
    assert [m.id for m in sent if isinstance(m, wire.Assign)] == [stranded.id, stranded.id]
    assert [e["event"] for e in broker.timeline] == ["start", "lost", "start"]
    generate(broker, link, stranded, 2)
    broker.on_message(link, wire.Done(stranded.id, 10, 2, "stop"))
    assert stranded.sink.text == "xx" and stranded.sink.usage == Usage(10, 2)


class CallResult:
    def __init__(self) -> None:
        self.value, self.error = None, None

    def result(self, value) -> None:
        self.value = value

    def fail(self, error: AmphibiaError) -> None:
        self.error = error


def call(a: AppSpec, texts: int = 1) -> CallJob:
    return CallJob(a, Call("m", "embed", {"texts": ["t"] * texts}), CallResult())


def test_calls_are_first_class_jobs() -> None:
    """Calls count against the same limits, are charged like prefill, expire and can be cancelled."""
    broker = Broker(PoolConfig(max_queue=2))
    limited = app("l", max_concurrent=1)
    waiting = call(limited)
    broker.submit_call(waiting)  # no worker yet: it waits
    with pytest.raises(Overloaded, match="already has 1"):
        broker.submit(job(limited))
    broker.cancel(waiting.id)
    assert not broker.calls and not broker._pending_calls
    link, sent = worker(broker)
    embed = call(app("e"))
    broker.submit_call(embed)
    assert sent[-1].id == embed.id
    broker.on_message(link, wire.Result(embed.id, {"embeddings": [[1.0]], "prompt_tokens": 12}))
    assert embed.sink.value["prompt_tokens"] == 12 and broker.service["e"] == 12
    broker.remove_worker(link)
    stale = call(app("s", max_queue_wait_s=0.0))
    broker.submit_call(stale)
    broker.expire()
    assert isinstance(stale.sink.error, Overloaded) and not broker.calls


def test_a_request_on_two_workers_that_died_is_poison() -> None:
    broker = Broker(PoolConfig())
    first, _ = worker(broker)
    j = job(app("x"))
    broker.submit(j)
    broker.remove_worker(first)  # the first death: it waits to resume
    assert j.sink.error is None and j in broker.queues["x"]
    second, _ = worker(broker)
    assert j.worker is second
    broker.remove_worker(second)  # the second: never placed again
    assert isinstance(j.sink.error, LLMError) and "not placed again" in j.sink.error.message
    assert not broker.jobs and not broker.queued()
    c = call(app("y"))
    broker.submit_call(c)
    for _ in range(2):
        w, _ = worker(broker)
        broker.remove_worker(w)
    assert isinstance(c.sink.error, LLMError) and not broker.calls


def test_every_wait_ends_at_the_deadline() -> None:
    """A request that started, lost its worker and waits to resume still ends at its deadline."""
    broker = Broker(PoolConfig())
    link, sent = worker(broker)
    j = job(app("x", llm_timeout_s=0.0))
    broker.submit(j)
    generate(broker, link, j, 2)
    broker.remove_worker(link)  # re-queued; no other worker
    broker.expire()
    assert isinstance(j.sink.error, InferenceTimeout) and not broker.jobs and not broker.queued()


def test_resumed_text_is_charged_as_prefill() -> None:
    broker = Broker(PoolConfig())
    link, _ = worker(broker)
    j = job(app("r"))
    broker.submit(j)
    broker.on_message(link, wire.Started(j.id, 10, 60))
    assert j.prompt_tokens == 10 and broker.service["r"] == 60


def test_a_resumed_job_carries_the_token_ids_it_delivered() -> None:
    broker = Broker(PoolConfig())
    link, _ = worker(broker)
    j = job(app("x"))
    broker.submit(j)
    broker.on_message(link, wire.Started(j.id, 3))
    broker.on_message(link, wire.Token(j.id, "ab", 2, [7, 8]))
    broker.remove_worker(link)
    _, sent = worker(broker)
    assert (sent[-1].resume_text, sent[-1].resume_tokens, sent[-1].resume_ids) == ("ab", 2, [7, 8])


def test_a_call_waits_for_a_worker_of_its_model_and_asks_for_one() -> None:
    """A call for a model no worker serves is held (its model told to `unserved_listeners`, which
    `amphibia up` uses to start the embedding model's worker) until a worker of that model joins; a
    worker of another model joining meanwhile leaves it held (it used to spin the loop forever)."""
    broker = Broker(PoolConfig())
    asked: list[str] = []
    broker.unserved_listeners.append(asked.append)
    embed = CallJob(app("e"), Call("minilm", "embed", {"texts": ["t"]}), CallResult())
    broker.submit_call(embed)
    assert asked == ["minilm"] and list(broker._pending_calls) == [embed]
    _, other_sent = worker(broker)  # serves "m" only
    assert list(broker._pending_calls) == [embed] and not other_sent
    sent: list = []
    broker.add_worker(WorkerLink("w-e", ["minilm"], 1, "cpu", sent.append))
    assert not broker._pending_calls and sent[-1].id == embed.id
