"""The worker process `amphibia up` starts next to the gateway, so one command still works."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger("amphibia.pool")


def start_local_worker(port: int, model: str, slots: int, token: str, config_target: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "amphibia.cli", "worker", "--gateway", f"ws://127.0.0.1:{port}/pool",
           "--model", model, "--slots", str(slots), "--worker-id", f"local-{model}"]
    if config_target:
        cmd += ["--config", config_target]
    # The token travels in the environment, not on the command line where `ps` would show it.
    env = {**os.environ, "AMPHIBIA_POOL_TOKEN": token}
    log.info("starting local worker: %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
