"""`BridgeEngine`: the inference engine interface over a remote gateway's browser bridge (`/bridge`).

The kernel runs the app itself (the same component, in its own sandbox) and only sends the
`llm` calls to the remote pool, exactly as a web page running the app does: it takes a token
from `GET /bridge/token?app=NAME` and speaks the pool's wire messages (`assign`, `call`,
`cancel` out; `token`, `done`, `failed`, `result` in). Calls therefore run as that app on the
remote gateway, under its limits and its fair share, next to every other client of the pool.

One WebSocket per remote app, owned by an asyncio loop in a thread of its own; the answers go to
each request's sink from that thread, as the pool's own engine delivers them.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import json
import logging
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import httpx
import websockets

from ..config import AppSpec, default_models
from ..errors import AmphibiaError, InvalidInput, LLMError
from ..inference.engine import Cancel, CallSink, GenerationSink
from ..inference.pool import jobs, wire
from ..inference.types import Call, Generation

log = logging.getLogger("amphibia.notebook")
# The bridge closes a connection that sends more than 50 messages in a second; stay well below.
MAX_SENDS_PER_S = 40
UNKNOWN_CONTEXT = 2048  # a model the defaults do not know: the remote gateway checks against its own value


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


class _Pending:
    """A request waiting for the bridge's answers: its sink, and how wire messages reach it."""

    def __init__(self, sink: GenerationSink | CallSink, deliver: Callable[[wire.Message, Any], bool]) -> None:
        self.sink, self._deliver = sink, deliver

    def deliver(self, msg: wire.Message) -> bool:
        """Hand `msg` to the sink; True once the request has ended."""
        return self._deliver(msg, self.sink)


class _Link:
    """One open bridge socket, acting as one remote app."""

    def __init__(self, ws: Any, app: str) -> None:
        self.ws, self.app = ws, app
        self.pending: dict[str, _Pending] = {}  # touched only on the bridge's loop
        self.sent: collections.deque[float] = collections.deque()  # when recent frames went out
        self.pace = asyncio.Lock()  # made on the loop, in _open
        self.closed: str | None = None


class BridgeEngine:
    """An inference engine whose model runs in a remote gateway's pool, reached over `/bridge`.

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
        known = default_models()
        self._models: dict[str, int] = {
            name: known[name].n_ctx if name in known else UNKNOWN_CONTEXT for name in health.get("models", [])}
        # Models of unknown purpose are not checked here: the gateway checks them.
        self._purposes = {name: known[name].purpose for name in self._models if name in known}
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
        return (f"<BridgeEngine {self.ws_base}/bridge{who}: models {', '.join(self._models)}; "
                f"{self.workers} worker(s)>")

    # --- connections ------------------------------------------------------------------------------
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
                pending = link.pending.get(msg.id)  # None: the last words about a cancelled request
                if pending is not None and pending.deliver(msg):
                    del link.pending[msg.id]
        except websockets.ConnectionClosed as exc:
            why = f"code {exc.rcvd.code} {exc.rcvd.reason!r}" if exc.rcvd else "the connection dropped"
        except wire.ProtocolError as exc:
            why = f"a bad frame from the gateway: {exc}"
        finally:
            link.closed = why
            if link.ws.close_code is not None and link.ws.close_code != 1000:
                why = f"code {link.ws.close_code} {link.ws.close_reason!r}"
            error = LLMError(f"the bridge to {self.base} (app {link.app!r}) closed: {why}")
            for pending in link.pending.values():
                pending.sink.fail(error)
            link.pending.clear()
            await link.ws.close()

    async def _send(self, link: _Link, msg: wire.Message, pending: _Pending | None = None) -> None:
        if link.closed is not None:
            raise LLMError(f"the bridge to {self.base} (app {link.app!r}) closed: {link.closed}")
        async with link.pace:  # at most MAX_SENDS_PER_S in any second, rather than be closed as a flood
            now = time.monotonic()
            while link.sent and now - link.sent[0] > 1.0:
                link.sent.popleft()
            if len(link.sent) >= MAX_SENDS_PER_S:
                await asyncio.sleep(1.0 - (now - link.sent[0]) + 0.01)
            link.sent.append(time.monotonic())
            if pending is not None:
                link.pending[msg.id] = pending
            await link.ws.send(msg.encode())

    def _submit(self, caller: AppSpec, msg: wire.Assign | wire.Call, pending: _Pending) -> Cancel:
        """Send `msg` as the remote app (this engine's, else the caller's); the answers go to `pending`."""
        link = self._link(self.app or caller.name)
        try:
            asyncio.run_coroutine_threadsafe(self._send(link, msg, pending), self._loop).result(30)
        except websockets.ConnectionClosed as exc:
            raise LLMError(f"the bridge to {self.base} closed: {exc}") from None

        def cancel() -> None:  # the gateway ends the request (a generation: "done", "cancelled")
            def send() -> None:
                if msg.id in link.pending and link.closed is None:
                    asyncio.ensure_future(self._send(link, wire.Cancel(msg.id)))

            try:
                self._loop.call_soon_threadsafe(send)
            except RuntimeError:  # the engine was closed: nothing is left to cancel
                pass

        return cancel

    # --- inference.engine.Engine ----------------------------------------------------------------------
    def models(self) -> Mapping[str, int]:
        return self._models

    def purposes(self) -> Mapping[str, str]:
        return self._purposes

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        msg = jobs.assign_message(jobs.next_id("n"), generation)
        return self._submit(caller, msg, _Pending(sink, jobs.deliver_generation))

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        return self._submit(caller, jobs.call_message(jobs.next_id("n"), call), _Pending(sink, jobs.deliver_call))

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
