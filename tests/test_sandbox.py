"""Fresh sandboxes made ahead of their requests (`sandbox/instances.py`): a request that finds its
instance made while the server was idle still gets one nothing ran in, logs under its own request id,
and a spare made for a component that has since changed is never used. Real builds, real wasmtime."""
from __future__ import annotations

import json
import logging
import time

import pytest
from conftest import ROOT

from amphibia.build import build
from amphibia.config import load_app
from amphibia.errors import GuestError
from amphibia.sandbox.llm_host import LlmHost
from amphibia.sandbox.runtime import ComponentCache, HttpRequest, Runtime

MISBEHAVE = ROOT / "tests" / "apps" / "misbehave"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, service):
    app, built = load_app(MISBEHAVE), build(MISBEHAVE)
    cache = tmp_path_factory.mktemp("compiled")
    runtime = Runtime([LlmHost(service)], cache, guest_threads=2)
    yield runtime, app, built, runtime.load(built.wasm, built.sha256), cache
    runtime.close()


def idle_then(runtime: Runtime, call):
    """Wait until the background thread has made the app's spare (the server is idle), then call."""
    deadline = time.monotonic() + 10
    while runtime.spares.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    return call()


def test_a_spare_is_a_fresh_instance_and_logs_under_its_own_request(sandbox, caplog) -> None:
    runtime, app, _, component, _ = sandbox
    get = lambda path, rid: runtime.handle(app, component, HttpRequest("GET", path), rid)  # noqa: E731
    get("/count", "first")  # the first request instantiates in-line; its end orders a spare
    taken = runtime.spares.taken
    for i in range(5):
        res = idle_then(runtime, lambda: get("/count", f"count-{i}"))
        assert json.loads(res.body) == {"served": 1}
    assert runtime.spares.taken >= taken + 5
    with caplog.at_level(logging.INFO, logger="amphibia.guest"):
        assert idle_then(runtime, lambda: get("/print", "spare-print")).body == b"printed"
    assert any("app=misbehave request=spare-print stdout: hello from the guest's stdout" in r.getMessage()
               for r in caplog.records)


def test_a_trap_does_not_reach_the_next_request(sandbox) -> None:
    runtime, app, _, component, _ = sandbox
    with pytest.raises(GuestError, match="trapped"):
        idle_then(runtime, lambda: runtime.handle(app, component, HttpRequest("GET", "/trap"), "trap"))
    res = idle_then(runtime, lambda: runtime.handle(app, component, HttpRequest("GET", "/count"), "after-trap"))
    assert json.loads(res.body) == {"served": 1}


def test_a_spare_of_a_replaced_component_is_not_used(sandbox) -> None:
    runtime, app, built, component, cache = sandbox
    runtime.handle(app, component, HttpRequest("GET", "/ok"), "order-a-spare")
    idle_then(runtime, lambda: None)
    assert runtime.spares.count() == 1
    # The same app now served by another component object (as after a swap to a new build).
    other = ComponentCache(runtime.wasmtime, cache).load(built.wasm, built.sha256)
    assert other is not component
    taken = runtime.spares.taken
    res = runtime.handle(app, other, HttpRequest("GET", "/count"), "swapped")
    assert json.loads(res.body) == {"served": 1}
    assert runtime.spares.taken == taken  # the stale spare was closed, not used


def test_back_to_back_requests_make_no_spares(sandbox) -> None:
    """With no idle time between requests a spare would only slow the next one (see Spares.done)."""
    runtime, app, _, component, _ = sandbox
    for _ in range(30):
        runtime.handle(app, component, HttpRequest("GET", "/ok"), "busy")
    made = runtime.spares.made
    for _ in range(30):
        runtime.handle(app, component, HttpRequest("GET", "/ok"), "busy")
    assert runtime.spares.made - made <= 3
