"""Prometheus metrics of the pool, in a registry of their own (one per gateway)."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("amphibia_queue_depth", "Requests waiting for a slot", ["app"], registry=r)
        self.running = Gauge("amphibia_running_sequences", "Sequences running on a worker", ["worker"], registry=r)
        self.workers = Gauge("amphibia_workers", "Connected workers", registry=r)
        self.ttft = Histogram("amphibia_time_to_first_token_seconds", "Queueing + prefill until the first token",
                              ["app"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("amphibia_inter_token_seconds", "Time between tokens of one request", ["app"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("amphibia_queue_wait_seconds", "Time from submit to first slot", ["app"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        # Where a request's time to first token goes, as the gateway sees it: waiting for a slot, the
        # assign frame's trip and the worker's admission (its Started back), then prefill and first
        # decode (its first Token back). `amphibia bench pool` reads these for its timeline.
        self.first_token_hops = Histogram("amphibia_first_token_hop_seconds", "Time to first token, by hop", ["hop"],
                                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                                          registry=r)
        self.tokens = Counter("amphibia_generated_tokens", "Generated tokens", ["app"], registry=r)
        self.preemptions = Counter("amphibia_preemptions", "Sequences preempted by time slicing", ["app"], registry=r)
        self.rejections = Counter("amphibia_rejections", "Requests refused", ["app", "reason"], registry=r)
        # A worker that keeps dying (a bad GGUF, the OOM killer) shows here before anyone reads a log.
        self.worker_restarts = Counter("amphibia_worker_restarts", "Local worker processes restarted after they exited",
                                       ["worker"], registry=r)


class Labelled:
    """A labelled metric's children, each looked up once: `labels()` takes a lock and checks its
    values on every call, and the broker asks for a child per token (`amphibia bench broker`)."""

    def __init__(self, metric: Counter | Gauge | Histogram) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Counter | Gauge | Histogram] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child
