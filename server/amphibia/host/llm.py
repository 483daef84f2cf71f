"""The `amphibia:ai/llm` host interface: WIT values in, `engine.Engine` calls, WIT values out.

Everything model-specific lives behind the engine; this module only translates, checks what the
app may use, and maps errors onto the WIT `error` variant.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from wasmtime.component import LinkerInstance, Record, ResourceHost, ResourceType, Variant

from .. import errors
from ..engine import Engine, GenerateRequest, SamplingParams, TokenStream
from .context import RequestContext, current

INTERFACE = "amphibia:ai/llm@0.1.0"
TOKEN_STREAM = 1  # our host-defined resource type id for `token-stream`
MAX_EMBED_TEXTS = 256
log = logging.getLogger("amphibia.llm")


def _record(**fields: Any) -> Record:
    r = Record()
    for name, value in fields.items():
        setattr(r, name.replace("_", "-"), value)
    return r


def to_wit_error(exc: errors.AmphibiaError) -> Variant:
    if isinstance(exc, errors.ModelNotSupported):
        return Variant("model-not-supported")
    if isinstance(exc, errors.InvalidInput):
        return Variant("invalid-input", exc.message)
    if isinstance(exc, errors.Overloaded):
        return Variant("overloaded", int(exc.retry_after_ms))
    if isinstance(exc, errors.InferenceTimeout):
        return Variant("timeout", exc.message)
    return Variant("runtime-error", exc.message)


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
    )


class LlmHost:
    interface = INTERFACE

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- checks shared by every call ----------------------------------------------------------------
    def model_for(self, ctx: RequestContext, model: str) -> str:
        """The app's default for "", else `model` if this host serves it and the app may use it."""
        model = model or ctx.app.model
        if not self.engine.has_model(model):
            raise errors.ModelNotSupported(f"model {model!r} is not served here")
        if not ctx.app.allows(model):
            raise errors.InvalidInput(
                f"app {ctx.app.name!r} may not use model {model!r}; add it to allowed_models in the "
                f"app's app.toml or its [apps.{ctx.app.name}] table in amphibia.toml")
        return model

    def _guard(self, fn: Callable[..., Any], method: bool = False) -> Callable[..., Any]:
        """Run `fn` with the request's context, outside the guest's CPU deadline, errors as WIT values.

        For a resource `method`, the borrowed handle arrives as `ResourceAny`; `fn` gets its rep.
        """

        def call(store: Any, *args: Any) -> Any:
            ctx = current.get()
            try:
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
                return Variant("runtime-error", f"internal error: {exc}")

        return call

    def _request(self, ctx: RequestContext, model: str, params: Any, prompt: str | None = None,
                 messages: Any = None) -> GenerateRequest:
        model = self.model_for(ctx, model)
        if messages is not None:
            messages = tuple({"role": m.role, "content": m.content} for m in messages)
        elif not prompt:
            raise errors.InvalidInput("prompt must not be empty")
        return GenerateRequest(model=model, prompt=prompt, messages=messages, params=params_from_wit(params),
                               app=ctx.app.name, request_id=ctx.request_id)

    def _complete(self, ctx: RequestContext, request: GenerateRequest) -> Record:
        out = self.engine.generate(request, ctx.app.limits.llm_timeout_s).collect()
        return _record(text=out.text, usage=_record(prompt_token_count=out.usage.prompt_tokens,
                                                    generated_token_count=out.usage.generated_tokens))

    def _open_stream(self, ctx: RequestContext, request: GenerateRequest) -> ResourceHost:
        stream = self.engine.generate(request, ctx.app.limits.llm_timeout_s)
        return ResourceHost.own(ctx.add_resource(stream), TOKEN_STREAM)

    # --- the interface's functions ----------------------------------------------------------------------
    def infer(self, ctx: RequestContext, model: str, prompt: str, params: Any) -> Record:
        return self._complete(ctx, self._request(ctx, model, params, prompt=prompt))

    def chat(self, ctx: RequestContext, model: str, messages: Any, params: Any) -> Record:
        return self._complete(ctx, self._request(ctx, model, params, messages=messages))

    def infer_stream(self, ctx: RequestContext, model: str, prompt: str, params: Any) -> ResourceHost:
        return self._open_stream(ctx, self._request(ctx, model, params, prompt=prompt))

    def chat_stream(self, ctx: RequestContext, model: str, messages: Any, params: Any) -> ResourceHost:
        return self._open_stream(ctx, self._request(ctx, model, params, messages=messages))

    def stream_next(self, ctx: RequestContext, rep: int) -> str | None:
        stream: TokenStream | None = ctx.resources.get(rep)
        if stream is None:
            raise errors.InvalidInput("token stream is closed")
        return stream.next_piece()

    def generate_embeddings(self, ctx: RequestContext, model: str, texts: list[str]) -> Record:
        model = self.model_for(ctx, model)
        if not texts or len(texts) > MAX_EMBED_TEXTS:
            raise errors.InvalidInput(f"text must hold 1 to {MAX_EMBED_TEXTS} strings")
        vectors, used = self.engine.embed(model, texts, ctx.app.limits.llm_timeout_s)
        return _record(embeddings=vectors, usage=_record(prompt_token_count=used))

    def tokenize(self, ctx: RequestContext, model: str, text: str) -> list[int]:
        return self.engine.tokenize(self.model_for(ctx, model), text)

    def detokenize(self, ctx: RequestContext, model: str, tokens: list[int]) -> str:
        return self.engine.detokenize(self.model_for(ctx, model), tokens)

    # --- wiring -----------------------------------------------------------------------------------------
    @staticmethod
    def _drop_stream(store: Any, rep: int) -> None:
        stream = current.get().resources.pop(rep, None)
        if stream is not None:
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
