"""The inference service: the one way into inference, for every entrance.

Guests (`sandbox.llm_host`), the OpenAI and Spin APIs, the browser bridge and notebooks all call
this, naming the caller (the app on whose behalf the work runs). It resolves the model with one
rule, checks every value once (types, ranges, sizes, valid UTF-8), and hands an engine work it can
trust. Each entrance only maps the errors raised here to its own shape (HTTP status, WIT variant,
wire message).
"""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Mapping, Sequence

from ..config import AppSpec
from ..errors import InvalidInput, ModelNotAllowed, ModelNotSupported
from . import chat_template, grammar
from .engine import Engine
from .pool import jobs, wire
from .stream import AsyncTokenStream, CallWaiter, TokenStream
from .types import CALL_METHODS, Call, Generation, SamplingParams

MAX_TEXT_BYTES = 512 * 1024  # a prompt, conversation, text or resume: far more than any context holds
MAX_MESSAGES = 1024
MAX_EMBED_TEXTS = 256
MAX_TOKENS_IN = 65536  # token ids one detokenize takes
# A request must fit one wire frame with room to spare (a resumed generation also carries its text).
MAX_REQUEST_FRAME = wire.MAX_FRAME_BYTES - 64 * 1024
# Embeddings go to engines in batches this small, so each batch's vectors fit one frame back even for
# wide models (8 x 4096 dimensions is about 0.7 MB of JSON).
EMBED_BATCH = 8


def _fits_a_frame(message: wire.Message, what: str) -> None:
    size = len(message.encode())
    if size > MAX_REQUEST_FRAME:
        raise InvalidInput(f"{what} is {size} bytes as sent to the model; at most {MAX_REQUEST_FRAME} fit")


def utf8_text(value: Any, what: str, *, allow_empty: bool = True) -> str:
    """`value` as text that encodes to UTF-8 (no lone surrogates) within MAX_TEXT_BYTES."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    if not value and not allow_empty:
        raise InvalidInput(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8 text (at character {exc.start})") from None
    if size > MAX_TEXT_BYTES:
        raise InvalidInput(f"{what} is {size} bytes; at most {MAX_TEXT_BYTES} are taken")
    return value


def _messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, (list, tuple)):
        raise InvalidInput("messages must be a list")
    if len(messages) > MAX_MESSAGES:
        raise InvalidInput(f"messages holds {len(messages)} items; at most {MAX_MESSAGES} are taken")
    checked = chat_template.validate_messages(messages)
    total = 0
    for i, m in enumerate(checked):
        total += len(utf8_text(m["content"], f"messages[{i}].content").encode())
    if total > MAX_TEXT_BYTES:
        raise InvalidInput(f"messages hold {total} bytes; at most {MAX_TEXT_BYTES} are taken")
    return tuple(checked)


class InferenceService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- checks -----------------------------------------------------------------------------------
    def models(self) -> Mapping[str, int]:
        return self.engine.models()

    def resolve_model(self, caller: AppSpec, model: Any, purpose: str | None = "generation") -> str:
        """The caller's default for ""/None (its `embedding_model` for embeddings), else `model` if it
        is served and the caller may use it; and a model for `purpose` (None: any, as for tokenize)."""
        if model is None or model == "":
            model = caller.embedding_model if purpose == "embeddings" else caller.model
        if not isinstance(model, str):
            raise InvalidInput("model must be a model name")
        served = self.models()
        if model not in served:
            raise ModelNotSupported(f"model {model!r} is not served here; models: {', '.join(served) or 'none'}")
        if not caller.allows(model):
            raise ModelNotAllowed(
                f"app {caller.name!r} may not use model {model!r}; add it to allowed_models in the app's "
                f"app.toml or its [apps.{caller.name}] table in amphibia.toml")
        purposes = getattr(self.engine, "purposes", None)  # an engine that does not say is not checked
        actual = purposes().get(model) if purposes is not None else None
        if purpose is not None and actual is not None and actual != purpose:
            other = caller.embedding_model if purpose == "embeddings" else caller.model
            raise InvalidInput(f"model {model!r} is a model for {actual}, not {purpose}; "
                               f"use {purpose} model {other!r} (or name none)")
        return model

    def params(self, model: str, params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            if not isinstance(params, Mapping):
                raise InvalidInput("params must be an object")
            params = SamplingParams.from_dict(dict(params))
        for i, stop in enumerate(params.stop):
            utf8_text(stop, f"stop[{i}]")
        params = params.validate(self.models()[model])
        if params.json_schema is not None:  # engines and the wire see only the grammar it becomes
            params = replace(params, json_schema=None, grammar=grammar.schema_to_grammar(params.json_schema))
        elif params.grammar is not None:
            params = replace(params, grammar=grammar.check_grammar(params.grammar))
        return params

    def generation(self, caller: AppSpec, *, model: Any = "", prompt: Any = None, messages: Any = None,
                   params: SamplingParams | Mapping[str, Any] | None = None, resume_text: Any = "",
                   resume_tokens: Any = 0, request_id: str = "") -> Generation:
        model = self.resolve_model(caller, model)
        checked = self.params(model, params)
        if messages is not None:
            messages, prompt = _messages(messages), None
        else:
            prompt = utf8_text(prompt, "prompt", allow_empty=False)
        resume_text = utf8_text(resume_text, "resume_text")
        if isinstance(resume_tokens, bool) or not isinstance(resume_tokens, int):
            raise InvalidInput("resume_tokens must be an integer")
        generation = Generation(model=model, params=checked, prompt=prompt, messages=messages,
                                resume_text=resume_text, request_id=request_id,
                                resume_tokens=max(0, min(resume_tokens, checked.max_tokens)))
        _fits_a_frame(jobs.assign_message("j", generation), "the request")
        return generation

    def call_request(self, caller: AppSpec, model: Any, method: Any, args: Any, request_id: str = "") -> Call:
        model = self.resolve_model(caller, model, "embeddings" if method == "embed" else None)
        if method not in CALL_METHODS:
            raise InvalidInput(f"unknown call {method!r}; calls: {', '.join(CALL_METHODS)}")
        if not isinstance(args, Mapping):
            raise InvalidInput(f"{method}: args must be an object")
        if method == "embed":
            checked: dict[str, Any] = {"texts": self._texts(args.get("texts"))}
        elif method == "tokenize":
            checked = {"text": utf8_text(args.get("text"), "text")}
        else:
            checked = {"tokens": self._tokens(args.get("tokens"))}
        call = Call(model=model, method=method, args=checked, request_id=request_id)
        for part in _batches(call):
            _fits_a_frame(jobs.call_message("c", part), f"{method}'s input")
        return call

    @staticmethod
    def _texts(texts: Any) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not 1 <= len(texts) <= MAX_EMBED_TEXTS:
            raise InvalidInput(f"texts must be a string or a list of 1 to {MAX_EMBED_TEXTS} strings")
        return [utf8_text(t, f"texts[{i}]") for i, t in enumerate(texts)]

    @staticmethod
    def _tokens(tokens: Any) -> list[int]:
        if not isinstance(tokens, (list, tuple)) or len(tokens) > MAX_TOKENS_IN:
            raise InvalidInput(f"tokens must be a list of at most {MAX_TOKENS_IN} token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in tokens):
            raise InvalidInput("tokens must be non-negative integers")
        return list(tokens)

    # --- running: a blocking view for guest threads, an awaitable one for the event loop -----------
    def stream(self, caller: AppSpec, generation: Generation, timeout_s: float | None = None) -> TokenStream:
        stream = TokenStream(caller.limits.llm_timeout_s if timeout_s is None else timeout_s)
        stream.attach(self.engine.generate(caller, generation, stream))
        return stream

    def astream(self, caller: AppSpec, generation: Generation, timeout_s: float | None = None) -> AsyncTokenStream:
        """Call on the event loop; iterate the result there."""
        stream = AsyncTokenStream(caller.limits.llm_timeout_s if timeout_s is None else timeout_s)
        stream.attach(self.engine.generate(caller, generation, stream))
        return stream

    def _waiter(self, caller: AppSpec, call: Call, timeout_s: float | None) -> CallWaiter:
        waiter = CallWaiter(caller.limits.llm_timeout_s if timeout_s is None else timeout_s, call.method)
        waiter.attach(self.engine.call(caller, call, waiter))
        return waiter

    def _waiters(self, caller: AppSpec, call: Call, timeout_s: float | None) -> list[CallWaiter]:
        """The call's batches, all submitted at once (the pool may spread them over its workers)."""
        waiters: list[CallWaiter] = []
        try:
            for part in _batches(call):
                waiters.append(self._waiter(caller, part, timeout_s))
        except BaseException:
            _cancel(waiters)
            raise
        return waiters

    def run_call(self, caller: AppSpec, call: Call, timeout_s: float | None = None) -> Any:
        waiters = self._waiters(caller, call, timeout_s)
        try:
            return _merge([w.wait() for w in waiters])
        except BaseException:
            _cancel(waiters)
            raise

    async def arun_call(self, caller: AppSpec, call: Call, timeout_s: float | None = None) -> Any:
        waiters = self._waiters(caller, call, timeout_s)
        try:
            return _merge(await asyncio.gather(*(w.wait_async() for w in waiters)))
        except BaseException:
            _cancel(waiters)
            raise

    # --- conveniences for callers outside an entrance (tests, notebooks) ---------------------------
    def embed(self, caller: AppSpec, model: str, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        value = self.run_call(caller, self.call_request(caller, model, "embed", {"texts": list(texts)}))
        return value["embeddings"], value["prompt_tokens"]

    def tokenize(self, caller: AppSpec, model: str, text: str) -> list[int]:
        return self.run_call(caller, self.call_request(caller, model, "tokenize", {"text": text}))

    def detokenize(self, caller: AppSpec, model: str, tokens: Sequence[int]) -> str:
        return self.run_call(caller, self.call_request(caller, model, "detokenize", {"tokens": list(tokens)}))


def _batches(call: Call) -> list[Call]:
    """An embed call as calls of at most EMBED_BATCH texts (any other call as itself)."""
    texts = call.args.get("texts") if call.method == "embed" else None
    if texts is None or len(texts) <= EMBED_BATCH:
        return [call]
    return [replace(call, args={"texts": texts[i:i + EMBED_BATCH]}) for i in range(0, len(texts), EMBED_BATCH)]


def _cancel(waiters: list[CallWaiter]) -> None:
    """One batch failed or the caller left: free the other batches' slots."""
    for waiter in waiters:
        waiter.cancel()


def _merge(values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    return {"embeddings": [v for value in values for v in value["embeddings"]],
            "prompt_tokens": sum(value["prompt_tokens"] for value in values)}
