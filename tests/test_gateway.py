"""Real components through the real gateway over real HTTP, with the real model at temperature 0."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import httpx


def error_of(res: httpx.Response) -> dict:
    body = res.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    return body["error"]


def test_health_and_index(http: httpx.Client) -> None:
    health = http.get("/healthz").json()
    assert health["status"] == "ok"
    assert {"chat", "summarize", "embed-search", "tokens", "misbehave"} <= set(health["apps"])
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'data-app="chat"' in page.text and "embed-search" in page.text
    apps = {a["name"]: a for a in http.get("/api/apps").json()["apps"]}
    assert len(apps["chat"]["wasm_sha256"]) == 64


def test_chat_greedy_answer(http: httpx.Client) -> None:
    res = http.post("/apps/chat/", json={
        "messages": [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
                     {"role": "user", "content": "What is the capital of France? Answer in two sentences."}],
        "temperature": 0, "max_tokens": 32})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["reply"] == "The capital of France is Paris."
    assert body["usage"]["prompt_tokens"] == 42 and body["usage"]["generated_tokens"] == 7
    assert body["messages"][-1] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert res.headers["x-request-id"]


def test_chat_stream_matches_blocking(http: httpx.Client) -> None:
    payload = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 24}
    blocking = http.post("/apps/chat/", json=payload).json()
    streamed = http.post("/apps/chat/stream", json=payload).json()
    assert streamed["reply"] == blocking["reply"] and streamed["pieces"] > 3


def test_summarize(http: httpx.Client) -> None:
    text = ("The Amazon rainforest covers much of the Amazon basin of South America. It is the largest "
            "tropical rainforest in the world and is home to millions of species of insects, plants and birds.")
    res = http.post("/apps/summarize/", json={"text": text, "sentences": 1})
    assert res.status_code == 200, res.text
    body = res.json()
    assert "rainforest" in body["summary"].lower() and body["input_tokens"] > 20 and not body["truncated"]


def test_embed_search_ranks_the_matching_document_first(http: httpx.Client) -> None:
    res = http.post("/apps/embed-search/", json={"query": "What is the capital city of France?"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["dimensions"] == 384  # all-MiniLM-L6-v2, the default embedding model
    assert "Paris" in body["results"][0]["document"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    # The issue's query: mean-pooled SmolLM2 states ranked the Python document first.
    body = http.get("/apps/embed-search/", params={"q": "capital of France"}).json()
    assert body["results"][0]["document"].startswith("Paris is the capital of France")


def test_tokens_roundtrip_and_truncate(http: httpx.Client) -> None:
    body = http.post("/apps/tokens/", content="Hello world").json()
    assert body == {"count": 2, "tokens": [19556, 905], "pieces": ["Hello", " world"], "roundtrip": True}
    cut = http.post("/apps/tokens/truncate?max=3", content="Hello wonderful world of frogs").json()
    assert cut == {"text": "Hello wonderful world", "kept": 3, "total": 5}
    assert error_of(http.post("/apps/tokens/truncate?max=x", content="a"))["type"] == "invalid_input"


def test_unknown_app_route_and_method(http: httpx.Client) -> None:
    res = http.get("/apps/nope/")
    assert res.status_code == 404 and error_of(res)["type"] == "app_not_found"
    res = http.get("/apps/chat/missing")
    assert res.status_code == 404 and error_of(res)["type"] == "not_found"
    res = http.get("/apps/summarize/")
    assert res.status_code == 405 and error_of(res)["type"] == "method_not_allowed"
    assert http.get("/apps/chat", follow_redirects=False).status_code == 308
    assert error_of(http.get("/no/such/page"))["type"] == "not_found"


def test_malformed_and_oversized_bodies(http: httpx.Client) -> None:
    res = http.post("/apps/chat/", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400 and error_of(res)["type"] == "invalid_json"
    res = http.post("/apps/chat/", json={"messages": "hi"})
    assert res.status_code == 400 and error_of(res)["type"] == "invalid_input"
    res = http.post("/apps/chat/", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert res.status_code == 400 and "role" in error_of(res)["message"]
    res = http.post("/apps/tokens/", content=b"x" * (2 << 20))
    assert res.status_code == 413 and error_of(res)["type"] == "body_too_large"


def test_models_unknown_and_disallowed(http: httpx.Client) -> None:
    body = http.get("/apps/misbehave/model?name=gpt-17").json()
    assert body["error"] == "ModelNotSupported"
    # A model the registry serves but the app may not use: invalid-input that says how to allow it.
    body = http.get("/apps/misbehave/model?name=other").json()
    assert body["error"] == "InvalidInput" and "allowed_models" in body["message"]
    body = http.get("/apps/misbehave/model?name=smollm2").json()
    assert "text" in body  # the default model is always allowed


def test_invalid_params(http: httpx.Client) -> None:
    for query, word in [("max_tokens=-1", "max_tokens"), ("max_tokens=0", "max_tokens"), ("temperature=3.5", "temperature"),
                        ("top_p=0.0", "top_p"), ("top_k=-2", "top_k"), ("max_tokens=999999", "context")]:
        body = http.get(f"/apps/misbehave/params?{query}").json()
        assert body["error"] == "InvalidInput" and word in body["message"], (query, body)
    res = http.get("/apps/misbehave/uncaught-llm-error")
    assert res.status_code == 400 and error_of(res)["type"] == "invalid_input"


def test_guest_failures_are_contained(http: httpx.Client) -> None:
    cases = {
        "/loop": (504, "guest_timeout"),
        "/alloc": (500, "guest_out_of_memory"),
        "/raise": (500, "guest_exception"),
        "/trap": (500, "guest_trap"),
        "/exit": (500, "guest_trap"),
        "/bad-status": (500, "guest_trap"),
    }
    for path, (status, kind) in cases.items():
        res = http.get(f"/apps/misbehave{path}")
        assert res.status_code == status and error_of(res)["type"] == kind, (path, res.text)
    assert "boom from the guest" in http.get("/apps/misbehave/raise").json()["error"]["message"]
    assert "exited with status" in http.get("/apps/misbehave/exit").json()["error"]["message"]
    assert http.get("/apps/misbehave/ok").text == "ok"
    assert http.get("/healthz").json()["status"] == "ok"


def test_sandbox_sees_only_granted_files_and_no_network(http: httpx.Client) -> None:
    report = http.get("/apps/misbehave/files").json()
    assert report["read"] == "hello from a granted folder"
    assert report["write"].startswith("denied") and report["outside"].startswith("denied")
    assert report["socket"].startswith("denied"), report


def test_stream_errors_and_cancel(http: httpx.Client) -> None:
    body = http.get("/apps/misbehave/stream-error").json()
    assert body["error"] == "InvalidInput" and "context" in body["message"]
    body = http.get("/apps/misbehave/stream-early-stop").json()
    assert len(body["pieces"]) == 2
    # The cancelled generation freed the model: the next request is answered normally.
    assert http.post("/apps/tokens/", content="frog").json()["count"] == 2


def test_llm_wait_is_not_guest_cpu_time(http: httpx.Client) -> None:
    # misbehave has a 0.5 s CPU budget; 100+ generated tokens take well over a second here.
    res = http.get("/apps/misbehave/busy-llm")
    assert res.status_code == 200, res.text
    assert res.json()["tokens"] >= 100


def test_guest_output_is_logged_with_app_and_request_id(http: httpx.Client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="amphibia.guest"):
        res = http.get("/apps/misbehave/print", headers={"x-request-id": "req-print-1"})
    assert res.text == "printed"
    assert any("app=misbehave request=req-print-1 stdout: hello from the guest's stdout" in r.getMessage()
               for r in caplog.records)


def test_concurrent_apps_with_misbehaving_neighbours(http: httpx.Client, server: str) -> None:
    """Good requests to several apps succeed while others loop, trap and run out of memory."""
    calls = [
        ("GET", "/apps/misbehave/loop", None, 504),
        ("GET", "/apps/misbehave/trap", None, 500),
        ("GET", "/apps/misbehave/alloc", None, 500),
        ("POST", "/apps/tokens/", "Hello world", 200),
        ("POST", "/apps/chat/", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}', 200),
        ("GET", "/apps/embed-search/?q=frogs", None, 200),
        ("GET", "/apps/misbehave/ok", None, 200),
        ("POST", "/apps/tokens/truncate?max=1", "Hello world", 200),
    ]

    def call(spec: tuple) -> int:
        method, path, body, _ = spec
        with httpx.Client(base_url=server, timeout=120) as c:
            headers = {"content-type": "application/json"} if body and body.startswith("{") else {}
            return c.request(method, path, content=body, headers=headers).status_code

    with cf.ThreadPoolExecutor(len(calls)) as pool:
        statuses = list(pool.map(call, calls))
    assert statuses == [c[3] for c in calls]


def test_browser_build_is_served_with_caching_headers(http: httpx.Client) -> None:
    from conftest import EXAMPLES

    apps = {a["name"]: a for a in http.get("/api/apps").json()["apps"]}
    base = apps["chat"]["browser"]
    assert base and base.startswith("/apps/chat/browser/@")
    res = http.get(base + "app.js", headers={"accept-encoding": "gzip"})
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/javascript")
    assert res.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert res.headers["content-encoding"] == "gzip"
    assert res.content == (EXAMPLES / "chat" / ".amphibia" / "browser" / "app.js").read_bytes()
    br = http.get(base + "app.js", headers={"accept-encoding": "gzip, deflate, br, zstd"})
    assert br.headers["content-encoding"] == "br" and int(br.headers["content-length"]) < len(res.content) / 3
    assert br.content == res.content  # httpx decodes brotli with the brotli package
    plain = http.get(base + "app.js", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == res.content
    assert "export function instantiate" in res.text  # jco's async-instantiation build: no bare imports
    core = http.get(base + "app.core.wasm")
    assert core.headers["content-type"] == "application/wasm" and core.content[:4] == b"\0asm"
    assert http.get("/apps/chat/browser/app.sync.js").headers["cache-control"] == "no-cache"
    again = http.get(base + "app.js", headers={"if-none-match": res.headers["etag"]})
    assert again.status_code == 304
    for bad in ("/apps/chat/browser/@0000000000000000/app.js", base + "../app.wasm", base + "nope.js",
                "/apps/nope/browser/app.js"):
        assert http.get(bad).status_code == 404, bad


def test_models_are_served_to_pages_with_ranges_and_versions(http: httpx.Client) -> None:
    listing = http.get("/api/apps")
    assert listing.headers["access-control-allow-origin"] == "*"  # pages on other origins list apps too
    body = listing.json()
    chat = {a["name"]: a for a in body["apps"]}["chat"]
    assert chat["engine"] == "auto" and chat["page"] == "/apps/chat/browser/"
    model = chat["local_model"]
    assert model["name"] == "smollm2" and model["bytes"] > 90e6 and body["max_local_model_bytes"] == 512e6
    versioned = model["url"]
    assert versioned.startswith("/models/@") and versioned.endswith("/smollm2.gguf")
    part = http.get(versioned, headers={"range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"GGUF"
    assert part.headers["content-range"] == f"bytes 0-3/{model['bytes']}"
    assert part.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert part.headers["access-control-allow-origin"] == "*"  # pages on other origins run it too
    head = http.head("/models/smollm2.gguf")
    assert head.status_code == 200 and int(head.headers["content-length"]) == model["bytes"]
    assert head.headers["cache-control"] == "no-cache" and head.headers["accept-ranges"] == "bytes"
    assert http.get("/models/smollm2.gguf", headers={"if-none-match": head.headers["etag"]}).status_code == 304
    for gone in ("/models/@0000000000000000/smollm2.gguf", "/models/gpt-17.gguf", "/models/other.gguf"):
        res = http.get(gone, headers={"range": "bytes=0-3"})
        assert res.status_code == 404 and error_of(res)["type"] == "not_found", gone


def test_app_pages(http: httpx.Client) -> None:
    page = http.get("/apps/chat/browser/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    assert '<amphibia-app id="app" src="/apps/chat/" engine="auto">' in page.text and "Chat with history" in page.text
    assert 'engine="remote"' in http.get("/apps/chat/browser/?engine=remote").text
    assert 'engine="auto"' in http.get("/apps/chat/browser/?engine=<script>").text
    # A browser's visit to /apps/chat/ gets the same page; every other request reaches the app.
    visit = http.get("/apps/chat/", headers={"sec-fetch-mode": "navigate", "accept": "text/html,*/*;q=0.8"})
    assert visit.text == page.text
    assert http.get("/apps/chat/").headers["content-type"].startswith("application/json")
    assert http.get("/apps/nope/browser/").status_code == 404
    runtime = http.get("/amphibia/worker.js")
    assert runtime.headers["cross-origin-embedder-policy"] == "require-corp"  # a Worker of an isolated page
    assert runtime.headers["access-control-allow-origin"] == "*"
    assert http.get("/amphibia/wllama/wasm/wllama.wasm").content[:4] == b"\0asm"


def test_open_apis_and_bridge_without_a_pool(server: str, http: httpx.Client) -> None:
    """The OpenAI and Spin APIs and the browser bridge go through the inference service, so they work
    with any engine: here the in-process one, with no broker and no worker."""
    import asyncio
    import json

    import websockets

    france = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
              {"role": "user", "content": "What is the capital of France? Answer in two sentences."}]
    assert http.get("/healthz").json()["workers"] is None  # no pool here
    body = {"model": "smollm2", "messages": france, "temperature": 0, "max_tokens": 32}
    out = http.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"]["content"] == "The capital of France is Paris."
    events = [line[6:] for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "The capital of France is Paris."
    emb = http.post("/v1/embeddings", json={"model": "minilm", "input": ["frogs", "toads"]}).json()
    assert len(emb["data"]) == 2 and len(emb["data"][0]["embedding"]) == 384
    spin = http.post("/infer", json={"model": "smollm2", "prompt": "The capital of France is",
                                     "options": {"maxTokens": 4, "temperature": 0}}).json()
    assert spin["usage"]["generatedTokenCount"] >= 1 and "Paris" in spin["text"]
    # Text that is not valid UTF-8 never reaches an engine.
    res = http.post("/v1/embeddings", content=b'{"model": "minilm", "input": "\\ud800"}')
    assert res.status_code == 400 and "UTF-8" in error_of(res)["message"]

    token = http.get("/bridge/token", params={"app": "chat"}).json()["token"]

    async def page() -> list[dict]:
        url = server.replace("http://", "ws://") + f"/bridge?token={token}"
        async with websockets.connect(url, origin=server) as ws:
            await ws.send(json.dumps({"type": "assign", "id": "p1", "model": "", "messages": france[1:],
                                      "params": {"temperature": 0.0, "max_tokens": 32}}))
            got = []
            while not got or got[-1]["type"] not in ("done", "failed"):
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            # A page that cancels hears its request end, with what it used.
            await ws.send(json.dumps({"type": "assign", "id": "p2", "model": "", "prompt": "Count from one to one hundred:",
                                      "params": {"temperature": 0.0, "max_tokens": 300}}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "token"
            await ws.send(json.dumps({"type": "cancel", "id": "p2"}))
            end = json.loads(await asyncio.wait_for(ws.recv(), 60))
            while end["type"] == "token":
                end = json.loads(await asyncio.wait_for(ws.recv(), 60))
            return got + [end]

    *got, cancelled = asyncio.run(page())
    assert got[-1]["type"] == "done" and got[-1]["generated_tokens"] == 7
    assert "".join(m["text"] for m in got if m["type"] == "token") == "The capital of France is Paris."
    assert cancelled["type"] == "done" and cancelled["finish_reason"] == "cancelled"
    assert 1 <= cancelled["generated_tokens"] < 300


def test_every_response_carries_its_request_id(http: httpx.Client) -> None:
    for path in ("/healthz", "/v1/models", "/apps/tokens/", "/no/such/page", "/models/nope.gguf"):
        assert len(http.get(path).headers["x-request-id"]) >= 8, path
    res = http.get("/apps/misbehave/raise", headers={"x-request-id": "trace-42"})
    assert res.headers["x-request-id"] == "trace-42" and res.status_code == 500
    assert http.get("/healthz", headers={"x-request-id": "x" * 100}).headers["x-request-id"] != "x" * 100


def test_one_client_cannot_hold_every_socket(config, engine) -> None:
    """`[server] max_sockets_per_ip`: a client over it is refused, and served again once it lets go."""
    import asyncio
    from dataclasses import replace

    import websockets

    from amphibia.http.app import create_app
    from amphibia.loopback import serve_in_thread

    capped = replace(config, server=replace(config.server, max_sockets_per_ip=2))
    served = serve_in_thread(create_app(capped, engine=engine, warm_model=False))
    try:
        token = httpx.get(f"{served.url}/bridge/token", params={"app": "chat"}).json()["token"]
        url = served.url.replace("http://", "ws://") + f"/bridge?token={token}"
        ping = '{"type": "call", "id": "t", "model": "smollm2", "method": "tokenize", "args": {"text": "hi"}}'

        async def answered(ws) -> bool:
            await ws.send(ping)
            return '"result"' in await asyncio.wait_for(ws.recv(), 30)

        async def clients() -> tuple[bool, int | None, bool]:
            async with websockets.connect(url, origin=served.url) as a, websockets.connect(url, origin=served.url) as b:
                both = await answered(a) and await answered(b)
                try:
                    async with websockets.connect(url, origin=served.url) as c:
                        await c.recv()
                    code = None
                except websockets.ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
            async with websockets.connect(url, origin=served.url) as d:  # the first two are closed now
                return both, code, await answered(d)

        both, code, later = asyncio.run(clients())
        assert both and code == 4429 and later
    finally:
        served.stop()


def test_guests_in_flight_are_bounded_by_the_memory_budget(config, engine) -> None:
    """`[server] guest_memory_mb` / 8 MB guests run at once (here 16 MB: 2); with no room to wait, the
    next request is refused at once with 503 `busy`, saying which setting limits it."""
    import concurrent.futures as futures
    from dataclasses import replace

    from amphibia.http.app import create_app
    from amphibia.loopback import serve_in_thread

    small = replace(config, server=replace(config.server, guest_threads=0, guest_memory_mb=16, queue_limit=0))
    served = serve_in_thread(create_app(small, engine=engine, warm_model=False))
    try:
        with futures.ThreadPoolExecutor(2) as pool:
            sleeping = [pool.submit(httpx.get, f"{served.url}/apps/misbehave/sleep?s=2", timeout=30) for _ in range(2)]
            time.sleep(0.5)
            res = httpx.get(f"{served.url}/apps/tokens/", timeout=30)
            assert res.status_code == 503 and error_of(res)["type"] == "busy"
            assert "guest_memory_mb" in error_of(res)["message"]
            # (The sleep counts against misbehave's 0.5 s CPU budget once it returns: 504, but answered.)
            assert all(f.result().status_code in (200, 504) for f in sleeping)
        assert httpx.get(f"{served.url}/apps/tokens/", timeout=30).status_code != 503
    finally:
        served.stop()
