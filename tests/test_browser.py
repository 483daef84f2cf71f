"""The same components in a real headless Chromium (Debian's, driven by Playwright, no browser
download): JSPI, a module Worker, and llm calls over the /bridge into the real pool."""
from __future__ import annotations

import json
import re
import shutil
from typing import Iterator

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from conftest import FRANCE, Pool

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running until it exits
def page(pool: Pool) -> Iterator[Page]:
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{pool.url}/amphibia/")
        yield page
        browser.close()


def run(page: Page, app: str, requests: list[dict]) -> list[dict]:
    """Load `app` in the page and send it `requests`; each result is {status, body} or {error}."""
    return page.evaluate("""async ([app, requests]) => {
        const { load } = await import("/amphibia/amphibia.js");
        const loaded = await load(`/apps/${app}/`);
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
    }""", [app, requests])


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
        document.body.innerHTML = '<amphibia-app id="chat" src="/apps/chat/"></amphibia-app>';
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
