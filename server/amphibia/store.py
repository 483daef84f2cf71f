"""The build store's bookkeeping: which build each app was last served from, and the disk budget.

Builds live in `[server] build_dir`, one folder per distinct input (`build.build_in_store`), and
their compiled components in `[server] cache_dir` (`sandbox.runtime.ComponentCache`). This module
keeps the two from growing without bound, and remembers per app the build that served it last, so
that after an upgrade (a new SDK or componentize-py: every input changes) a gateway serves the old
builds at once while the new ones build.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .build import BuildResult, complete_build

log = logging.getLogger("amphibia.store")
RECORDS = "served"  # store/served/<app>-<folder hash>.json: {"build": "<build folder>"}
GRACE_S = 120.0  # never evict what was written this recently: it may be a build about to be served


def _record_path(store: Path, name: str, app_dir: Path) -> Path:
    folder = hashlib.sha256(str(app_dir.resolve()).encode()).hexdigest()[:12]
    return store / RECORDS / f"{name}-{folder}.json"


def last_served(store: Path, name: str, app_dir: Path) -> BuildResult | None:
    """The build app `name` (from `app_dir`) was last served from, if it is still complete."""
    try:
        record = json.loads(_record_path(store, name, app_dir).read_text())
        return complete_build(Path(record["build"]), pending=True)  # its browser part is made again
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_served(store: Path, served: list[tuple[str, Path, Path]]) -> None:
    """Record (app name, app folder, build folder) for each app now served, and mark those builds as
    just used. Writes only what changed: a gateway with 1,000 apps restarts without 1,000 writes."""
    for name, app_dir, build_dir in served:
        path = _record_path(store, name, app_dir)
        text = json.dumps({"build": str(build_dir.resolve())})
        with contextlib.suppress(OSError):
            if path.is_file() and path.read_text() == text:
                continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full store costs only the fast path after an upgrade
            log.warning("could not record the build of app %s: %s", name, exc)
    for build_dir in {b for _, _, b in served}:
        with contextlib.suppress(OSError):
            os.utime(build_dir / "manifest.json")


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int
    used: float  # last use (mtime), the eviction order


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def entries(store: Path, cache_dir: Path) -> list[Entry]:
    """Every build folder and compiled component, with its size and last use."""
    found = []
    for folder in (store.iterdir() if store.is_dir() else ()):
        if folder.is_dir() and folder.name != RECORDS:
            manifest = folder / "manifest.json"
            with contextlib.suppress(OSError):
                used = manifest.stat().st_mtime if manifest.exists() else folder.stat().st_mtime
                found.append(Entry(folder, _size(folder), used))
    for artifact in (cache_dir.glob("*.cwasm") if cache_dir.is_dir() else ()):
        with contextlib.suppress(OSError):
            st = artifact.stat()
            found.append(Entry(artifact, st.st_size, st.st_mtime))
    return found


def evict(store: Path, cache_dir: Path, budget_mb: int, keep: set[Path], keep_sha256: set[str]) -> list[Path]:
    """Delete the least recently used builds and compiled components until both together fit in
    `budget_mb` (0: no budget). Never what is in `keep` (builds being served), the compiled form of
    a component in `keep_sha256`, or anything written in the last GRACE_S seconds."""
    if budget_mb <= 0:
        return []
    found = entries(store, cache_dir)
    total = sum(e.bytes for e in found)
    budget = budget_mb << 20
    keep = {p.resolve() for p in keep}
    recent = time.time() - GRACE_S
    evicted = []
    for entry in sorted(found, key=lambda e: e.used):
        if total <= budget:
            break
        if entry.path.resolve() in keep or entry.used > recent:
            continue
        if entry.path.suffix == ".cwasm" and entry.path.name.split("-", 1)[0] in keep_sha256:
            continue
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        except OSError as exc:
            log.warning("could not evict %s: %s", entry.path, exc)
            continue
        total -= entry.bytes
        evicted.append(entry.path)
    if evicted:
        log.info("store over its %d MB budget: evicted %d cold build(s) and component(s); %.0f MB left",
                 budget_mb, len(evicted), total / 2**20)
    if total > budget:
        log.warning("store holds %.0f MB, over its %d MB budget, in builds that are in use or new",
                    total / 2**20, budget_mb)
    return evicted
