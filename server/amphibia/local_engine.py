"""The in-process engine: each model is loaded once and owned by one thread that runs its jobs in turn.

Guest threads submit jobs and wait on their own `TokenStream` or future; nothing else touches a
llama.cpp context, so no locks are needed around it. The pool of workers (next step) replaces this
behind the same `engine.Engine` interface.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from . import chat_template
from .config import ModelSpec
from .engine import GenerateRequest, TokenStream, Usage, no_such_model
from .errors import AmphibiaError, InferenceTimeout, LLMError, Overloaded
from .llama_model import LlamaModel

log = logging.getLogger("amphibia.engine")


class ModelRunner:
    """One model, one owning thread, one FIFO of jobs."""

    def __init__(self, spec: ModelSpec, max_queue: int = 256) -> None:
        self.spec = spec
        self._jobs: queue.Queue[Callable[[LlamaModel], None] | None] = queue.Queue(max_queue)
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.model: LlamaModel | None = None
        self._thread = threading.Thread(target=self._run, name=f"llama-{spec.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.model = LlamaModel(self.spec.gguf_path(), self.spec.n_ctx, self.spec.gpu_layers, self.spec.threads)
            log.info("model %s loaded from %s", self.spec.name, self.spec.gguf_path())
        except BaseException as exc:  # reported to every caller instead of killing the thread silently
            self._load_error = exc
            log.error("model %s failed to load: %s", self.spec.name, exc)
        finally:
            self._loaded.set()
        while (job := self._jobs.get()) is not None:
            if self.model is None:
                continue
            try:
                job(self.model)
            except Exception:  # a job reports its own errors; this is a bug guard, never fatal
                log.exception("engine job failed")
        if self.model is not None:
            self.model.close()

    def wait_loaded(self, timeout: float | None = None) -> LlamaModel:
        if not self._loaded.wait(timeout):
            raise InferenceTimeout(f"model {self.spec.name} is still loading")
        if self.model is None:
            raise LLMError(f"model {self.spec.name} failed to load: {self._load_error}")
        return self.model

    def submit(self, job: Callable[[LlamaModel], None]) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"model {self.spec.name} has {self._jobs.qsize()} jobs waiting", 1000) from None

    def call(self, fn: Callable[[LlamaModel], Any], timeout_s: float) -> Any:
        """Run `fn` on the owning thread and wait for its result."""
        self.wait_loaded(timeout_s)
        future: Future[Any] = Future()

        def job(model: LlamaModel) -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(model))
            except BaseException as exc:
                future.set_exception(exc)

        self.submit(job)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise InferenceTimeout(f"model {self.spec.name} did not answer within {timeout_s:g} s") from None

    def close(self) -> None:
        self._jobs.put(None)


class LocalEngine:
    """`engine.Engine` over in-process llama.cpp; one call at a time per model."""

    def __init__(self, models: dict[str, ModelSpec]) -> None:
        self.specs = dict(models)
        self._runners: dict[str, ModelRunner] = {}
        self._lock = threading.Lock()  # guards _runners: guest threads may start a model concurrently

    def runner(self, model: str) -> ModelRunner:
        if model not in self.specs:
            raise no_such_model(model, list(self.specs))
        with self._lock:
            if model not in self._runners:
                self._runners[model] = ModelRunner(self.specs[model])
            return self._runners[model]

    def warm(self, model: str, timeout_s: float = 120.0) -> None:
        """Load `model` now, so the first request does not pay for it."""
        self.runner(model).wait_loaded(timeout_s)

    def has_model(self, model: str) -> bool:
        return model in self.specs

    def context_size(self, model: str) -> int:
        if model not in self.specs:
            raise no_such_model(model, list(self.specs))
        return self.specs[model].n_ctx

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream:
        runner = self.runner(request.model)
        request.params.validate(self.context_size(request.model))
        stream = TokenStream(timeout_s)
        if request.messages is not None:
            # Validate before queueing, so a bad message fails at once and in the caller's thread.
            chat_template.validate_messages(request.messages)

        def job(model: LlamaModel) -> None:
            if stream.cancelled:
                return
            try:
                prompt = request.prompt
                if request.messages is not None:
                    prompt = chat_template.render(model.chat_template, request.messages, model.bos_token, model.eos_token)
                result = model.generate(prompt or "", request.params, stream.put, lambda: stream.cancelled)
                stream.finish(Usage(result.prompt_tokens, result.generated_tokens), result.finish_reason)
            except AmphibiaError as exc:
                stream.fail(exc)
            except Exception as exc:
                log.exception("generation failed app=%s request=%s", request.app, request.request_id)
                stream.fail(LLMError(f"generation failed: {exc}"))

        runner.wait_loaded(timeout_s)
        runner.submit(job)
        return stream

    def embed(self, model: str, texts: Sequence[str], timeout_s: float = 120.0) -> tuple[list[list[float]], int]:
        return self.runner(model).call(lambda m: m.embed(texts), timeout_s)

    def tokenize(self, model: str, text: str, timeout_s: float = 30.0) -> list[int]:
        return self.runner(model).call(lambda m: m.tokenize(text, add_special=False, parse_special=False), timeout_s)

    def detokenize(self, model: str, tokens: Sequence[int], timeout_s: float = 30.0) -> str:
        return self.runner(model).call(lambda m: m.detokenize(tokens), timeout_s)

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
