"""The component's imports for an app running from its source in Pyodide (`amphibia dev`'s page).

The SDK calls the WIT bindings (`wit_world.imports.llm`, `...response_stream`); in a build,
componentize-py backs them with the component's imports. Here the same generated modules are loaded
(the gateway sends them) and this module puts the page's engines behind their functions: the very
objects the compiled app gets in the page (`engines.js` `llmImports`, or `sync.js` where JSPI is
missing). Under JSPI each call returns a promise and `run_sync` suspends this Python stack until it
settles, which is why `handle` is entered with `callPromising`; the Atomics path answers at once.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import amphibia_js  # registered by pyodide-worker.js: llm, stream_start, stream_write, dispose
import js
from componentize_py_types import Err
from pyodide.ffi import JsException, run_sync, to_js
from wit_world.imports import http as wit_http
from wit_world.imports import llm as wit_llm
from wit_world.imports import response_stream

sys.dont_write_bytecode = True  # an edit within the same second must never load a stale .pyc

_ERRORS = {
    "model-not-supported": lambda val: wit_llm.Error_ModelNotSupported(),
    "invalid-input": lambda val: wit_llm.Error_InvalidInput(str(val)),
    "runtime-error": lambda val: wit_llm.Error_RuntimeError(str(val)),
    "overloaded": lambda val: wit_llm.Error_Overloaded(int(val or 0)),
    "timeout": lambda val: wit_llm.Error_Timeout(str(val)),
}


def _js(value: Any) -> Any:
    return to_js(value, dict_converter=js.Object.fromEntries)


def _wait(value: Any) -> Any:
    return run_sync(value) if hasattr(value, "then") else value


def _call(fn: Any, *args: Any) -> Any:
    """Call an engine import and wait for it; its error (a JS Error carrying the WIT case as
    `payload`) becomes the `Err` the bindings raise in a component."""
    try:
        return _wait(fn(*args))
    except JsException as exc:
        payload = getattr(exc, "payload", None)
        tag = getattr(payload, "tag", None)
        make = _ERRORS.get(tag, _ERRORS["runtime-error"])
        raise Err(make(getattr(payload, "val", None) if tag else str(getattr(exc, "message", exc)))) from None


def _params(params: wit_llm.InferencingParams | None) -> Any:
    if params is None:
        return None
    return _js({
        "maxTokens": params.max_tokens, "repeatPenalty": params.repeat_penalty,
        "repeatPenaltyLastNTokenCount": params.repeat_penalty_last_n_token_count,
        "temperature": params.temperature, "topK": params.top_k, "topP": params.top_p,
        "stop": list(params.stop), "seed": params.seed,
        "jsonSchema": params.json_schema, "grammar": params.grammar,
    })


def _messages(messages: list[wit_llm.Message]) -> Any:
    return _js([{"role": m.role, "content": m.content} for m in messages])


def _result(value: Any) -> wit_llm.InferencingResult:
    usage = value.usage
    return wit_llm.InferencingResult(value.text, wit_llm.InferencingUsage(int(usage.promptTokenCount),
                                                                          int(usage.generatedTokenCount)))


class TokenStream(wit_llm.TokenStream):
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._open = True

    def next(self) -> str | None:
        piece = _call(self._handle.next)
        return None if piece is None else str(piece)

    def __exit__(self, *exc: Any) -> None:
        if self._open:  # leaving early cancels the generation and frees its slot, as in a component
            self._open = False
            amphibia_js.dispose(self._handle)


def infer(model: str, prompt: str, params: wit_llm.InferencingParams | None) -> wit_llm.InferencingResult:
    return _result(_call(amphibia_js.llm.infer, model, prompt, _params(params)))


def chat(model: str, messages: list[wit_llm.Message], params: wit_llm.InferencingParams | None) -> wit_llm.InferencingResult:
    return _result(_call(amphibia_js.llm.chat, model, _messages(messages), _params(params)))


def infer_stream(model: str, prompt: str, params: wit_llm.InferencingParams | None) -> TokenStream:
    return TokenStream(_call(amphibia_js.llm.inferStream, model, prompt, _params(params)))


def chat_stream(model: str, messages: list[wit_llm.Message], params: wit_llm.InferencingParams | None) -> TokenStream:
    return TokenStream(_call(amphibia_js.llm.chatStream, model, _messages(messages), _params(params)))


def generate_embeddings(model: str, text: list[str]) -> wit_llm.EmbeddingsResult:
    value = _call(amphibia_js.llm.generateEmbeddings, model, _js(list(text)))
    vectors = [list(v.to_py()) for v in value.embeddings]
    return wit_llm.EmbeddingsResult(vectors, wit_llm.EmbeddingsUsage(int(value.usage.promptTokenCount)))


def tokenize(model: str, text: str) -> list[int]:
    return [int(t) for t in _call(amphibia_js.llm.tokenize, model, text).to_py()]


def detokenize(model: str, tokens: list[int]) -> str:
    return str(_call(amphibia_js.llm.detokenize, model, _js([int(t) for t in tokens])))


def start(status: int, headers: list[tuple[str, str]]) -> None:
    try:
        _wait(amphibia_js.stream_start(status, _js([list(h) for h in headers])))
    except JsException as exc:
        raise Err(str(getattr(exc, "message", exc))) from None


def write(chunk: bytes) -> None:
    try:
        _wait(amphibia_js.stream_write(_js(bytes(chunk))))
    except JsException as exc:
        raise Err(str(getattr(exc, "message", exc))) from None


for _name in ("infer", "chat", "infer_stream", "chat_stream", "generate_embeddings", "tokenize", "detokenize"):
    setattr(wit_llm, _name, globals()[_name])
wit_llm.TokenStream = TokenStream
response_stream.start, response_stream.write = start, write

_world: Any = None  # the app's entry (`amphibia_guest.entry.WitWorld()`), once its import succeeded
_error: dict | None = None


def load(app_dir: str) -> Any:
    """(Re)import the app from `app_dir` as the build does (through the SDK's entry module). Returns
    None, or {text, file, line, type} for the error: the traceback cut to the app's own frames."""
    global _world, _error
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or ""
        if name in ("app", "amphibia_guest.entry") or where.startswith(app_dir + "/"):
            del sys.modules[name]
    import amphibia_guest.http

    amphibia_guest.http._registry.clear()
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    importlib.invalidate_caches()
    _world = None
    try:
        _world = importlib.import_module("amphibia_guest.entry").WitWorld()
        _error = None
    except BaseException as exc:  # noqa: BLE001 - whatever the app's import raised is shown in the page
        _error = describe(exc, app_dir)
    return None if _error is None else _js(_error)


def describe(exc: BaseException, app_dir: str) -> dict:
    """A traceback of the app's own frames (not importlib's or the SDK's), with its last file:line."""
    te = traceback.TracebackException.from_exception(exc)
    frames = [f for f in te.stack if f.filename.startswith(app_dir + "/")]
    te.stack = traceback.StackSummary.from_list(frames)
    text = "".join(te.format())
    if isinstance(exc, SyntaxError) and exc.filename:
        file, line = exc.filename, exc.lineno or 0
    elif frames:
        file, line = frames[-1].filename, frames[-1].lineno or 0
    else:
        file, line = "", 0
    return {"type": type(exc).__name__, "text": text, "file": file, "line": line}


def handle(request: Any) -> Any:
    """The world's `handle` export, for the page: {method, path, query, headers, body} in,
    {status, headers, body} out."""
    if _world is None:
        body = (_error or {}).get("text", "the app is not loaded")
        return _js({"status": 500, "headers": [["content-type", "text/plain; charset=utf-8"]],
                    "body": body.encode(), "loadError": True})
    req = wit_http.Request(
        method=str(request.method), path=str(request.path) or "/", query=str(request.query),
        headers=[(str(k), str(v)) for k, v in request.headers.to_py()],
        body=bytes(request.body.to_py()),
    )
    res = _world.handle(req)
    return _js({"status": res.status, "headers": [list(h) for h in res.headers], "body": bytes(res.body)})


def missing(modules: Any) -> Any:
    """The standard-library modules (of those the app imports) this Pyodide cannot find."""
    import importlib.util

    out = []
    for name in modules.to_py() if hasattr(modules, "to_py") else modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return _js(out)
