"""Fresh sandboxes for requests, made and closed off the request path.

Every request still gets a Store and an instance that nothing ran in before. What moves is *when*
the work happens: the instance a request will use is made on a background thread after the app's
previous request took its spare, and a finished request's Store is closed on that thread too. On
the chat example that takes instantiation (about 0.6 ms) and Store teardown (about 0.2 ms) out of
the time a client waits; the CPU spent is the same. `amphibia bench cold-start` reports both ways.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import wasmtime
from wasmtime.component import Component, Func, Linker

from ..config import AppSpec

log = logging.getLogger("amphibia.runtime")
guest_log = logging.getLogger("amphibia.guest")
IDLE_NEEDED_S = 0.002  # a Store's close and the next spare take about 0.8 ms of a core here
MAX_BACKLOG = 64  # queued background jobs beyond which Stores close on the request's thread
SPARE_DEADLINE_TICKS = 1000  # bounds a component's start-up code while a spare is made (10 s of epochs)


class GuestOutput:
    """Guest stdout/stderr, logged line by line with the app name and request id.

    A line longer than MAX_LINE is logged in pieces of that size, so a guest that writes without
    newlines costs bounded memory and linear time. The request id is set when a request takes the
    sandbox (`for_request`): a spare is made before its request exists."""

    MAX_LINE = 8192

    def __init__(self, app: str, stream: str, request_id: str = "-") -> None:
        self.app, self.stream = app, stream
        self.prefix = ""
        self.for_request(request_id)
        self._partial = bytearray()
        self.tail = b""  # the last few KB, to recognise what a trap was about

    def for_request(self, request_id: str) -> None:
        self.prefix = f"app={self.app} request={request_id} {self.stream}:"

    def write(self, data: bytes) -> None:
        self.tail = (self.tail + data[-4096:])[-4096:]
        *lines, rest = bytes(data).split(b"\n")
        for line in lines:
            self._partial += line
            self._log(bytes(self._partial))
            self._partial.clear()
        self._partial += rest
        while len(self._partial) >= self.MAX_LINE:
            self._log(bytes(self._partial[:self.MAX_LINE]))
            del self._partial[:self.MAX_LINE]

    def _log(self, line: bytes) -> None:
        guest_log.info("%s %s", self.prefix, line.decode(errors="replace"))

    def flush(self) -> None:
        if self._partial:
            self._log(bytes(self._partial))
            self._partial.clear()


@dataclass
class Sandbox:
    """A Store with one instance of an app's component, used by at most one request."""

    app: AppSpec
    component: Component
    store: wasmtime.Store
    out: GuestOutput
    err: GuestOutput
    instance: Any = None  # wasmtime.component.Instance, once instantiated
    handle: Func | None = None


def new_store(engine: wasmtime.Engine, app: AppSpec, component: Component) -> Sandbox:
    """A Store set up for `app`: its read-only folders, its memory cap, its output logged as its own."""
    store = wasmtime.Store(engine)
    out, err = GuestOutput(app.name, "stdout"), GuestOutput(app.name, "stderr")
    wasi = wasmtime.WasiConfig()  # no env, no args; sockets stay denied (wasmtime-py has no grant)
    for folder in app.files:  # read-only, and only what the app's manifest names
        wasi.preopen_dir(str(Path(app.path) / folder), "/" + folder.strip("/"), fs_mutable=False)
    if app.source is not None:  # an edit served by the dev component: its files where a build had them
        wasi.preopen_dir(str(app.source), "/0", fs_mutable=False)
    wasi.stdout_custom = out.write
    wasi.stderr_custom = err.write
    store.set_wasi(wasi)
    store.set_limits(memory_size=app.limits.memory_mb << 20)
    return Sandbox(app, component, store, out, err)


def instantiate(linker: Linker, box: Sandbox) -> Sandbox:
    """Instantiate in the box's Store; on failure the Store is closed and the error raised."""
    try:
        box.instance = linker.instantiate(box.store, box.component)
        box.handle = box.instance.get_func(box.store, "handle")
    except BaseException:
        box.store.close()
        raise
    return box


class Spares:
    """At most one ready sandbox per recently served app (`make` returns it instantiated) (`limit` apps, least recently used dropped),
    and the closing of used Stores, both on one background thread.

    The dict of spares is shared between request threads (take) and the background thread (put);
    `_lock` guards it and the count of running requests. A spare made for a component or app settings that have since changed is
    closed instead of used. With `limit` 0 nothing is kept and Stores close on the request's thread."""

    def __init__(self, make: Callable[[AppSpec, Component], Sandbox], limit: int) -> None:
        self.make = make
        self.limit = limit
        self.made = self.taken = 0  # counts, for benchmarks
        self._running = 0  # requests between take and done
        self._idle_since = time.monotonic()
        self._idle_s = 1.0  # recent idle gaps between requests (moving average), seconds
        self._spares: OrderedDict[str, Sandbox] = OrderedDict()
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if limit > 0:
            self._thread = threading.Thread(target=self._run, name="amphibia-spares", daemon=True)
            self._thread.start()

    def take(self, app: AppSpec, component: Component) -> Sandbox | None:
        """The app's spare if it fits (same component, same settings). Every request calls this once
        when it starts and `done` when it ends: the two count the requests running."""
        with self._lock:
            if self._running == 0:  # the idle time that just ended: what background work can use
                self._idle_s = 0.7 * self._idle_s + 0.3 * (time.monotonic() - self._idle_since)
            self._running += 1
            box = self._spares.pop(app.name, None) if self._thread is not None else None
        if box is None:
            return None
        if box.component is not component or box.app != app:
            self._work.put(("close", box))
            return None
        self.taken += 1
        return box

    def done(self, box: Sandbox) -> None:
        """A request finished with `box`. When it was the last one running, its Store is closed and the
        app's next spare made on the background thread, while the server is idle. Otherwise the Store
        closes here: under load, a spare saves nothing (the CPU is busy anyway), and making or unmapping
        memory beside a running guest slows its page faults (measured: +0.3 ms a request). The same
        holds for one client sending back to back, so the recent idle gaps must be long enough too."""
        with self._lock:
            self._running -= 1
            idle = self._running == 0 and self._idle_s > IDLE_NEEDED_S
            self._idle_since = time.monotonic()
        if self._thread is None or not idle or self._work.qsize() > MAX_BACKLOG:
            box.store.close()
            return
        self._work.put(("close", box))
        self._work.put(("make", (box.app, box.component)))

    def _run(self) -> None:
        while True:
            kind, item = self._work.get()
            if kind == "stop":
                return
            try:
                if kind == "close":
                    item.store.close()
                else:
                    self._make(*item)
            except Exception:  # a failed spare only means the next request instantiates itself
                log.debug("spare %s failed", kind, exc_info=True)

    def _make(self, app: AppSpec, component: Component) -> None:
        with self._lock:
            if self._running or app.name in self._spares:  # busy again: the spare would only slow it
                self._spares.move_to_end(app.name)
                return
        box = self.make(app, component)
        self.made += 1
        with self._lock:
            old = self._spares.pop(app.name, None)
            self._spares[app.name] = box
            dropped = [self._spares.popitem(last=False)[1] for _ in range(max(0, len(self._spares) - self.limit))]
        for stale in ([old] if old else []) + dropped:
            stale.store.close()

    def count(self) -> int:
        with self._lock:
            return len(self._spares)

    def stop(self) -> None:
        if self._thread is not None:
            self._work.put(("stop", None))
            self._thread = None
        with self._lock:
            boxes = list(self._spares.values())
            self._spares.clear()
        for box in boxes:
            box.store.close()
