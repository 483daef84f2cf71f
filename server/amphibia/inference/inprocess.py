"""The in-process engine: each model runs in a batcher of its own, on a thread that owns it.

That thread loads the model and runs the same batching loop as a pool worker, so a generation takes
the same path (scheduling, stop strings, UTF-8, length checks) wherever it runs. Requests go to the
batcher as wire messages; its answers are routed by id to each request's sink, on the model's thread.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Mapping

from ..config import AppSpec, ModelSpec
from ..errors import InferenceTimeout, LLMError, ModelNotSupported, Overloaded
from .engine import Cancel, CallSink, GenerationSink
from .pool import jobs, wire
from .pool.batcher import Batcher
from .types import Call, Generation

log = logging.getLogger("amphibia.engine")
Deliver = Callable[[wire.Message], bool]  # hands a message to a request's sink; True once it has ended


class ModelRunner:
    """One model: the thread that owns it, its batcher's inbox, and where each request's answers go.
    Up to `slots` requests run and `max_waiting` more wait; beyond that a request is Overloaded."""

    def __init__(self, spec: ModelSpec, slots: int, max_waiting: int = 256) -> None:
        self.spec, self.slots, self.max_waiting = spec, slots, max_waiting
        self._inbox: queue.Queue[wire.Message | None] = queue.Queue()  # filled even while the model loads
        self._routes: dict[str, Deliver] = {}
        self._lock = threading.Lock()  # guards _routes: callers add and cancel, the model's thread delivers
        self._loaded = threading.Event()
        self._down: str | None = None  # why this model serves nothing (it failed to load, or is closed)
        self._thread = threading.Thread(target=self._run, name=f"llama-{spec.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from .llama_model import LlamaModel  # llama.cpp is loaded only where a model runs

        spec = self.spec
        try:
            model = LlamaModel(spec.gguf_path(), spec.n_ctx, spec.gpu_layers, spec.threads, self.slots, spec.flash_attn,
                               embeddings_only=spec.purpose == "embeddings")
        except Exception as exc:  # reported to every request instead of killing the thread silently
            log.error("model %s failed to load: %s", spec.name, exc)
            self._stop(f"failed to load: {exc}")
            return
        log.info("model %s loaded from %s", spec.name, spec.gguf_path())
        self._loaded.set()
        try:
            Batcher(model, self._deliver, inbox=self._inbox).run()
        except Exception:
            log.exception("model %s stopped", spec.name)
        finally:
            self._stop("is closed")
            model.close()

    def _stop(self, reason: str) -> None:
        """Take no more requests, and fail those in hand."""
        with self._lock:
            self._down = reason
            in_hand = list(self._routes)
        self._loaded.set()
        for job_id in in_hand:
            self._deliver(jobs.failed_message(job_id, self._error()))

    def _error(self) -> LLMError:
        return LLMError(f"model {self.spec.name} {self._down}")

    def _deliver(self, message: wire.Message) -> None:
        job_id = getattr(message, "id", "")
        with self._lock:
            deliver = self._routes.get(job_id)
        if deliver is None:  # ended already
            return
        try:
            ended = deliver(message)
        except Exception:  # a broken sink must not stop the model's thread
            log.exception("a sink failed on %s", message.type)
            ended = True
        if ended:
            with self._lock:
                self._routes.pop(job_id, None)

    def submit(self, message: wire.Assign | wire.Call, deliver: Deliver) -> Cancel:
        """Queue `message`, its answers going to `deliver`; returns what cancels it."""
        with self._lock:
            if self._down is not None:
                raise self._error()
            if len(self._routes) >= self.slots + self.max_waiting:
                raise Overloaded(f"model {self.spec.name} has {len(self._routes)} requests in hand")
            self._routes[message.id] = deliver
        self._inbox.put(message)

        def cancel() -> None:  # the batcher frees the slot and ends the request ("cancelled")
            with self._lock:
                held = message.id in self._routes
            if held:
                self._inbox.put(wire.Cancel(message.id))

        return cancel

    def wait_loaded(self, timeout_s: float) -> None:
        if not self._loaded.wait(timeout_s):
            raise InferenceTimeout(f"model {self.spec.name} is still loading after {timeout_s:g} s")
        if self._down is not None:
            raise self._error()

    def close(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout_s)


class InProcessEngine:
    """`engine.Engine` over llama.cpp in this process: per model, one owning thread decoding up to
    `slots` sequences together. A model loads on its first request, or on `warm`."""

    def __init__(self, models: dict[str, ModelSpec], slots: int = 4) -> None:
        self.specs = dict(models)
        self.slots = slots
        self._runners: dict[str, ModelRunner] = {}
        self._closed = False
        self._lock = threading.Lock()  # guards _runners: callers on many threads may start a model at once

    def _runner(self, model: str) -> ModelRunner:
        if model not in self.specs:
            raise ModelNotSupported(f"model {model!r} is not served here; models: {', '.join(self.specs) or 'none'}")
        with self._lock:
            if self._closed:
                raise LLMError("the in-process engine is closed")
            if model not in self._runners:
                self._runners[model] = ModelRunner(self.specs[model], self.slots)
            return self._runners[model]

    def warm(self, model: str, timeout_s: float = 120.0) -> None:
        """Load `model` now, so that its first request does not wait for it."""
        self._runner(model).wait_loaded(timeout_s)

    def models(self) -> Mapping[str, int]:
        return {name: spec.n_ctx for name, spec in self.specs.items()}

    def purposes(self) -> Mapping[str, str]:
        return {name: spec.purpose for name, spec in self.specs.items()}

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        message = jobs.assign_message(jobs.next_id(), generation)
        return self._runner(generation.model).submit(message, lambda m: jobs.deliver_generation(m, sink))

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        message = jobs.call_message(jobs.next_id("c"), call)
        return self._runner(call.model).submit(message, lambda m: jobs.deliver_call(m, sink))

    def close(self) -> None:
        """Stop every model's thread; requests still in hand fail."""
        with self._lock:
            self._closed = True
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()
