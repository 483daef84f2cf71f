"""The same components in a real headless Chromium (Debian's, driven by Playwright, no browser
download): JSPI, a module Worker, and llm calls over the /bridge into the real pool."""
from __future__ import annotations

import json
import re
import shutil
from typing import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from conftest import FRANCE, Pool

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_browser_error_table_matches_the_servers() -> None:
    """The page maps a bridge failure to the WIT error case with its own copy of the server's table."""
    from pathlib import Path

    from amphibia.errors import LLM_ERRORS

    source = (Path(__file__).parent.parent / "browser/src/engines.js").read_text()
    table = re.search(r"const ERROR_TAGS = \{(.*?)\};", source, re.S)
    assert table is not None
    browser_tags = dict(re.findall(r"(\w+): \"([\w-]+)\"", table.group(1)))
    assert browser_tags == {kind: cls.wit for kind, cls in LLM_ERRORS.items()}


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running until it exits
def browser(pool: Pool) -> Iterator[Browser]:
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser: Browser, pool: Pool) -> Iterator[Page]:
    page = browser.new_page()
    page.goto(f"{pool.url}/amphibia/")
    yield page
    page.close()


def run(page: Page, app: str, requests: list[dict], engine: str = "remote") -> list[dict]:
    """Load `app` in the page and send it `requests`; each result is {status, body} or {error}."""
    return page.evaluate("""async ([app, requests, engine]) => {
        const { load } = await import("/amphibia/amphibia.js");
        const loaded = await load(`/apps/${app}/`, { engine });
        const out = [];
        for (const req of requests) {
            try {
                const res = await loaded.handle(req);
                out.push({ status: res.status, body: res.text() });
            } catch (err) {
                out.push({ error: String(err.message || err) });
            }
        }
        loaded.close();
        return out;
    }""", [app, requests, engine])


def test_chat_in_the_browser_answers_like_the_server(page: Page, pool: Pool) -> None:
    payload = {"messages": FRANCE, "temperature": 0, "max_tokens": 32}
    server = httpx.post(f"{pool.url}/apps/chat/", json=payload, timeout=60).json()
    [res] = run(page, "chat", [{"method": "POST", "path": "/", "headers": {"content-type": "application/json"},
                                "body": json.dumps(payload)}])
    assert res["status"] == 200, res
    assert json.loads(res["body"]) == server
    assert server["reply"] == "The capital of France is Paris."


def test_streaming_tokens_and_embeddings_in_the_browser(page: Page) -> None:
    [stream] = run(page, "chat", [{"method": "POST", "path": "/stream", "headers": {"content-type": "application/json"},
                                   "body": json.dumps({"messages": FRANCE, "temperature": 0, "max_tokens": 32})}])
    body = json.loads(stream["body"])
    assert body["reply"] == "The capital of France is Paris." and body["pieces"] > 3
    [tokens] = run(page, "tokens", [{"method": "POST", "path": "/", "body": "Hello world"}])
    assert json.loads(tokens["body"]) == {"count": 2, "tokens": [19556, 905], "pieces": ["Hello", " world"],
                                          "roundtrip": True}
    [search] = run(page, "embed-search", [{"method": "POST", "path": "/", "headers": {"content-type": "application/json"},
                                           "body": json.dumps({"query": "What is the capital city of France?"})}])
    assert "Paris" in json.loads(search["body"])["results"][0]["document"]


def test_llm_errors_and_a_trapped_guest_in_the_browser(page: Page) -> None:
    results = run(page, "misbehave", [
        {"method": "GET", "path": "/model", "query": "name=gpt-17"},
        {"method": "GET", "path": "/params", "query": "temperature=3.5"},
        {"method": "GET", "path": "/trap"},
        {"method": "GET", "path": "/ok"},  # answered by a fresh instance
        {"method": "GET", "path": "/raise"},
    ])
    assert json.loads(results[0]["body"])["error"] == "ModelNotSupported"
    assert json.loads(results[1]["body"])["error"] == "InvalidInput"
    assert "error" in results[2] and "unreachable" in results[2]["error"]
    assert results[3] == {"status": 200, "body": "ok"}
    assert results[4]["status"] == 500 and "boom from the guest" in results[4]["body"]


def test_the_amphibia_app_element(page: Page) -> None:
    page.evaluate("""async () => {
        await import("/amphibia/amphibia.js");
        document.body.innerHTML = '<amphibia-app id="chat" src="/apps/chat/" engine="remote"></amphibia-app>';
    }""")
    status = page.locator("#chat").locator(".status")
    status.filter(has_text="engine: remote").wait_for(timeout=30_000)
    page.locator("#chat").locator("textarea").fill("What is the capital of France? Answer in two sentences.")
    page.locator("#chat").locator("button").click()
    status.filter(has_text="tokens/s").wait_for(timeout=60_000)
    answer = page.locator("#chat").locator("pre").inner_text()
    assert answer.strip() and "failed" not in answer  # the chat app samples at 0.8: any real answer
    text = status.inner_text()
    assert " 200 " in text and int(re.search(r"(\d+) tokens ", text).group(1)) > 0, text


CHAT = {"method": "POST", "headers": {"content-type": "application/json"}}
STORY = [{"role": "user", "content": "Write a short story about a frog."}]


def test_local_engine_runs_the_model_in_the_page_and_a_second_visit_downloads_nothing(browser: Browser,
                                                                                         pool: Pool) -> None:
    context = browser.new_context()  # its own OPFS: the first visit must download the model
    model_requests: list[str] = []
    context.on("request", lambda r: "/models/" in r.url and model_requests.append(r.method))
    script = """async (body) => {
        const { load } = await import("/amphibia/amphibia.js");
        const app = await load("/apps/chat/", { engine: "local" });
        const decision = await app.localReady;
        const res = await app.handle({ method: "POST", path: "/", headers: {"content-type": "application/json"}, body });
        app.close();
        return { decision, status: res.status, body: res.text() };
    }"""
    body = json.dumps({"messages": FRANCE, "temperature": 0, "max_tokens": 32})
    visits, downloads = [], []
    for _ in range(2):
        page = context.new_page()
        # The app's own page: cross-origin isolated, and its <amphibia-app> loads the model too (the
        # page's two Workers share one download through a Web Lock and OPFS).
        page.goto(f"{pool.url}/apps/chat/browser/")
        assert page.evaluate("crossOriginIsolated")
        visits.append(page.evaluate(script, body))
        page.locator("amphibia-app .status").filter(has_text="engine: local").wait_for(timeout=60_000)
        page.close()
        downloads.append(model_requests.count("GET"))
    first, second = visits
    for visit in visits:
        assert visit["decision"]["engine"] == "local", visit
        assert visit["status"] == 200, visit
        assert "Paris" in json.loads(visit["body"])["reply"]  # llama.cpp in Wasm, the same model
    assert downloads == [1, 1], model_requests  # one download on the first visit, none on the second
    assert second["decision"]["load"]["downloadedBytes"] == 0
    assert "from the browser's cache" in second["decision"]["reason"]
    assert second["decision"]["load"]["threads"] > 1  # isolated page: wllama runs multi-threaded
    context.close()


def test_auto_uses_remote_when_local_is_unavailable(page: Page, pool: Pool) -> None:
    payload = {"messages": FRANCE, "temperature": 0, "max_tokens": 32}
    server = httpx.post(f"{pool.url}/apps/chat/", json=payload, timeout=60).json()
    out = page.evaluate("""async (body) => {
        const { load } = await import("/amphibia/amphibia.js");
        const small = await load("/apps/chat/", { engine: "auto", maxLocalModelBytes: 1e6 });
        const forced = await load("/apps/chat/", { engine: "auto", forceLocalUnavailable: "test" });
        const decisions = [await small.localReady, await forced.localReady];
        const res = await small.handle({ method: "POST", path: "/", headers: {"content-type": "application/json"}, body });
        small.close(); forced.close();
        return { decisions, status: res.status, body: res.text() };
    }""", json.dumps(payload))
    small, forced = out["decisions"]
    assert small["engine"] == "remote" and "over the 1 MB limit" in small["reason"], small
    assert forced["engine"] == "remote" and "forced it off" in forced["reason"], forced
    assert out["status"] == 200 and json.loads(out["body"]) == server


def test_killing_local_mid_answer_finishes_remotely_and_a_dropped_bridge_resumes(page: Page, pool: Pool) -> None:
    body = json.dumps({"messages": STORY, "temperature": 0, "max_tokens": 40})
    out = page.evaluate("""async (body) => {
        const { load } = await import("/amphibia/amphibia.js");
        const app = await load("/apps/chat/", { engine: "auto" });
        const engines = [app.engine, (await app.localReady).engine];
        const fallbacks = [];
        app.addEventListener("fallback", (e) => fallbacks.push(e.detail));
        let tokens = 0, stopAt = 4, action = () => app.stopLocal("killed by the test");
        app.addEventListener("token", () => { tokens += 1; if (tokens === stopAt) action(); });
        const request = { method: "POST", path: "/stream", headers: {"content-type": "application/json"}, body };
        const rescued = await app.handle(request);
        engines.push(app.engine);
        tokens = 0; stopAt = 3; action = () => app.dropBridge();
        const resumed = await app.handle(request);
        app.close();
        return { engines, fallbacks, rescued: rescued.text(), resumed: resumed.text() };
    }""", body)
    assert out["engines"] == ["remote", "local", "remote"], out
    [fallback] = out["fallbacks"]
    assert fallback["from"] == "local" and fallback["to"] == "remote" and fallback["resumed_chars"] > 0
    remote = httpx.post(f"{pool.url}/apps/chat/stream", json=json.loads(body), timeout=60).json()
    # Greedy local text plus its remote continuation is the remote answer; so is one that survived
    # a dropped bridge connection.
    assert json.loads(out["rescued"])["reply"] == remote["reply"]
    assert json.loads(out["resumed"]) == remote


def test_app_page_and_embedding_from_another_origin(browser: Browser, pool: Pool) -> None:
    page = browser.new_page()
    response = page.goto(f"{pool.url}/apps/chat/")  # a person's visit gets the page, curl gets the app
    assert response.headers["cross-origin-embedder-policy"] == "require-corp"
    assert page.locator("h1").inner_text() == "chat" and page.locator("amphibia-app").count() == 1
    page.close()
    third_party = pool.third_party_url
    page = browser.new_page()
    page.goto(f"{third_party}/embed.html?gateway={pool.url}&app=chat&engine=remote")
    status = page.locator("amphibia-app").locator(".status")
    status.filter(has_text="engine: remote").wait_for(timeout=30_000)
    page.locator("amphibia-app").locator("textarea").fill("What is the capital of France? Answer in two sentences.")
    page.locator("amphibia-app").locator("button").click()
    status.filter(has_text="tokens/s").wait_for(timeout=60_000)
    assert page.locator("amphibia-app").locator("pre").inner_text().strip()
    assert page.evaluate("location.origin") == third_party and third_party != pool.url
    page.close()


def test_the_sync_build_runs_where_jspi_is_missing(browser: Browser, page: Page, pool: Pool) -> None:
    """Without JSPI the guest runs jco's sync build and blocks on Atomics.wait while an engine Worker
    answers (SharedArrayBuffer: only in a cross-origin isolated page). Forced here with mode "sync"."""
    payload = {"messages": FRANCE, "temperature": 0, "max_tokens": 32}
    server = httpx.post(f"{pool.url}/apps/chat/", json=payload, timeout=60).json()
    isolated = browser.new_page()
    isolated.goto(f"{pool.url}/apps/tokens/browser/")
    out = isolated.evaluate("""async ([chat, stream]) => {
        const { load } = await import("/amphibia/amphibia.js");
        const app = await load("/apps/chat/", { mode: "sync", engine: "remote" });
        const post = (path, body) => app.handle({ method: "POST", path, headers: {"content-type": "application/json"}, body });
        let tokens = 0;
        app.addEventListener("token", () => { tokens += 1; });
        const answers = [(await post("/", chat)).text(), (await post("/stream", stream)).text()];
        const misbehave = await load("/apps/misbehave/", { mode: "sync", engine: "remote" });
        const results = [];
        for (const path of ["/model", "/trap", "/ok"]) {
            try { results.push((await misbehave.handle({ method: "GET", path, query: "name=gpt-17" })).text()); }
            catch (err) { results.push("error: " + err.message); }
        }
        const tokenizer = await load("/apps/tokens/", { mode: "sync", engine: "remote" });
        results.push((await tokenizer.handle({ method: "POST", path: "/", body: "Hello world" })).text());
        return { mode: app.mode, answers, tokens, results };
    }""", [json.dumps(payload), json.dumps({**payload, "max_tokens": 32})])
    isolated.close()
    assert out["mode"] == "sync"
    assert json.loads(out["answers"][0]) == server
    assert json.loads(out["answers"][1])["reply"] == server["reply"] and out["tokens"] > 3  # live token events
    model, trap, ok, tokens = out["results"]
    assert json.loads(model)["error"] == "ModelNotSupported"
    assert trap.startswith("error:") and ok == "ok"  # a trapped guest is replaced
    assert json.loads(tokens)["tokens"] == [19556, 905]
    # Not isolated (the test page has no COOP/COEP): the sync build cannot run, and says why.
    error = page.evaluate("""async () => {
        const { load } = await import("/amphibia/amphibia.js");
        try { await load("/apps/chat/", { mode: "sync" }); return null; } catch (err) { return err.message; }
    }""")
    assert "cross-origin isolated" in error


def test_the_page_switches_engines(page: Page) -> None:
    out = page.evaluate("""async () => {
        const { load } = await import("/amphibia/amphibia.js");
        const app = await load("/apps/chat/", { engine: "remote" });
        const seen = [app.engine];
        seen.push((await app.useEngine("local")).engine);   // loads the model now
        seen.push((await app.useEngine("remote")).engine);  // stops it
        app.close();
        return seen;
    }""")
    assert out == ["remote", "local", "remote"]


def test_an_app_streams_its_answer_in_the_page(page: Page, pool: Pool) -> None:
    """`app.fetch()` gives a Response whose body is a ReadableStream: the chat example's server-sent
    events arrive piece by piece, over the bridge and with the local engine alike."""
    payload = {"messages": FRANCE, "temperature": 0, "max_tokens": 32, "stream": True}
    out = page.evaluate("""async (body) => {
        const { load } = await import("/amphibia/amphibia.js");
        const results = [];
        for (const engine of ["remote", "local"]) {
            const app = await load("/apps/chat/", { engine });
            if (engine === "local") await app.localReady;
            const res = await app.fetch(new Request(location.origin + "/", { method: "POST", body,
                headers: { "content-type": "application/json" } }));
            const reader = res.body.getReader();
            const decoder = new TextDecoder();
            let text = "", reads = 0;
            for (;;) {
                const { value, done } = await reader.read();
                if (done) break;
                reads += 1;
                text += decoder.decode(value, { stream: true });
            }
            results.push({ engine: app.engine, type: res.headers.get("content-type"), status: res.status, reads, text });
            app.close();
        }
        return results;
    }""", json.dumps(payload))
    for result in out:
        assert result["status"] == 200 and result["type"].startswith("text/event-stream"), result
        assert result["reads"] > 3, result  # pieces, not one whole body
        data = [json.loads(line[6:]) for line in result["text"].splitlines() if line.startswith("data: ")]
        tokens = "".join(d["token"] for d in data if "token" in d)
        assert data[-1]["reply"] == tokens.strip() and "Paris" in tokens, result
    assert [r["engine"] for r in out] == ["remote", "local"]
