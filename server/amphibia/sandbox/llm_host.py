"""The `amphibia:ai/llm` host interface: WIT values in, the inference service, WIT values out.

Each function runs on the guest's thread and blocks while the host works (the guest's CPU deadline
is paused meanwhile). The app on whose behalf it runs is the caller the service is given; errors
become the WIT `error` variant through the one table in `errors`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from wasmtime.component import LinkerInstance, Record, ResourceHost, ResourceType, Variant

from .. import errors
from ..contract import interface
from ..inference.service import InferenceService
from ..inference.stream import TokenStream
from ..inference.types import Generation, SamplingParams
from .context import RequestContext, current

INTERFACE = interface("llm")
TOKEN_STREAM = 1  # our host-defined resource type id for `token-stream`
log = logging.getLogger("amphibia.llm")


def _record(**fields: Any) -> Record:
    r = Record()
    for name, value in fields.items():
        setattr(r, name.replace("_", "-"), value)
    return r


def to_wit_error(exc: errors.AmphibiaError) -> Variant:
    error = errors.as_llm_error(exc)
    if error.wit == "model-not-supported":
        return Variant(error.wit)
    if error.wit == "overloaded":
        return Variant(error.wit, errors.retry_after_ms(error))
    return Variant(error.wit, error.message)


def params_from_wit(params: Any) -> SamplingParams:
    if params is None:
        return SamplingParams()
    get = lambda name: getattr(params, name)  # noqa: E731 - kebab-case attribute names
    return SamplingParams(
        max_tokens=get("max-tokens"),
        temperature=get("temperature"),
        top_k=get("top-k"),
        top_p=get("top-p"),
        repeat_penalty=get("repeat-penalty"),
        repeat_last_n=get("repeat-penalty-last-n-token-count"),
        stop=tuple(get("stop")),
        seed=get("seed"),
        json_schema=get("json-schema"),
        grammar=get("grammar"),
    )


class LlmHost:
    interface = INTERFACE

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def _guard(self, fn: Callable[..., Any], method: bool = False) -> Callable[..., Any]:
        """Run `fn` with the request's context, outside the guest's CPU deadline, errors as WIT values.

        For a resource `method`, the borrowed handle arrives as `ResourceAny`; `fn` gets its rep.
        """

        def call(store: Any, *args: Any) -> Any:
            ctx = current.get()
            try:
                if ctx.end.error is not None:  # the client left or the wall clock ran out
                    raise ctx.end.error
                if method:
                    args = (args[0].to_host(store).rep, *args[1:])
                with ctx.host_wait():
                    return fn(ctx, *args)
            except errors.AmphibiaError as exc:
                log.info("app=%s request=%s llm.%s: %s: %s", ctx.app.name, ctx.request_id, fn.__name__,
                         exc.type, exc.message)
                return to_wit_error(exc)
            except Exception as exc:  # a host bug must not trap the guest or kill the server
                log.exception("app=%s request=%s llm.%s failed", ctx.app.name, ctx.request_id, fn.__name__)
                return to_wit_error(errors.LLMError(f"internal error: {exc}"))

        return call

    def _generation(self, ctx: RequestContext, model: str, params: Any, prompt: str | None = None,
                    messages: Any = None) -> Generation:
        if messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in messages]
        return self.service.generation(ctx.app, model=model, prompt=prompt, messages=messages,
                                       params=params_from_wit(params), request_id=ctx.request_id)

    def _complete(self, ctx: RequestContext, generation: Generation) -> Record:
        stream = self.service.stream(ctx.app, generation)
        ctx.end.track(stream)
        try:
            out = stream.collect()
        finally:
            ctx.end.untrack(stream)
        return _record(text=out.text, usage=_record(prompt_token_count=out.usage.prompt_tokens,
                                                    generated_token_count=out.usage.generated_tokens))

    def _open_stream(self, ctx: RequestContext, generation: Generation) -> ResourceHost:
        stream = self.service.stream(ctx.app, generation)
        ctx.end.track(stream)
        return ResourceHost.own(ctx.add_resource(stream), TOKEN_STREAM)

    # --- the interface's functions ----------------------------------------------------------------------
    def infer(self, ctx: RequestContext, model: str, prompt: str, params: Any) -> Record:
        return self._complete(ctx, self._generation(ctx, model, params, prompt=prompt))

    def chat(self, ctx: RequestContext, model: str, messages: Any, params: Any) -> Record:
        return self._complete(ctx, self._generation(ctx, model, params, messages=messages))

    def infer_stream(self, ctx: RequestContext, model: str, prompt: str, params: Any) -> ResourceHost:
        return self._open_stream(ctx, self._generation(ctx, model, params, prompt=prompt))

    def chat_stream(self, ctx: RequestContext, model: str, messages: Any, params: Any) -> ResourceHost:
        return self._open_stream(ctx, self._generation(ctx, model, params, messages=messages))

    def stream_next(self, ctx: RequestContext, rep: int) -> str | None:
        stream: TokenStream | None = ctx.resources.get(rep)
        if stream is None:
            raise errors.InvalidInput("token stream is closed")
        return stream.next_piece()

    def _call(self, ctx: RequestContext, model: str, method: str, args: dict) -> Any:
        return self.service.run_call(ctx.app, self.service.call_request(ctx.app, model, method, args, ctx.request_id))

    def generate_embeddings(self, ctx: RequestContext, model: str, texts: list[str]) -> Record:
        value = self._call(ctx, model, "embed", {"texts": texts})
        return _record(embeddings=value["embeddings"], usage=_record(prompt_token_count=value["prompt_tokens"]))

    def tokenize(self, ctx: RequestContext, model: str, text: str) -> list[int]:
        return self._call(ctx, model, "tokenize", {"text": text})

    def detokenize(self, ctx: RequestContext, model: str, tokens: list[int]) -> str:
        return self._call(ctx, model, "detokenize", {"tokens": tokens})

    # --- wiring -----------------------------------------------------------------------------------------
    @staticmethod
    def _drop_stream(store: Any, rep: int) -> None:
        ctx = current.get()
        stream = ctx.resources.pop(rep, None)
        if stream is not None:
            ctx.end.untrack(stream)
            stream.cancel()  # the guest stopped reading: free the engine's slot now

    def add_to_linker(self, root: LinkerInstance) -> None:
        with root.add_instance(INTERFACE) as li:
            li.add_resource("token-stream", ResourceType.host(TOKEN_STREAM), self._drop_stream)
            li.add_func("infer", self._guard(self.infer))
            li.add_func("chat", self._guard(self.chat))
            li.add_func("infer-stream", self._guard(self.infer_stream))
            li.add_func("chat-stream", self._guard(self.chat_stream))
            li.add_func("[method]token-stream.next", self._guard(self.stream_next, method=True))
            li.add_func("generate-embeddings", self._guard(self.generate_embeddings))
            li.add_func("tokenize", self._guard(self.tokenize))
            li.add_func("detokenize", self._guard(self.detokenize))
