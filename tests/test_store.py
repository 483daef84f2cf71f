"""Many apps on one gateway: compiled components unloaded (LRU) and mapped again with the same
answers, the store kept within its disk budget, and new builds swapped in while the old ones serve
(after an upgrade, and with --watch). Real builds, real components, a real gateway."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import CACHE, EXAMPLES, ROOT

from amphibia.config import AppSpec, Config, ServerConfig, default_models, discover_apps
from amphibia.http.app import create_app
from amphibia.loopback import serve_in_thread
from amphibia.store import GRACE_S, evict, last_served

VERSIONED = '''from amphibia_guest import App, Request, Response

app = App()
VERSION = {version!r}


@app.route("/", methods=["GET", "POST"])
def root(req: Request) -> Response:
    return Response.json({{"version": VERSION}})
'''


def test_components_are_unloaded_beyond_the_bound_and_answer_the_same_when_mapped_again(
        tmp_path: Path, engine) -> None:
    apps = {**discover_apps(EXAMPLES / "tokens"), **discover_apps(EXAMPLES / "embed-search")}
    config = Config(models=default_models(), root=ROOT, apps=apps,
                    server=replace(ServerConfig(), cache_dir=CACHE, build_dir=tmp_path / "builds", max_loaded_apps=1))
    asgi = create_app(config, engine=engine, warm_model=False)
    served = serve_in_thread(asgi)
    gateway = asgi.state.gateway
    try:
        wait_until(lambda: len(gateway.apps) == 2, "both apps built")

        def ask() -> tuple[dict, dict]:
            a = httpx.post(f"{served.url}/apps/tokens/", content=b"Hello world", timeout=60)
            b = httpx.get(f"{served.url}/apps/embed-search/", params={"q": "capital of France"}, timeout=60)
            assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
            return a.json(), b.json()

        first = ask()
        unloaded = gateway.runtime.cache.unloaded
        again = [ask() for _ in range(2)]
        assert all(answers == first for answers in again)
        assert gateway.runtime.cache.count() == 1  # never more than the bound in memory
        assert gateway.runtime.cache.unloaded >= unloaded + 4  # each request mapped its app again
    finally:
        served.stop()


def test_the_store_evicts_the_coldest_unused_builds_to_its_budget(tmp_path: Path) -> None:
    store, cache = tmp_path / "builds", tmp_path / "cache"
    cache.mkdir(parents=True)
    old = time.time() - GRACE_S - 3600

    def build(name: str, mb: int, age: float) -> Path:
        folder = store / name
        folder.mkdir(parents=True)
        (folder / "app.wasm").write_bytes(b"\0" * (mb << 20))
        (folder / "manifest.json").write_text("{}")
        os.utime(folder / "manifest.json", (old - age, old - age))
        return folder

    coldest, cold, served, fresh = build("a", 3, 300), build("b", 3, 200), build("c", 3, 400), build("d", 3, 0)
    os.utime(fresh / "manifest.json")  # written just now: maybe a build about to be served
    artifact = cache / f"{'e' * 64}-wasmtime.cwasm"
    artifact.write_bytes(b"\0" * (3 << 20))
    os.utime(artifact, (old - 500, old - 500))
    kept_artifact = cache / f"{'f' * 64}-wasmtime.cwasm"
    kept_artifact.write_bytes(b"\0" * (3 << 20))
    os.utime(kept_artifact, (old - 600, old - 600))

    evicted = evict(store, cache, budget_mb=13, keep={served}, keep_sha256={"f" * 64})
    assert evicted == [artifact, coldest]  # coldest first, until 18 MB fit in 13
    assert cold.exists() and served.exists() and fresh.exists() and kept_artifact.exists()
    assert evict(store, cache, budget_mb=0, keep=set(), keep_sha256=set()) == []  # 0: no budget


def test_a_new_build_is_swapped_in_while_the_old_one_serves(tmp_path: Path) -> None:
    """After an upgrade (here: a changed source; a new SDK changes every app's input the same way) the
    gateway serves the last build at once and swaps in the new one when it is ready; with --watch an
    edit does the same, and a broken edit leaves the old build serving with its error shown."""
    folder = tmp_path / "versioned"
    folder.mkdir()
    (folder / "app.py").write_text(VERSIONED.format(version=f"one {time.time()}"))  # new to every store
    store = tmp_path / "builds"
    spec = AppSpec(name="versioned", path=folder)

    def gateway(watch: bool):
        config = Config(models=default_models(), root=tmp_path, apps={"versioned": spec},
                        server=replace(ServerConfig(), cache_dir=tmp_path / "cache", build_dir=store,
                                       edits_from_source=False))  # builds only (see the test after the next)
        return create_app(config, warm_model=False, watch=watch)

    def version(url: str) -> tuple[int, str | None]:
        res = httpx.get(f"{url}/apps/versioned/", timeout=60)
        return res.status_code, res.json().get("version")

    asgi = gateway(watch=False)
    served = serve_in_thread(asgi, wait_for_apps=False)
    try:
        assert version(served.url)[0] == 503  # nothing to serve yet: building
        one = wait_until(lambda: version(served.url)[0] == 200 and version(served.url)[1], "the first build")
    finally:
        served.stop()
    assert last_served(store, "versioned", folder) is not None

    (folder / "app.py").write_text(VERSIONED.format(version="two"))
    asgi = gateway(watch=True)
    served = serve_in_thread(asgi, wait_for_apps=False)
    try:
        assert version(served.url) == (200, one)  # at once, from the last build, while "two" builds
        health = httpx.get(f"{served.url}/healthz", timeout=10).json()
        assert health["updating"] == ["versioned"] and health["building"] == []
        assert "a new version is building" in httpx.get(f"{served.url}/", timeout=10).text
        wait_until(lambda: version(served.url) == (200, "two"), "the swap to the new build")

        (folder / "app.py").write_text(VERSIONED.format(version="three").replace("def root", "def root(:"))
        wait_until(lambda: "versioned" in httpx.get(f"{served.url}/healthz", timeout=10).json()["failed"],
                   "the broken edit to be reported")
        assert version(served.url) == (200, "two")  # the old build still serves
        health = httpx.get(f"{served.url}/healthz", timeout=10).json()
        assert health["status"] == "degraded" and "SyntaxError" in " ".join(health["reasons"])
        assert "SyntaxError" in httpx.get(f"{served.url}/", timeout=10).text

        (folder / "app.py").write_text(VERSIONED.format(version="three"))
        wait_until(lambda: version(served.url) == (200, "three"), "the fixed edit to be swapped in")
        assert httpx.get(f"{served.url}/healthz", timeout=10).json()["failed"] == []
    finally:
        served.stop()
    shutil.rmtree(store)


def wait_until(condition, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_a_last_build_for_another_contract_is_not_served_meanwhile(tmp_path: Path) -> None:
    """After an upgrade that changes the WIT world, the last build cannot link: the app waits for its
    new build (503 building) rather than serve one that traps on every request."""
    import json

    from amphibia.build import build_in_store
    from amphibia.http.gateway import survey
    from amphibia.store import remember_served

    spec = discover_apps(EXAMPLES / "tokens")["tokens"]
    result = build_in_store(spec.path, tmp_path / "store", name=spec.name)
    copy = tmp_path / "store" / "copy"  # (the build may be the app folder's own: never edit that one)
    shutil.copytree(result.wasm.parent, copy)
    remember_served(tmp_path / "store", [(spec.name, spec.path, copy)])
    assert survey([spec], tmp_path / "store")[spec.name].previous is not None
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "world": "amphibia:ai/app@0.0.1"}))
    assert survey([spec], tmp_path / "store")[spec.name].previous is None


STREAMING = '''from amphibia_guest import App, Request, Response

app = App()
VERSION = {version!r}


@app.get("/")
def root(req: Request) -> Response:
    return Response.json({{"version": VERSION}})


@app.get("/long")
def long(req: Request) -> Response:
    piece = (VERSION + "\\n") * 4096
    return Response.stream(piece for _ in range(1000))
'''


def test_watch_swaps_versions_while_a_request_is_in_flight(tmp_path: Path) -> None:
    """With --watch, an edit's new build serves new requests while one that started before it (here a
    long streamed answer, its guest held mid-write by a client that does not read) finishes on the
    old build, whole."""
    folder = tmp_path / "streaming"
    folder.mkdir()
    one = f"one {time.time()}"
    (folder / "app.py").write_text(STREAMING.format(version=one))
    config = Config(models=default_models(), root=tmp_path, apps={"streaming": AppSpec(name="streaming", path=folder)},
                    server=replace(ServerConfig(), cache_dir=tmp_path / "cache", build_dir=tmp_path / "builds",
                                   edits_from_source=False))  # the swap to a new build
    served = serve_in_thread(create_app(config, warm_model=False, watch=True))
    try:
        with httpx.Client(timeout=60) as reader, reader.stream("GET", f"{served.url}/apps/streaming/long") as res:
            body = res.iter_bytes()
            received = [next(body)]  # the guest is now mid-answer, held by backpressure
            (folder / "app.py").write_text(STREAMING.format(version="two"))
            wait_until(lambda: httpx.get(f"{served.url}/apps/streaming/", timeout=30).json()["version"] == "two",
                       "the new build to serve new requests")
            received.extend(body)
        lines = b"".join(received).decode().splitlines()
        assert len(lines) == 1000 * 4096 and set(lines) == {one}  # whole, and all from the old build
    finally:
        served.stop()


def test_an_edit_answers_from_source_before_its_build(tmp_path: Path) -> None:
    """With --watch, an edit is served at once by the dev component (the edit's files imported per
    instance) and then by its own build; an edit the dev component cannot import (a module outside its
    snapshot, a broken import) is left to its build, and a failed build keeps the last version."""
    folder = tmp_path / "versioned"
    folder.mkdir()
    stamp = time.time()
    (folder / "app.py").write_text(VERSIONED.format(version=f"one {stamp}"))
    config = Config(models=default_models(), root=ROOT, apps={"versioned": AppSpec(name="versioned", path=folder)},
                    server=replace(ServerConfig(), cache_dir=CACHE, build_dir=ROOT / ".amphibia" / "builds"))
    served = serve_in_thread(create_app(config, warm_model=False, watch=True))
    url = served.url

    def state() -> tuple[str, bool, bool]:
        # The answer first: what answered then is still what serves when the listing is read a moment
        # later (a build takes seconds), not the other way round (a trial takes milliseconds).
        version = httpx.get(f"{url}/apps/versioned/", timeout=30).json()["version"]
        app = next(a for a in httpx.get(f"{url}/api/apps", timeout=30).json()["apps"] if a["name"] == "versioned")
        return version, app["from_source"], app["updating"]

    try:
        wait_until(lambda: httpx.get(f"{url}/api/apps", timeout=30).json()["dev_component"], "the dev component")
        (folder / "app.py").write_text(VERSIONED.format(version=f"two {stamp}"))
        seen = wait_until(lambda: (s := state())[0] == f"two {stamp}" and s, "the edit to answer")
        assert seen[1], "the edit was answered by its build, not from source"
        wait_until(lambda: state() == (f"two {stamp}", False, False), "the edit's build to replace it")

        # `wave` is in the standard library but not in the dev component's snapshot: its build serves it.
        (folder / "app.py").write_text("import wave\n" + VERSIONED.format(version=f"three {stamp}"))
        seen = wait_until(lambda: (s := state())[0] == f"three {stamp}" and s, "the build of an edit importing wave")
        assert not seen[1]

        (folder / "app.py").write_text("import no_such_module\n" + VERSIONED.format(version=f"four {stamp}"))
        wait_until(lambda: "versioned" in httpx.get(f"{url}/healthz", timeout=10).json()["failed"], "the failed build")
        assert state() == (f"three {stamp}", False, False)  # never served from source, the last build serves
        assert "no_such_module" in httpx.get(f"{url}/healthz", timeout=10).json()["reasons"][0]
    finally:
        served.stop()


def test_a_new_build_serves_before_its_browser_part_is_made(tmp_path: Path) -> None:
    """A new build answers on the server as soon as its component is compiled; pages keep getting the
    previous browser build (consistent with itself) until jco has made the new one."""
    folder = tmp_path / "versioned"
    folder.mkdir()
    stamp = time.time()
    (folder / "app.py").write_text(VERSIONED.format(version=f"one {stamp}"))
    config = Config(models=default_models(), root=tmp_path, apps={"versioned": AppSpec(name="versioned", path=folder)},
                    server=replace(ServerConfig(), cache_dir=tmp_path / "cache", build_dir=tmp_path / "builds",
                                   edits_from_source=False))
    served = serve_in_thread(create_app(config, warm_model=False, watch=True))  # returns with the browser part made
    url = served.url

    def listing() -> dict:
        return next(a for a in httpx.get(f"{url}/api/apps", timeout=30).json()["apps"] if a["name"] == "versioned")

    try:
        first = listing()
        assert first["browser"] and not first["updating"]
        (folder / "app.py").write_text(VERSIONED.format(version=f"two {stamp}"))
        wait_until(lambda: httpx.get(f"{url}/apps/versioned/", timeout=30).json()["version"] == f"two {stamp}",
                   "the new build", timeout=180)
        now = listing()
        assert now["updating"] and now["wasm_sha256"] != first["wasm_sha256"]
        assert now["browser"] == first["browser"]  # the page the previous build made, whole
        assert httpx.get(f"{url}{first['browser']}app.js", timeout=30).status_code == 200
        done = wait_until(lambda: (a := listing())["updating"] is False and a, "the browser part")
        assert done["browser"] != first["browser"] and done["browser"].startswith("/apps/versioned/browser/@")
        assert httpx.get(f"{url}{done['browser']}app.js", timeout=30).status_code == 200
        assert httpx.get(f"{url}{first['browser']}app.js", timeout=30).status_code == 404  # not served any more
    finally:
        served.stop()
