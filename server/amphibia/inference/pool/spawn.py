"""Starting and stopping worker processes (`amphibia worker`) on this machine: the one place that
builds their command line, for `amphibia up`, notebooks, benchmarks and tests alike."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("amphibia.pool")


def spawn_worker(gateway_url: str, token: str, *, model: str = "smollm2", slots: int = 4, worker_id: str = "",
                 threads: int | None = None, config: str | Path | None = None, log_file: Path | None = None,
                 own_session: bool = False, preexec: Callable[[], Any] | None = None) -> subprocess.Popen:
    """A worker process dialling `gateway_url` (ws://HOST:PORT/pool) with the pool `token`.

    `threads`: llama.cpp threads; several workers on one machine should split its cores, since
    spinning OpenMP threads that outnumber the cores slow every decode many times. `log_file`
    takes the worker's output (else it is inherited). `own_session` puts it in a process group of
    its own, so a Jupyter kernel's shutdown does not wait on it.
    """
    cmd = [sys.executable, "-m", "amphibia.cli", "worker", "--gateway", gateway_url, "--model", model,
           "--slots", str(slots)]
    if worker_id:
        cmd += ["--worker-id", worker_id]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if config is not None:
        cmd += ["--config", str(config)]
    # The token travels in the environment, not on the command line where `ps` would show it.
    env = {**os.environ, "AMPHIBIA_POOL_TOKEN": token}
    log.info("starting worker: %s", " ".join(cmd))
    out = open(log_file, "ab") if log_file is not None else None
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=own_session, preexec_fn=preexec)
    finally:
        if out is not None:
            out.close()


def stop_worker(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate, and kill what does not exit within `timeout_s`; always reaped (no zombie left)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Supervisor:
    """Keeps one local worker process running: `amphibia up` must not lose its only worker to a
    crash (or the OOM killer) for good. A process that exits is started again after a backoff that
    doubles from `min_backoff_s` to `max_backoff_s` (a worker that dies at once should not spin the
    CPU) and falls back to the minimum once a process has stayed up `stable_s`. The new process dials
    the gateway with the same worker id, so the broker takes it back by itself.
    """

    def __init__(self, start: Callable[[], subprocess.Popen], name: str, *,
                 on_restart: Callable[[], None] = lambda: None, min_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, stable_s: float = 10.0, poll_s: float = 0.25) -> None:
        self.start, self.name, self.on_restart = start, name, on_restart
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.stable_s, self.poll_s = stable_s, poll_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._task: asyncio.Task | None = None

    def run(self) -> asyncio.Task:
        """Start the first process now and watch it from a task on the running loop."""
        self.proc = self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")
        return self._task

    def _spawn(self) -> subprocess.Popen | None:
        try:
            return self.start()
        except OSError as exc:  # no memory to fork, say: the same as a process that died at once
            log.error("worker %s could not be started: %s", self.name, exc)
            return None

    async def _watch(self) -> None:
        backoff = self.min_backoff_s
        while True:
            started = time.monotonic()
            # Polling, not a thread blocked in wait(): cancelling the task at shutdown then stops it at once.
            while self.proc is not None and self.proc.poll() is None:
                await asyncio.sleep(self.poll_s)
            if time.monotonic() - started >= self.stable_s:
                backoff = self.min_backoff_s
            code = self.proc.returncode if self.proc is not None else None
            log.warning("worker %s exited with status %s; restarting it in %.1f s", self.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)
            self.restarts += 1
            self.on_restart()
            self.proc = self._spawn()

    async def stop(self) -> None:
        """Stop watching first (so nothing restarts what shutdown stops), then stop the process."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.proc is not None:
            await asyncio.to_thread(stop_worker, self.proc)
