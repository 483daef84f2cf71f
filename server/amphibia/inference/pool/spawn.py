"""Starting and stopping worker processes (`amphibia worker`) on this machine: the one place that
builds their command line, for `amphibia up`, notebooks, benchmarks and tests alike."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
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
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
