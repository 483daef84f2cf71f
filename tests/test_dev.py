"""`amphibia dev`: the app's source in the page's Pyodide (real Chromium, offline, Pyodide from the
pinned npm package), saving from the page, following edits on disk, and the compiled component
beside it. The routes' guards and the compatibility notes are checked without a browser."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from amphibia.config import AppSpec, Config, discover_apps
from amphibia.dev.compat import notes
from amphibia.dev.files import save, target
from amphibia.errors import BadRequest
from amphibia.http.app import create_app
from amphibia.loopback import serve_in_thread
from conftest import EXAMPLES, FRANCE
from test_browser import CHROMIUM_ARGS

SCRATCH = '''from amphibia_guest import App, Request, Response, llm

app = App()
GREETING = {greeting!r}


@app.route("/", methods=["GET", "POST"])
def root(req: Request) -> Response:
    return Response.json({{"greeting": GREETING, "tokens": len(llm.tokenize(req.text() or "hi"))}})


@app.get("/boom")
def boom(req: Request) -> Response:
    return {{"x": 1 / 0}}
'''


@pytest.fixture(scope="module")
def dev(config: Config, engine, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A gateway in dev mode over the examples and a scratch app, on the session's in-process engine."""
    folder = tmp_path_factory.mktemp("dev") / "scratch"
    folder.mkdir()
    (folder / "app.py").write_text(SCRATCH.format(greeting=f"hello {time.time()}"))
    apps = {name: spec for name, spec in discover_apps(EXAMPLES).items()}
    apps["scratch"] = AppSpec(name="scratch", path=folder, bridge=True, browser_engine="remote")
    served = serve_in_thread(create_app(replace(config, apps=apps), engine=engine, dev=True))
    yield served.url, folder
    served.stop()


@pytest.fixture(scope="module")
def browser(dev) -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_dev(browser: Browser, url: str, app: str) -> Page:
    """The app's dev page, ready (Pyodide loaded, the source imported). Offline: a request for
    anything but the gateway (a CDN, say) is refused and fails the test."""
    page = browser.new_page()
    elsewhere: list[str] = []

    def only_the_gateway(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(url) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_gateway)
    page.on("close", lambda _: elsewhere and pytest.fail(f"the dev page asked for {elsewhere}"))
    page.goto(f"{url}/dev/apps/{app}/?engine=remote")
    page.evaluate("() => window.amphibiaDev.ready")
    assert not elsewhere, elsewhere
    return page


def ask(page: Page, request: dict) -> dict:
    """Send `request` from the dev page; {status, body} of the source's answer (and the compiled one's)."""
    return page.evaluate("""async (r) => {
        amphibiaDev.setRequest(r);
        const out = await amphibiaDev.send();
        const view = (res) => res && { status: res.status, body: res.text() };
        return { source: view(out.source), compiled: view(out.compiled), identical: out.identical };
    }""", request)


def test_an_edit_runs_in_the_page_at_once_and_is_not_saved(browser: Browser, dev) -> None:
    url, folder = dev
    on_disk = (folder / "app.py").read_text()
    page = open_dev(browser, url, "scratch")
    first = ask(page, {"method": "POST", "path": "/", "body": "Hello world"})["source"]
    assert first["status"] == 200 and json.loads(first["body"])["tokens"] == 2
    edited = on_disk.replace("GREETING = ", "GREETING = 'edited ' + ")
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", edited)
    assert "1 unsaved file" in page.inner_text("#dirty")
    page.click("#run")
    page.locator("#out-source").filter(has_text="edited hello").wait_for(timeout=10_000)
    assert (folder / "app.py").read_text() == on_disk  # run is not save
    assert "answered in" in page.inner_text("#timing")
    page.close()


def test_the_page_element_shows_the_source_and_the_atomics_path_runs_it_too(browser: Browser, dev) -> None:
    """The dev page's `<amphibia-app>` runs on the source's App; and without JSPI (forced here: Chromium
    has it) the same source blocks on an engine Worker with Atomics, with the same answers."""
    url, _ = dev
    page = open_dev(browser, url, "chat")
    element = page.locator("#try amphibia-app")
    element.locator("textarea").fill("What is the capital of France?")
    element.locator("button").click()
    element.locator(".status").filter(has_text="tokens/s").wait_for(timeout=60_000)
    assert element.locator("pre").inner_text().strip()
    out = page.evaluate("""async () => {
        const { load } = await import("/amphibia/amphibia.js");
        const run = async (mode) => {
            const app = await load("/apps/tokens/", { runtime: "pyodide", engine: "remote", mode });
            const res = await app.handle({ method: "POST", path: "/", body: "Hello world" });
            app.close();
            return [app.mode, res.text()];
        };
        return [await run("sync"), await run(null)];
    }""")
    assert out[0][0] == "sync" and out[1][0] == "jspi" and out[0][1] == out[1][1]
    assert json.loads(out[0][1])["tokens"] == [19556, 905]
    page.close()


def test_errors_show_python_tracebacks_with_the_apps_file_and_line(browser: Browser, dev) -> None:
    url, folder = dev
    page = open_dev(browser, url, "scratch")
    broken = (folder / "app.py").read_text().replace("app = App()", "app = App(\nx = 1")
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", broken)
    result = page.evaluate("() => amphibiaDev.run()")
    assert not result["ok"] and result["error"]["type"] == "SyntaxError"
    assert result["error"]["file"] == "/apps/scratch/app.py" and result["error"]["line"] == 3
    error = page.inner_text("#error")
    assert 'File "/apps/scratch/app.py", line 3' in error and "app.py, line 3" in error
    # Before the fix: the page answers with the import's traceback instead of the old code.
    down = ask(page, {"method": "GET", "path": "/"})["source"]
    assert down["status"] == 500 and "SyntaxError" in down["body"]
    # A handler's exception: a 500 from the SDK, the traceback (the app's line) in the console.
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", (folder / "app.py").read_text())
    assert page.evaluate("() => amphibiaDev.run()")["ok"]
    boom = ask(page, {"method": "GET", "path": "/boom"})["source"]
    assert boom["status"] == 500 and "ZeroDivisionError" in boom["body"]
    console = page.inner_text("#console")
    assert 'app.py", line 14, in boom' in console and "ZeroDivisionError" in console
    # What the edit imports is checked as the editor has it: `js` is the page's only, `curses` this
    # Pyodide lacks (its npm package has the core library only).
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", "import js\nimport curses\n" + (folder / "app.py").read_text())
    page.evaluate("() => amphibiaDev.run()")
    page.locator("#notes li", has_text="curses").wait_for(timeout=10_000)
    notes = page.inner_text("#notes")
    assert "app.py:1: [component lacks] `js` exists only in the page" in notes
    assert "[pyodide lacks] the page's Pyodide lacks `curses`" in notes
    page.close()


def test_stop_interrupts_an_app_that_never_returns(browser: Browser, dev) -> None:
    url, folder = dev
    page = open_dev(browser, url, "scratch")
    looping = (folder / "app.py").read_text() + "\n\n@app.get('/spin')\ndef spin(req):\n    while True:\n        pass\n"
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", looping)
    assert page.evaluate("() => amphibiaDev.source.reload(Object.fromEntries([['app.py', document.getElementById('editor').value]]))")["ok"]
    page.evaluate("() => { amphibiaDev.setRequest({ method: 'GET', path: '/spin' }); window.spinning = amphibiaDev.send(); }")
    page.locator("#stop:not([disabled])").wait_for(timeout=10_000)
    page.wait_for_timeout(300)
    page.click("#stop")
    page.evaluate("() => window.spinning")
    assert "KeyboardInterrupt" in page.inner_text("#out-source")
    after = ask(page, {"method": "POST", "path": "/", "body": "Hello world"})["source"]  # the page still serves
    assert after["status"] == 200 and json.loads(after["body"])["tokens"] == 2
    page.close()


GREEDY = {
    "chat": {"method": "POST", "path": "/", "contentType": "application/json",
             "body": json.dumps({"messages": FRANCE[1:], "temperature": 0, "max_tokens": 24})},
    "summarize": {"method": "POST", "path": "/", "contentType": "application/json",
                  "body": json.dumps({"text": "Paris is the capital of France. It is known for the Eiffel Tower, "
                                              "built in 1889, and for the Louvre, the most visited museum.",
                                      "sentences": 1})},
    "extract": {"method": "POST", "path": "/", "body": "Write to Ada Lovelace at ada@example.com, phone +44 20 7946 0000."},
    "embed-search": {"method": "POST", "path": "/", "contentType": "application/json",
                     "body": json.dumps({"query": "What is the capital city of France?"})},
    "tokens": {"method": "POST", "path": "/", "body": "Hello world"},
}


def test_source_and_compiled_component_answer_alike_for_every_example(browser: Browser, dev) -> None:
    url, _ = dev
    assert set(GREEDY) == set(discover_apps(EXAMPLES)), "every example needs a greedy request here"
    for app, request in GREEDY.items():
        page = open_dev(browser, url, app)
        page.check("#compare")
        # Once to warm the prompt's KV: a first greedy run (whole prefill) and a later one (cached
        # prefix) can differ in llama.cpp itself (seen with summarize), whichever side sends it.
        ask(page, request)
        out = ask(page, request)
        assert out["source"]["status"] == 200, (app, out)
        assert out["source"] == out["compiled"] and out["identical"], (app, out)
        assert page.inner_text("#match") == "identical answers"
        page.close()


def test_save_from_the_page_and_edits_on_disk_reload_it(browser: Browser, dev) -> None:
    url, folder = dev
    page = open_dev(browser, url, "scratch")
    saved = (folder / "app.py").read_text().replace("GREETING = ", "GREETING = 'saved ' + ")
    page.evaluate("(text) => amphibiaDev.edit('app.py', text)", saved)
    page.click("#save")
    page.locator("#dirty").filter(has_text="saved").wait_for(timeout=10_000)
    assert (folder / "app.py").read_text() == saved
    # The watcher rebuilds the component: the compiled answer follows the saved source.
    deadline = time.monotonic() + 120
    while json.loads(httpx.get(f"{url}/apps/scratch/", timeout=30).text)["greeting"].startswith("saved ") is False:
        assert time.monotonic() < deadline, "the saved edit was not built and swapped in"
        time.sleep(0.3)
    page.check("#compare")
    out = ask(page, {"method": "POST", "path": "/", "body": "Hello world"})
    assert out["identical"] and json.loads(out["source"]["body"])["greeting"].startswith("saved ")
    # An edit on disk (another editor) reloads the page's copy.
    page.evaluate("""() => { window.reloaded = new Promise((r) => amphibiaDev.events.addEventListener("reloaded",
                                                                (e) => r(e.detail), { once: true })); }""")
    (folder / "app.py").write_text(saved.replace("'saved ' + ", "'from disk ' + "))
    detail = page.evaluate("() => window.reloaded")
    assert detail["result"]["ok"]
    assert "'from disk ' + " in page.input_value("#editor")
    body = ask(page, {"method": "GET", "path": "/"})["source"]["body"]
    assert json.loads(body)["greeting"].startswith("from disk ")
    page.close()


def test_dev_routes_are_for_dev_mode_and_this_machine_only(config: Config, engine, dev, tmp_path: Path) -> None:
    url, folder = dev
    headers = {"x-amphibia-dev": "save"}
    put = lambda path, body, **kw: httpx.put(f"{url}/dev/apps/scratch/files/{path}", content=body, timeout=10,  # noqa: E731
                                             headers={**headers, **kw.pop("headers", {})}, **kw)
    before = (folder / "app.py").read_text()
    assert put("app.py", before, headers={"x-amphibia-dev": ""}).status_code == 403  # no dev header: a form post
    res = put("app.py", before, headers={"origin": "https://evil.example"})
    assert res.status_code == 403 and "own page" in res.json()["error"]["message"]
    for bad in ("../escape.py", "app.toml", ".hidden.py", "__pycache__/x.py", "notes.txt", "%2e%2e/x.py"):
        res = put(bad, "x = 1")
        assert res.status_code in (400, 404), (bad, res.text)
        assert res.json()["error"]["type"] in ("bad_request", "not_found")
    res = put("app.py", b"x = '\xff'")
    assert res.status_code == 400 and "not UTF-8" in res.json()["error"]["message"]
    assert (folder / "app.py").read_text() == before  # nothing was written
    assert httpx.get(f"{url}/dev/apps/nope/bundle", timeout=10).status_code == 404
    for bad in ({"files": [1]}, {"files": {"app.py": 3}}, {"files": {f"m{i}.py": "" for i in range(501)}}, {}):
        res = httpx.post(f"{url}/dev/apps/scratch/notes", json=bad, timeout=10)
        assert res.status_code == 400 and res.json()["error"]["type"] == "bad_request", bad
    res = httpx.post(f"{url}/dev/apps/scratch/notes", content=b"\xff\xfe", timeout=10)
    assert res.status_code == 400
    found = httpx.post(f"{url}/dev/apps/scratch/notes", json={"files": {"app.py": "import socket\n"}}, timeout=10).json()
    assert found["notes"][0]["module"] == "socket" and found["stdlib"] == ["socket"]
    # Another machine (here: a client address that is not loopback) gets nothing, not even the source.
    apps = {"scratch": AppSpec(name="scratch", path=folder)}
    # (on a thread of its own: Playwright's sync API keeps an event loop running on this one)
    in_thread = lambda coro: ThreadPoolExecutor(1).submit(asyncio.run, coro).result()  # noqa: E731

    async def from_client(dev_mode: bool, client: str, method: str, path: str, **kw) -> httpx.Response:
        transport = httpx.ASGITransport(create_app(replace(config, apps=apps), engine=engine, dev=dev_mode),
                                        client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.request(method, path, **kw)

    res = in_thread(from_client(True, "203.0.113.9", "GET", "/dev/apps/scratch/bundle"))
    assert res.status_code == 403 and res.json()["error"]["type"] == "forbidden"
    res = in_thread(from_client(True, "203.0.113.9", "PUT", "/dev/apps/scratch/files/app.py", content="x", headers=headers))
    assert res.status_code == 403
    assert in_thread(from_client(True, "127.0.0.1", "GET", "/dev/apps/scratch/bundle")).status_code == 200
    # Without dev mode there are no dev routes at all.
    assert in_thread(from_client(False, "127.0.0.1", "GET", "/dev/apps/scratch/bundle")).status_code == 404


def test_save_paths_stay_inside_the_app(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1\n")
    outside = tmp_path.parent / f"outside-{time.time_ns()}"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    for bad in ("/etc/passwd.py", "a/../../x.py", "link/x.py", "a\\b.py", "x.pyc", "", "a/.git/x.py"):
        with pytest.raises(BadRequest):
            target(tmp_path, bad)
    save(tmp_path, "pkg/helpers.py", b"def f():\n    return 2\n")  # a new module in a new package folder
    assert (tmp_path / "pkg/helpers.py").read_text().startswith("def f")
    assert not list(tmp_path.rglob(".amphibia-save-*"))


def test_compat_notes_name_what_each_side_lacks(tmp_path: Path) -> None:
    files = {
        "app.py": "import json\nimport js\nimport numpy as np\nfrom socket import socket\nimport helpers\n"
                  "from amphibia_guest import App\nimport urllib.request\n",
        "helpers.py": "import threading\n",
    }
    found, stdlib = notes(tmp_path, files)
    by_module = {n["module"]: n for n in found}
    assert by_module["js"]["lacking"] == "component" and by_module["js"]["line"] == 2
    assert by_module["numpy"]["lacking"] == "both" and "app folder" in by_module["numpy"]["message"]
    assert by_module["socket"]["lacking"] == "both" and "sockets" in by_module["socket"]["message"]
    assert by_module["threading"]["file"] == "helpers.py"
    assert "urllib.request" in by_module and "helpers" not in by_module and "json" not in by_module
    assert "json" in stdlib and "urllib.request" in stdlib
