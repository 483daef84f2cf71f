"""Running app components with wasmtime: compile cache, a fresh sandboxed instance per request.

One wasmtime Engine for the process. Compiled components are cached on disk (keyed by the
component's sha256 and the wasmtime version) so a restart deserializes in milliseconds. Each
request gets a new Store and instance: nothing leaks between requests or apps. Limits: a memory
cap (store limits) and a guest CPU deadline (epoch interruption, paused while the host works for
the guest). Any trap ends only its own request, as a typed error.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import platform
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Sequence

import wasmtime
from wasmtime.component import Component, Linker, Record

from ..config import AppSpec
from ..contract import interface
from ..errors import AmphibiaError, Busy, ClientGone, GuestError, GuestOutOfMemory, GuestTimeout
from . import wit_values
from .capability import HostCapability
from .context import RequestContext, RequestEnd, current
from .instances import SPARE_DEADLINE_TICKS, Sandbox, Spares, instantiate, new_store
from .response_host import Buffered, ResponseStreamHost, StreamChannel, check_head

log = logging.getLogger("amphibia.runtime")

TICK_S = 0.01  # epoch length: the CPU deadline's resolution
WORLD_TYPES = (interface("http"),)  # type-only interfaces of the world: empty instances


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class EpochClock:
    """Advances the wasmtime epoch every TICK_S; deadlines are counted in these ticks."""

    def __init__(self, wasm: wasmtime.Engine) -> None:
        self.wasmtime = wasm
        self.ticks = 0  # written by the clock thread only; readers tolerate a stale value by a tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amphibia-epoch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            self.wasmtime.increment_epoch()
            self.ticks += 1

    def close(self) -> None:
        self._stop.set()


class CpuBudget:
    """A guest's CPU deadline that stops counting while the host serves one of its calls."""

    def __init__(self, store: wasmtime.Store, clock: EpochClock, seconds: float) -> None:
        self.store, self.clock = store, clock
        self.left = max(1, round(seconds / TICK_S))
        self.store.set_epoch_deadline(self.left)
        self._since = clock.ticks

    @contextlib.contextmanager
    def host_wait(self) -> Iterator[None]:
        self.left -= self.clock.ticks - self._since
        try:
            yield
        finally:
            self._since = self.clock.ticks
            self.store.set_epoch_deadline(max(1, self.left))


class ComponentCache:
    """Compiled components on disk (keyed by component hash + wasmtime version) and the most recently
    used ones in memory: at most `max_loaded` (0: no bound), least recently used unloaded first.

    A component in memory costs a few MB of RSS (measured by `amphibia bench density`); one on disk
    loads again in milliseconds (the artifact is mapped, not compiled). A request that holds a
    component keeps it alive after it is unloaded here, so unloading never ends a request."""

    def __init__(self, wasm: wasmtime.Engine, cache_dir: Path, max_loaded: int = 0) -> None:
        self.wasmtime = wasm
        self.dir = Path(cache_dir)
        self.max_loaded = max_loaded
        self.unloaded = 0  # components dropped from memory by the bound, for /metrics and benchmarks
        self._mem: OrderedDict[str, Component] = OrderedDict()
        # Guards _mem: requests (via asyncio.to_thread) and builds load components from several threads.
        self._lock = threading.Lock()
        self.tag = f"wasmtime-{metadata.version('wasmtime')}-{platform.machine()}"

    def artifact(self, sha256: str) -> Path:
        return self.dir / f"{sha256}-{self.tag}.cwasm"

    def loaded(self, sha256: str) -> Component | None:
        """The component if it is in memory (now the most recently used), else None. Cheap: no I/O."""
        with self._lock:
            component = self._mem.get(sha256)
            if component is not None:
                self._mem.move_to_end(sha256)
            return component

    def count(self) -> int:
        with self._lock:
            return len(self._mem)

    def prepare(self, wasm: Path, sha256: str) -> None:
        """Make sure the compiled artifact is on disk (compiling it if not), so that the first request
        only maps it; memory is spent when a request comes. Blocking: a compile takes seconds."""
        path = self.artifact(sha256)
        if self.loaded(sha256) is not None or path.is_file():
            return
        component, stored = self._compile(wasm, path)
        if not stored:  # no disk cache: keep it, or every load would compile
            self._keep(sha256, component)

    def load(self, wasm: Path, sha256: str | None = None) -> Component:
        sha256 = sha256 or hashlib.sha256(wasm.read_bytes()).hexdigest()
        component = self.loaded(sha256)
        if component is not None:
            return component
        path = self.artifact(sha256)
        if path.is_file():
            try:
                component = Component.deserialize_file(self.wasmtime, str(path))
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: the store's disk budget evicts the coldest first
            except wasmtime.WasmtimeError as exc:  # stale or damaged: compile again
                log.warning("discarding cached component %s: %s", path.name, exc)
        if component is None:
            component, _ = self._compile(wasm, path)
        return self._keep(sha256, component)

    def _compile(self, wasm: Path, path: Path) -> tuple[Component, bool]:
        """Compile `wasm` and write it to `path`; the component, and whether it could be written."""
        started = time.perf_counter()
        component = Component.from_file(self.wasmtime, str(wasm))
        log.info("compiled %s in %.1f s", wasm, time.perf_counter() - started)
        return component, self._store(component, path)

    def _keep(self, sha256: str, component: Component) -> Component:
        with self._lock:
            component = self._mem.setdefault(sha256, component)
            self._mem.move_to_end(sha256)
            while self.max_loaded and len(self._mem) > self.max_loaded:
                self._mem.popitem(last=False)
                self.unloaded += 1
            return component

    def _store(self, component: Component, path: Path) -> bool:
        """Write the compiled artifact for the next start; a full disk or a read-only cache only costs
        that (the component is served from memory), never the app. False if it could not."""
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(component.serialize())
            os.replace(tmp, path)
            return True
        except OSError as exc:
            log.warning("could not cache the compiled component in %s (%s); serving it uncached", self.dir, exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False


def _classify(exc: wasmtime.WasmtimeError, stderr_tail: bytes, app: AppSpec) -> GuestError:
    text = str(exc)
    if "wasm trap: interrupt" in text:
        return GuestTimeout(f"app {app.name!r} used more than its {app.limits.timeout_s:g} s of CPU time")
    tail = stderr_tail.decode(errors="replace")
    if "MemoryError" in tail or "memory allocation" in tail or "out of memory" in text:
        return GuestOutOfMemory(f"app {app.name!r} ran out of its {app.limits.memory_mb} MB of memory")
    if "Exited with i32 exit status" in text:
        status = text.split("Exited with i32 exit status", 1)[1].split()[0]
        return GuestError(f"app {app.name!r} exited with status {status}")
    causes = [ln.strip() for ln in text.splitlines() if "wasm trap" in ln or ln.strip().startswith("unknown import")]
    reason = causes[-1] if causes else text.strip().splitlines()[0][:300]
    return GuestError(f"app {app.name!r} trapped: {reason}")


def _to_wit(request: HttpRequest) -> Record:
    r = Record()
    r.method, r.path, r.query = request.method, request.path, request.query
    r.headers, r.body = list(request.headers), bytes(request.body)
    return r


def _from_wit(res: Record) -> HttpResponse:
    status, headers = check_head(res.status, res.headers)
    return HttpResponse(status, headers, bytes(res.body))


async def _client_left(disconnected: Callable[[], Awaitable[bool]]) -> None:
    while not await disconnected():
        await asyncio.sleep(0.25)


class Runtime:
    def __init__(self, capabilities: Sequence[HostCapability], cache_dir: Path, guest_threads: int = 8,
                 queue_limit: int = 64, max_loaded: int = 0, spare_apps: int = 32) -> None:
        wit_values.install()
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.wasmtime = wasmtime.Engine(config)
        self.clock = EpochClock(self.wasmtime)
        self.cache = ComponentCache(self.wasmtime, cache_dir, max_loaded)
        self.linker = Linker(self.wasmtime)
        self.linker.add_wasip2()
        with self.linker.root() as root:
            for name in WORLD_TYPES:
                with root.add_instance(name):
                    pass
            for capability in (*capabilities, ResponseStreamHost()):  # streamed answers: part of serving HTTP
                capability.add_to_linker(root)
        # Guests block (on the CPU or on inference) in these threads, never on the event loop.
        self.guest_threads = ThreadPoolExecutor(guest_threads, thread_name_prefix="guest")
        self.threads = guest_threads
        self.capacity = guest_threads + queue_limit
        self.in_flight = 0  # only touched on the event loop thread (handle_async)
        self.spares = Spares(self._spare, spare_apps)

    def _spare(self, app: AppSpec, component: Component) -> Sandbox:
        box = new_store(self.wasmtime, app, component)
        box.store.set_epoch_deadline(SPARE_DEADLINE_TICKS)  # start-up code is bounded here too
        return instantiate(self.linker, box)

    def load(self, wasm: Path, sha256: str | None = None) -> Component:
        return self.cache.load(wasm, sha256)

    def handle(self, app: AppSpec, component: Component, request: HttpRequest, request_id: str,
               end: RequestEnd | None = None, channel: StreamChannel | None = None) -> HttpResponse:
        """Serve one request in a fresh instance. Blocking: call from a guest thread. `end` lets another
        thread end the request's host work (see `handle_async`). A streamed answer goes to `channel`
        as it comes; without one it is collected into the response returned."""
        box = self.spares.take(app, component) or new_store(self.wasmtime, app, component)
        store, out, err = box.store, box.out, box.err
        out.for_request(request_id)
        err.for_request(request_id)
        budget = CpuBudget(store, self.clock, app.limits.timeout_s)
        ctx = RequestContext(app=app, request_id=request_id, host_wait=budget.host_wait, end=end or RequestEnd(),
                             response=channel if channel is not None else Buffered())
        token = current.set(ctx)
        try:
            handle = (box if box.instance is not None else instantiate(self.linker, box)).handle
            if handle is None:
                raise GuestError(f"app {app.name!r} exports no `handle` function")
            result = handle(store, _to_wit(request))
            response = _from_wit(result)
            handle.post_return(store)
            if ctx.started and isinstance(ctx.response, Buffered) and ctx.response.head is not None:
                status, headers = ctx.response.head
                return HttpResponse(status, headers, b"".join(ctx.response.pieces))
            return response
        except wasmtime.WasmtimeError as exc:
            raise _classify(exc, err.tail, app) from None
        except AmphibiaError:
            raise
        except Exception as exc:  # wasmtime-py could not convert a value: a host bug, not a guest one
            log.exception("app=%s request=%s failed in the host", app.name, request_id)
            raise GuestError(f"app {app.name!r} failed: {exc}") from None
        finally:
            for resource in ctx.close():
                resource.cancel()
            current.reset(token)
            out.flush()
            err.flush()
            self.spares.done(box)

    async def handle_async(self, app: AppSpec, component: Component, request: HttpRequest, request_id: str,
                           disconnected: Callable[[], Awaitable[bool]] | None = None,
                           channel: StreamChannel | None = None, end: RequestEnd | None = None) -> HttpResponse:
        """Serve one request on a guest thread, within the app's wall-clock deadline. When the deadline
        passes, or `disconnected()` says the client left, the request's inference is cancelled and
        its later host calls fail, so its guest finishes soon; the guest thread stays counted in
        `in_flight` until it does. (A guest blocked in WASI sleep or poll cannot be interrupted:
        wasmtime has no way to; it holds its thread until the sleep ends.)"""
        if self.in_flight >= self.capacity:
            raise Busy(f"{self.in_flight} requests are already running or waiting ({self.threads} guests run at once, "
                       f"[server] guest_threads / guest_memory_mb); try again shortly")
        self.in_flight += 1
        end = end or RequestEnd()
        work = asyncio.get_running_loop().run_in_executor(
            self.guest_threads, self.handle, app, component, request, request_id, end, channel)
        work.add_done_callback(self._thread_free)
        left = asyncio.ensure_future(_client_left(disconnected)) if disconnected else None
        try:
            done, _ = await asyncio.wait({work} | ({left} if left else set()), timeout=app.limits.wall_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            if left is not None and left in done:
                end.end(ClientGone(f"the client of app {app.name!r} went away"))
                raise ClientGone(f"the client of app {app.name!r} went away")
            error = GuestTimeout(f"app {app.name!r} did not answer within {app.limits.wall_timeout_s:g} s")
            end.end(error)
            raise error
        except asyncio.CancelledError:  # the server is shutting down, or the handler was cancelled
            end.end(ClientGone("the request was cancelled"))
            raise
        finally:
            if left is not None:
                left.cancel()

    def _thread_free(self, work: "asyncio.Future[HttpResponse]") -> None:
        self.in_flight -= 1
        if not work.cancelled():
            work.exception()  # retrieved: an abandoned request's failure is not an unhandled one

    def close(self) -> None:
        self.guest_threads.shutdown(wait=False, cancel_futures=True)
        self.spares.stop()
        self.clock.close()


__all__ = ["AmphibiaError", "HttpRequest", "HttpResponse", "Runtime"]
