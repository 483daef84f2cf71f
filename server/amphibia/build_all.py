"""`amphibia build` over many apps: in parallel, with a progress bar and a summary.

componentize-py reports no progress of its own, so the bar counts apps; each running build shows
its elapsed time. A failed app does not stop the others; the summary names it with its error.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .build import BuildResult, build, build_in_store, source_hash
from .errors import AmphibiaError


@dataclass(frozen=True)
class Job:
    name: str
    app_dir: Path
    out_dir: Path | None = None  # None: the app's own `.amphibia`
    store: Path | None = None  # set: into this content-addressed store (an amphibia.toml's build_dir)


@dataclass
class Outcome:
    job: Job
    result: BuildResult | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def state(self) -> str:
        return "failed" if self.error is not None else "built" if self.result and self.result.rebuilt else "up to date"


def _one(job: Job, force: bool) -> Outcome:
    started = time.perf_counter()
    try:
        if job.store is None:
            result = build(job.app_dir, job.out_dir, name=job.name, force=force)
        elif force:
            result = build(job.app_dir, job.store / source_hash(job.app_dir.resolve())[:32], name=job.name, force=True)
        else:
            result = build_in_store(job.app_dir, job.store, name=job.name)
        return Outcome(job, result, seconds=time.perf_counter() - started)
    except AmphibiaError as exc:
        return Outcome(job, error=exc.message, seconds=time.perf_counter() - started)
    except Exception as exc:  # an unexpected failure of one app is reported with it, not raised
        return Outcome(job, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)


def build_all(jobs: list[Job], force: bool = False, parallel: int | None = None,
              console: Console | None = None) -> list[Outcome]:
    """Build every job, `parallel` at a time (default: one per core), showing progress on `console`."""
    console = console or Console(stderr=True)
    outcomes: list[Outcome] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        total = progress.add_task("building apps", total=len(jobs))
        rows = {}
        with ThreadPoolExecutor(parallel or os.cpu_count() or 1) as pool:
            futures = {}
            for job in jobs:
                rows[job.name] = progress.add_task(f"  {job.name}: waiting", total=None, visible=False)
                futures[pool.submit(_started, progress, rows[job.name], job, force)] = job
            for future in as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                progress.remove_task(rows[outcome.job.name])
                mark = "[red]failed[/]" if outcome.error else outcome.state
                progress.console.print(f"  {outcome.job.name}: {mark} ({outcome.seconds:.1f} s)")
                progress.advance(total)
    counts = {state: sum(o.state == state for o in outcomes) for state in ("built", "up to date", "failed")}
    console.print(f"{len(outcomes)} app(s): {counts['built']} built, {counts['up to date']} up to date, "
                  f"{counts['failed']} failed")
    for outcome in outcomes:
        if outcome.error:
            console.print(f"[red]{outcome.job.name}[/] ({outcome.job.app_dir}):", highlight=False)
            console.print(outcome.error, markup=False, highlight=False)
    return sorted(outcomes, key=lambda o: o.job.name)


def _started(progress: Progress, row: int, job: Job, force: bool) -> Outcome:
    progress.update(row, description=f"  {job.name}: building", visible=True)
    return _one(job, force)
