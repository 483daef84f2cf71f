"""`amphibia up --watch`: rebuild an app when its files change and swap it in without a restart.

The swap is the one an upgrade uses (`gateway.update_apps`): requests in flight finish on the old
build, new ones get the new build once it is ready, and a failed build leaves the old one serving
with its error on the index page, in `/healthz` and in the log.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..build import SERVING_ONLY, source_files
from .gateway import Gateway, update_apps

log = logging.getLogger("amphibia.watch")
Signature = tuple[tuple[str, int, int], ...]


def signature(folder: Path) -> Signature:
    """What changes when a file an app's build reads changes: names, sizes and modification times."""
    out = []
    for path in source_files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel not in SERVING_ONLY:
            st = path.stat()
            out.append((rel, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _signatures(folders: set[Path]) -> dict[Path, Signature]:
    out: dict[Path, Signature] = {}
    for folder in folders:
        try:
            out[folder] = signature(folder)
        except OSError:  # mid-rename or deleted: look again at the next poll
            out[folder] = ()
    return out


async def watch_apps(gateway: Gateway, startup: "asyncio.Task[None] | None" = None, interval_s: float = 0.5) -> None:
    """Poll the apps' folders every `interval_s` and rebuild each app whose files changed, one build
    per app at a time (an edit made during a build starts another when it ends). Waits for the
    `startup` builds first, so that their swaps cannot land after a newer one."""
    specs = list(gateway.config.apps.values())
    folders = {spec.path.resolve() for spec in specs}
    seen = await asyncio.to_thread(_signatures, folders)
    if startup is not None:
        await asyncio.shield(startup)
    running: dict[Path, asyncio.Task[None]] = {}  # folder -> the rebuild of its apps
    log.info("watching %d app folder(s) for changes", len(folders))
    while True:
        await asyncio.sleep(interval_s)
        now = await asyncio.to_thread(_signatures, folders)
        for folder in folders:
            task = running.get(folder)
            if now[folder] == seen[folder] or (task is not None and not task.done()):
                continue  # unchanged, or changed during its rebuild: seen again once that ends
            seen[folder] = now[folder]
            apps = [spec for spec in specs if spec.path.resolve() == folder]
            log.info("%s changed: rebuilding %s (the current build serves meanwhile)", folder,
                     ", ".join(spec.name for spec in apps))
            running[folder] = asyncio.create_task(update_apps(gateway, apps))
