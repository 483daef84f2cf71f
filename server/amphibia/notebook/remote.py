"""`BridgeEngine`: the `engine.Engine` interface over a remote gateway's browser bridge (`/bridge`).

The kernel runs the app itself (the same component, in its own sandbox) and only sends the
`llm` calls to the remote pool, exactly as a web page running the app does: it takes a token
from `GET /bridge/token?app=NAME` and speaks the pool's wire messages (`assign`, `call`,
`cancel` out; `token`, `done`, `failed`, `result` in). Calls therefore run as that app on the
remote gateway, under its limits and its fair share, next to every other client of the pool.

One WebSocket per remote app, owned by an asyncio loop in a thread of its own; guest threads
block on their TokenStream or Future, as they do with the other engines.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import itertools
import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import httpx
import websockets

from ..config import default_models
from ..engine import GenerateRequest, TokenStream, Usage, WireCalls, no_such_model
from ..errors import AmphibiaError, InferenceTimeout, InvalidInput, LLMError
from ..host.context import current
from ..pool import wire
from ..pool.broker import error_from_wire

log = logging.getLogger("amphibia.notebook")
# The bridge closes a connection that sends more than 50 messages in a second; stay well below.
MAX_SENDS_PER_S = 40
_ids = itertools.count(1)


def split_url(url: str) -> tuple[str, str]:
    """`ws://h:p`, `http://h:p`, with or without a path -> (http base, ws base)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    secure = parts.scheme in ("https", "wss")
    if not parts.netloc:
        raise InvalidInput(f"{url!r} is not a gateway address (expected ws://HOST:PORT or http://HOST:PORT)")
    return f"{'https' if secure else 'http'}://{parts.netloc}", f"{'wss' if secure else 'ws'}://{parts.netloc}"


def token_claims(token: str) -> dict[str, Any]:
    """What a bridge token says about itself (app, origin, expiry); it is signed, not secret."""
    body = token.partition(".")[0]
    try:
        return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        raise InvalidInput("that is not a bridge token (get one from GET /bridge/token?app=NAME)") from None


class _Link:
    """One open bridge socket, acting as one remote app."""

    def __init__(self, ws: Any, app: str) -> None:
        self.ws, self.app = ws, app
        self.pending: dict[str, TokenStream | concurrent.futures.Future] = {}
        self.sent: collections.deque[float] = collections.deque()  # when recent frames went out
        self.pace = asyncio.Lock()  # made on the loop, in _open
        self.closed: str | None = None


class BridgeEngine(WireCalls):
    """`engine.Engine` whose model runs in a remote gateway's pool, reached over `/bridge`.

    `token`: a bridge token (all calls then act as the app it names). Without one, tokens are
    fetched from the gateway for the app making the call, or for `app` when given.
    """

    def __init__(self, url: str, token: str | None = None, app: str | None = None, timeout_s: float = 10.0) -> None:
        self.base, self.ws_base = split_url(url)
        self.token = token
        self.app = app or (token_claims(token)["app"] if token else None)
        self.origin = token_claims(token)["origin"] if token else self.base
        try:
            health = httpx.get(f"{self.base}/healthz", timeout=timeout_s).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise LLMError(f"no Amphibia gateway answers at {self.base}: {exc}") from None
        self.models: list[str] = list(health.get("models", []))
        self.served_apps: list[str] = list(health.get("apps", []))
        self.workers: int | None = health.get("workers")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amphibia-bridge", daemon=True)
        self._thread.start()
        self._links: dict[str, _Link] = {}
        self._connect_lock = threading.Lock()
        if self.app is not None:
            self._link(self.app)  # fail now, in the cell that connects, if the gateway refuses

    def __repr__(self) -> str:
        who = f" as app {self.app!r}" if self.app else ""
        return f"<BridgeEngine {self.ws_base}/bridge{who}: models {', '.join(self.models)}; {self.workers} worker(s)>"

    # --- connections ------------------------------------------------------------------------------
    def _remote_app(self) -> str:
        if self.app:
            return self.app
        ctx = current.get(None)
        if ctx is None:
            raise InvalidInput("outside an app, pass app=NAME to connect() to say which app the calls act as")
        return ctx.app.name

    def _fetch_token(self, app: str) -> str:
        res = httpx.get(f"{self.base}/bridge/token", params={"app": app}, timeout=10)
        if res.status_code == 404:
            raise InvalidInput(
                f"the gateway at {self.base} serves no app {app!r}, so its pool cannot take calls as that app; "
                f"serve it there, or connect(..., app=NAME) with one of: {', '.join(self.served_apps) or 'none'}")
        if res.status_code != 200:
            raise LLMError(f"the gateway at {self.base} refused a bridge token for {app!r}: {res.text[:300]}")
        return res.json()["token"]

    def _link(self, app: str) -> _Link:
        with self._connect_lock:
            link = self._links.get(app)
            if link is not None and link.closed is None:
                return link
            token = self.token or self._fetch_token(app)
            future = asyncio.run_coroutine_threadsafe(self._open(app, token), self._loop)
            link = future.result(30)
            self._links[app] = link
            return link

    async def _open(self, app: str, token: str) -> _Link:
        try:
            ws = await websockets.connect(f"{self.ws_base}/bridge?token={token}", origin=self.origin,
                                          max_size=wire.MAX_FRAME_BYTES, open_timeout=10)
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
            raise LLMError(f"cannot open the bridge at {self.ws_base}/bridge: {exc}") from None
        link = _Link(ws, app)
        asyncio.get_running_loop().create_task(self._read(link))
        return link

    async def _read(self, link: _Link) -> None:
        why = "closed"
        try:
            async for frame in link.ws:
                msg = wire.decode(frame, (wire.Token, wire.Done, wire.Failed, wire.Result))
                waiter = link.pending.get(msg.id)
                if waiter is None:
                    continue  # the last words about a cancelled request
                if isinstance(msg, wire.Token) and isinstance(waiter, TokenStream):
                    waiter.put(msg.text)
                    continue
                del link.pending[msg.id]
                if isinstance(msg, wire.Failed):
                    error = error_from_wire(msg.error_type, msg.message)
                    if isinstance(waiter, TokenStream):
                        waiter.fail(error)
                    elif not waiter.done():
                        waiter.set_exception(error)
                elif isinstance(msg, wire.Done) and isinstance(waiter, TokenStream):
                    waiter.finish(Usage(msg.prompt_tokens, msg.generated_tokens), msg.finish_reason)
                elif isinstance(msg, wire.Result) and isinstance(waiter, concurrent.futures.Future):
                    if not waiter.done():
                        waiter.set_result(msg.value)
        except websockets.ConnectionClosed as exc:
            why = f"code {exc.rcvd.code} {exc.rcvd.reason!r}" if exc.rcvd else "the connection dropped"
        except wire.ProtocolError as exc:
            why = f"a bad frame from the gateway: {exc}"
        finally:
            link.closed = why
            if link.ws.close_code is not None and link.ws.close_code != 1000:
                why = f"code {link.ws.close_code} {link.ws.close_reason!r}"
            error = LLMError(f"the bridge to {self.base} (app {link.app!r}) closed: {why}")
            for waiter in link.pending.values():
                if isinstance(waiter, TokenStream):
                    waiter.fail(error)
                elif not waiter.done():
                    waiter.set_exception(error)
            link.pending.clear()
            await link.ws.close()

    async def _send(self, link: _Link, msg: wire.Message, waiter: Any = None) -> None:
        if link.closed is not None:
            raise LLMError(f"the bridge to {self.base} (app {link.app!r}) closed: {link.closed}")
        async with link.pace:  # at most MAX_SENDS_PER_S in any second, rather than be closed as a flood
            now = time.monotonic()
            while link.sent and now - link.sent[0] > 1.0:
                link.sent.popleft()
            if len(link.sent) >= MAX_SENDS_PER_S:
                await asyncio.sleep(1.0 - (now - link.sent[0]) + 0.01)
            link.sent.append(time.monotonic())
            if waiter is not None:
                link.pending[msg.id] = waiter
            await link.ws.send(msg.encode())

    def _submit(self, msg: wire.Message, waiter: Any) -> _Link:
        link = self._link(self._remote_app())
        try:
            asyncio.run_coroutine_threadsafe(self._send(link, msg, waiter), self._loop).result(30)
        except websockets.ConnectionClosed as exc:
            raise LLMError(f"the bridge to {self.base} closed: {exc}") from None
        return link

    # --- engine.Engine ------------------------------------------------------------------------------
    def has_model(self, model: str) -> bool:
        return model in self.models

    def context_size(self, model: str) -> int:
        if model not in self.models:
            raise no_such_model(model, self.models)
        known = default_models().get(model)
        return known.n_ctx if known else 2048  # the remote gateway checks params against its own value

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream:
        stream = TokenStream(timeout_s)
        msg = wire.Assign(id=f"n{next(_ids)}", model=request.model, params=asdict(request.params),
                          prompt=request.prompt,
                          messages=[dict(m) for m in request.messages] if request.messages is not None else None)
        link = self._submit(msg, stream)

        def cancel() -> None:
            def send() -> None:
                if link.pending.pop(msg.id, None) is not None and link.closed is None:
                    asyncio.ensure_future(self._send(link, wire.Cancel(msg.id)))
            self._loop.call_soon_threadsafe(send)

        stream.on_cancel = cancel
        return stream

    def _call(self, model: str, method: str, args: dict, timeout_s: float) -> Any:
        if model not in self.models:
            raise no_such_model(model, self.models)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        msg = wire.Call(id=f"n{next(_ids)}", model=model, method=method, args=args)
        link = self._submit(msg, future)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self._loop.call_soon_threadsafe(link.pending.pop, msg.id, None)
            raise InferenceTimeout(f"{method} did not finish within {timeout_s:g} s") from None

    def close(self) -> None:
        async def shut() -> None:
            for link in list(self._links.values()):
                await link.ws.close()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
            except (concurrent.futures.TimeoutError, AmphibiaError, OSError):
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
