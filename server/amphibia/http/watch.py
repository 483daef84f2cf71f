"""`amphibia up --watch` (and `amphibia dev`): rebuild an app when its files change and swap it in
without a restart.

The swap is the one an upgrade uses (`gateway.update_apps`): requests in flight finish on the old
build, new ones get the new build once it is ready, and a failed build leaves the old one serving
with its error on the index page, in `/healthz` and in the log.

A build takes componentize-py about 5 s, jco 2.5 s and wasmtime's compile 4 s here, and none of it
can be reused between two builds of an edited app (see BENCHMARKS.md). So an edit is first served
by the dev component (`amphibia_guest/dev_entry.py`, built and compiled once per toolchain), which
imports the edit's files per instance from a read-only copy: the edit answers within the poll
interval, a few ms slower per request, and its real build replaces it when ready. An edit that the
dev component cannot import (a syntax error, a module not in its snapshot) is not served that way:
its build decides, as before.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from amphibia_guest.http import TRIAL_IMPORT

from ..build import BuildError, background_priority, build_dev_component, build_inputs, check_syntax, source_hash
from ..config import AppSpec
from ..sandbox.runtime import HttpRequest
from .gateway import Built, Gateway, _in_daemon_thread, component_of, update_apps

log = logging.getLogger("amphibia.watch")
Signature = tuple[tuple[str, int, int], ...]
KEEP_SOURCES = 3  # staged edits kept per app: a request in flight may still import from an older one


def signature(folder: Path) -> Signature:
    """What changes when a file an app's build reads changes: names, sizes and modification times."""
    out = []
    for path in build_inputs(folder):
        st = path.stat()
        out.append((path.relative_to(folder).as_posix(), st.st_mtime_ns, st.st_size))
    return tuple(out)


def signatures(folders: set[Path]) -> dict[Path, Signature]:
    out: dict[Path, Signature] = {}
    for folder in folders:
        try:
            out[folder] = signature(folder)
        except OSError:  # mid-rename or deleted: look again at the next poll
            out[folder] = ()
    return out


def stage(folder: Path, into: Path, keep: frozenset[Path] = frozenset()) -> Path:
    """A copy of the app's files (as a build sees them) under `into`, named by their contents, for
    the guest to import (mounted read-only); older copies beyond KEEP_SOURCES are removed, never one
    in `keep` (what serves now)."""
    files = build_inputs(folder)
    target = into / source_hash(folder)[:20]
    if not target.is_dir():
        tmp = into / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for path in files:
            dest = tmp / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
    target.touch()  # newest first below
    older = sorted((p for p in into.iterdir() if p.is_dir() and not p.name.startswith(".") and p != target),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in older[KEEP_SOURCES - 1:]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return target


async def prepare_dev_component(gateway: Gateway) -> None:
    """Build (once per toolchain, kept in the store) and compile the dev component; until it is
    ready, or if it fails, edits simply wait for their builds."""
    def prepare() -> Built:
        background_priority()
        result = build_dev_component(gateway.config.server.build_dir)
        gateway.runtime.cache.prepare(result.wasm, result.sha256)
        return Built.of(result)

    if gateway.build_slots is None:
        gateway.build_slots = asyncio.Semaphore(1)
    try:
        async with gateway.build_slots:
            gateway.dev_component = await _in_daemon_thread(prepare)
        log.info("dev component ready (%s): edits answer before their builds", gateway.dev_component.sha256[:12])
    except Exception as exc:  # only the shortcut is lost
        log.warning("no dev component (edits wait for their builds): %s", exc)


async def serve_edit(gateway: Gateway, spec: AppSpec, wanted: Callable[[], bool]) -> bool:
    """Serve `spec`'s edited files with the dev component if they import there (a trial instance)
    and the edit is still `wanted` then (no newer edit, not built yet); True if they now answer.
    Requests in flight finish on what served before."""
    dev = gateway.dev_component
    if dev is None or spec.name not in gateway.apps:  # an app that never built waits for its build
        return False
    folder = spec.path.resolve()
    try:
        await asyncio.to_thread(check_syntax, folder)
        in_use = frozenset(a.spec.source for a in gateway.apps.values() if a.spec.source is not None)
        staged = await asyncio.to_thread(stage, folder, gateway.config.server.cache_dir / "sources" / spec.name, in_use)
    except (BuildError, OSError):
        return False  # its build reports it
    candidate = dev.serve_as(replace(spec, source=staged), gateway.apps.get(spec.name))
    try:
        component = await component_of(gateway, candidate)
        trial = await gateway.runtime.handle_async(candidate.spec, component, HttpRequest(TRIAL_IMPORT, "/"),
                                                   f"dev-import-{spec.name}")
    except Exception as exc:  # noqa: BLE001 - a trap or a timeout: the build decides
        log.info("app %s: the dev component cannot run this edit (%s); its build will serve it", spec.name, exc)
        return False
    if trial.status != 204:
        why = trial.body.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        log.info("app %s: the dev component cannot import this edit (%s); its build will serve it", spec.name, why[0])
        return False
    if not wanted():
        return False
    gateway.apps[spec.name] = candidate
    gateway.failed.pop(spec.name, None)  # that error was an older edit's
    log.info("app %s answers from its edited source (dev component) while its build runs", spec.name)
    return True


async def watch_apps(gateway: Gateway, startup: "asyncio.Task[None] | None" = None, interval_s: float = 0.25) -> None:
    """Poll the apps' folders every `interval_s`; serve each edit from source at once (see above) and
    rebuild each app whose files changed, one build per app at a time (an edit made during a build
    starts another when it ends). Waits for the `startup` builds first, so that their swaps cannot
    land after a newer one."""
    specs = list(gateway.config.apps.values())
    folders = {spec.path.resolve() for spec in specs}
    watcher = Watcher(gateway, specs, await asyncio.to_thread(signatures, folders))
    if startup is not None:
        await asyncio.shield(startup)
    log.info("watching %d app folder(s) for changes", len(folders))
    dev = asyncio.create_task(prepare_dev_component(gateway)) if gateway.config.server.edits_from_source else None
    try:
        while True:
            await asyncio.sleep(interval_s)
            watcher.poll(await asyncio.to_thread(signatures, folders))
    finally:
        if dev is not None:
            dev.cancel()


class Watcher:
    """Per folder: the edits seen (numbered), the build running and the newest edit built. Touched
    only on the event loop. Edit numbers keep an older edit's work from replacing a newer one's:
    a trial that ends after a newer edit arrived, or a build that ends after a newer edit is served
    from source, does not swap in."""

    def __init__(self, gateway: Gateway, specs: list[AppSpec], seen: dict[Path, Signature]) -> None:
        self.gateway = gateway
        # folder -> its apps, resolved once here and not on every poll (1,000 apps may share a folder)
        self.apps: dict[Path, list[AppSpec]] = {folder: [] for folder in seen}
        for spec in specs:
            self.apps[spec.path.resolve()].append(spec)
        self.seen = seen
        self.edit: dict[Path, int] = {folder: 0 for folder in seen}  # newest edit seen
        self.built: dict[Path, int] = {folder: 0 for folder in seen}  # newest edit whose build ended
        self.pending: set[Path] = set()  # changed since its last build started
        self.running: dict[Path, asyncio.Task[None]] = {}
        self.trials: set[asyncio.Task[bool]] = set()  # held here: the loop keeps only weak references

    def poll(self, now: dict[Path, Signature]) -> None:
        for folder, signature_now in now.items():
            apps = self.apps[folder]
            if signature_now != self.seen[folder]:
                self.seen[folder] = signature_now
                self.edit[folder] += 1
                self.pending.add(folder)
                n = self.edit[folder]
                log.info("%s changed: rebuilding %s (%s meanwhile)", folder, ", ".join(s.name for s in apps),
                         "served from source" if self.gateway.dev_component else "the current build serves")
                for spec in apps if self.gateway.dev_component is not None else ():  # at once, even mid-build
                    trial = asyncio.create_task(serve_edit(self.gateway, spec, lambda f=folder, n=n: self._newest(f, n)))
                    self.trials.add(trial)
                    trial.add_done_callback(self.trials.discard)
            task = self.running.get(folder)
            if folder in self.pending and (task is None or task.done()):
                self.pending.discard(folder)
                self.running[folder] = asyncio.create_task(self._build(folder, apps, self.edit[folder]))

    def _newest(self, folder: Path, n: int) -> bool:
        return self.edit[folder] == n and self.built[folder] < n

    async def _build(self, folder: Path, apps: list[AppSpec], n: int) -> None:
        try:
            await update_apps(self.gateway, apps, current=lambda spec: self.edit[folder] == n)
        finally:
            self.built[folder] = max(self.built[folder], n)
