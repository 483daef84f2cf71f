"""The pool for real: worker processes over real WebSockets on loopback, the real model, real clients."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import signal
import time

import httpx
import openai
import pytest
import websockets

from amphibia.inference.pool import wire

from conftest import FRANCE, TOKEN, Pool


def client(pool: Pool, key: str = "key-chat") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pool.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_chat_stream_embeddings_models(pool: Pool, service, caller) -> None:
    c = client(pool)
    out = c.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=32)
    assert out.choices[0].message.content == "The capital of France is Paris."
    assert out.usage.prompt_tokens == 42 and out.usage.completion_tokens == 7
    # Greedy through the pool equals the in-process engine's text.
    generation = service.generation(caller, model="smollm2", messages=FRANCE[1:],
                                    params={"temperature": 0, "max_tokens": 40})
    local = service.stream(caller, generation).collect()
    pooled = c.chat.completions.create(model="smollm2", messages=FRANCE[1:], temperature=0, max_tokens=40)
    assert pooled.choices[0].message.content == local.text

    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=32, stream=True)
              if ch.choices]
    assert "".join(pieces) == "The capital of France is Paris." and len(pieces) > 3

    text = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert text.choices[0].text.strip() and text.usage.completion_tokens <= 4

    emb = c.embeddings.create(model="minilm", input=["frogs", "toads"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    assert [m.id for m in c.models.list().data] == ["smollm2", "minilm"]  # the app's model and embedding model


def test_spin_protocol(pool: Pool) -> None:
    headers = {"authorization": "Bearer key-chat"}
    res = httpx.post(f"{pool.url}/infer", headers=headers, timeout=60, json={
        "model": "smollm2", "prompt": "The capital of France is",
        "options": {"maxTokens": 6, "temperature": 0.0, "topK": 40, "topP": 0.9, "repeatPenalty": 1.1,
                    "repeatPenaltyLastNTokenCount": 64}})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["text"] and body["usage"]["generatedTokenCount"] <= 6 and body["usage"]["promptTokenCount"] == 5
    res = httpx.post(f"{pool.url}/embed", headers=headers, json={"model": "minilm", "input": ["a", "b", "c"]}, timeout=60)
    assert len(res.json()["embeddings"]) == 3 and res.json()["usage"]["promptTokenCount"] >= 3


def test_api_keys_and_models(pool: Pool) -> None:
    url = f"{pool.url}/v1/chat/completions"
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"authorization": "Bearer nope"}).status_code == 401
    res = httpx.post(url, json={**body, "model": "gpt-9"}, headers={"authorization": "Bearer key-chat"})
    assert res.status_code == 404 and res.json()["error"]["type"] == "model_not_supported"
    res = httpx.post(url, json={**body, "max_tokens": -3}, headers={"authorization": "Bearer key-chat"})
    assert res.status_code == 400 and "max_tokens" in res.json()["error"]["message"]
    res = httpx.post(url, content=b"{", headers={"authorization": "Bearer key-chat"})
    assert res.status_code == 400


def test_nothing_a_client_sends_takes_a_worker_down(pool: Pool) -> None:
    """What took the pool down before: a lone surrogate, a result over the frame limit, a request that
    becomes an oversized frame, a huge body. Each is answered clearly, and no worker leaves."""
    key = {"authorization": "Bearer key-chat", "content-type": "application/json"}
    url = f"{pool.url}/v1/embeddings"
    res = httpx.post(url, headers=key, content=b'{"model": "minilm", "input": ["\\ud800"]}', timeout=60)
    assert res.status_code == 400 and "UTF-8" in res.json()["error"]["message"]
    # 120 vectors are more than one frame holds: they travel in batches and come back whole.
    texts = [f"text number {i}" for i in range(120)]
    res = httpx.post(url, headers=key, json={"model": "minilm", "input": texts}, timeout=120)
    assert res.status_code == 200, res.text
    assert [d["index"] for d in res.json()["data"]] == list(range(120))
    single = httpx.post(url, headers=key, json={"model": "minilm", "input": texts[77]}, timeout=60).json()
    assert res.json()["data"][77]["embedding"] == single["data"][0]["embedding"]
    # 400 KB of text that would be a 1.2 MB frame to a worker: refused up front, as the client's error.
    prompt = json.dumps({"model": "smollm2", "prompt": "\u00e9" * 200_000}, ensure_ascii=False).encode()
    res = httpx.post(f"{pool.url}/v1/completions", headers=key, content=prompt, timeout=60)
    assert res.status_code == 400 and "bytes as sent" in res.json()["error"]["message"]
    res = httpx.post(f"{pool.url}/v1/chat/completions", headers=key, content=b"[" + b"1," * (3 << 20) + b"1]",
                     timeout=60)
    assert res.status_code == 413 and res.json()["error"]["type"] == "body_too_large"
    assert pool.worker_ids() == {"wA", "wB", "wE"}
    pool.wait_for(lambda s: s["queued"] == 0 and all(not w["running"] for w in s["workers"]), "an idle pool", 30)


def test_guest_deadlines_and_disconnects_end_their_llm_work(pool: Pool) -> None:
    """A guest's request ends at its wall-clock deadline even while it blocks in a host call, and its
    inference is cancelled then, as it is when its client leaves."""
    def running(app: str) -> int:
        return sum(1 for w in pool.status()["workers"] for j in w["running"] if j["app"] == app)


    started = time.perf_counter()
    res = httpx.get(f"{pool.url}/apps/limited/sleep?s=8", timeout=60)
    assert res.status_code == 504 and res.json()["error"]["type"] == "guest_timeout"
    assert time.perf_counter() - started < 7
    res = httpx.get(f"{pool.url}/apps/limited/long-llm", timeout=60)
    assert res.status_code == 504
    pool.wait_for(lambda s: running("limited") == 0, "the late guest's generation to be cancelled", timeout=5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{pool.url}/apps/misbehave/long-llm", timeout=1.5)
    pool.wait_for(lambda s: not any(j["app"] == "misbehave" for w in s["workers"] for j in w["running"]),
                  "the guest's generation to be cancelled", timeout=5)


def test_concurrent_apps_all_complete_with_correct_text(pool: Pool) -> None:
    def ask(key: str) -> str:
        out = client(pool, key).chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=32)
        return out.choices[0].message.content

    keys = ["key-chat", "key-tokens", "key-misbehave"] * 3
    with cf.ThreadPoolExecutor(len(keys)) as ex:
        answers = list(ex.map(ask, keys))
    assert answers == ["The capital of France is Paris."] * len(keys)
    # Apps served through the pool as well, alongside the API clients.
    res = httpx.post(f"{pool.url}/apps/chat/", json={"messages": FRANCE, "temperature": 0, "max_tokens": 32}, timeout=60)
    assert res.json()["reply"] == "The capital of France is Paris."
    service = pool.status()["service"]
    assert {"chat", "tokens", "misbehave"} <= set(service)


def test_cancel_frees_the_slot(pool: Pool) -> None:
    headers = {"authorization": "Bearer key-chat"}
    body = {"model": "smollm2", "prompt": "Count from one to one thousand:", "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{pool.url}/v1/completions", json=body, headers=headers, timeout=60) as res:
        lines = res.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"text"' in line:
                break
        assert pool.status()["workers"] and any(w["running"] for w in pool.status()["workers"])
    # The client hung up: its sequence is cancelled long before 400 tokens.
    pool.wait_for(lambda s: all(not w["running"] for w in s["workers"]), "the slot to be freed", timeout=10)
    assert pool.status()["timeline"][-1]["event"] == "cancel"
    # The same for a client that gives up on a non-streaming request.
    story = {"model": "smollm2", "max_tokens": 400, "temperature": 0,
             "messages": [{"role": "user", "content": "Write a very long story about a frog."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{pool.url}/v1/chat/completions", json=story, headers=headers, timeout=1.0)
    pool.wait_for(lambda s: all(not w["running"] for w in s["workers"]), "the slot to be freed", timeout=10)
    assert pool.status()["timeline"][-1]["event"] == "cancel"


def test_queue_limits_answer_429_fast(pool: Pool) -> None:
    headers = {"authorization": "Bearer key-limited"}
    body = {"model": "smollm2", "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a frog."}]}

    def post() -> httpx.Response:
        return httpx.post(f"{pool.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    with cf.ThreadPoolExecutor(2) as ex:
        running = [ex.submit(post) for _ in range(2)]
        pool.wait_for(lambda s: sum(1 for w in s["workers"] for j in w["running"] if j["app"] == "limited") == 2,
                      "two running requests", timeout=30)
        started = time.perf_counter()
        res = post()
        elapsed = time.perf_counter() - started
        assert res.status_code == 429 and res.json()["error"]["type"] == "overloaded"
        assert int(res.headers["retry-after"]) >= 1 and elapsed < 2
        for f in running:
            try:
                assert f.result().status_code == 200
            except httpx.TimeoutException:
                raise AssertionError(f"a running request never finished; pool: {pool.status()}") from None


def test_bad_workers_are_rejected_and_logged(pool: Pool) -> None:
    ws_url = f"ws://127.0.0.1:{pool.port}/pool"

    async def session(frames: list[str]) -> int | None:
        async with websockets.connect(ws_url, max_size=None) as ws:
            for frame in frames:
                await ws.send(frame)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    hello = lambda token: wire.Hello(worker_id="intruder", token=token, models=["smollm2"], slots=2).encode()  # noqa: E731
    assert asyncio.run(session([hello("wrong")])) == wire.CLOSE_BAD_TOKEN
    assert asyncio.run(session(['{"type": "assign"}'])) == wire.CLOSE_PROTOCOL
    assert asyncio.run(session([hello(TOKEN), "not json"])) == wire.CLOSE_PROTOCOL
    assert asyncio.run(session([hello(TOKEN), json.dumps({"type": "token", "id": "j1", "text": 5})])) == wire.CLOSE_PROTOCOL
    assert asyncio.run(session([hello(TOKEN), '{"type": "token", "id": "x", "text": "' + "a" * (2 << 20) + '"}'])) \
        == wire.CLOSE_TOO_BIG
    # Nobody else noticed.
    assert pool.worker_ids() == {"wA", "wB", "wE"}
    out = client(pool).chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=32)
    assert out.choices[0].message.content == "The capital of France is Paris."


def test_killed_worker_loses_no_request_and_a_restarted_one_rejoins(pool: Pool) -> None:
    prompts = [f"Write a long story about a frog named {name}." for name in ("Ann", "Bob", "Cid", "Dee")]

    def ask(prompt: str) -> tuple[str, int]:
        out = client(pool).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                   temperature=0, max_tokens=60)
        return out.choices[0].message.content, out.usage.completion_tokens

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        futures = [ex.submit(ask, p) for p in prompts]
        pool.wait_for(lambda s: any(j["generated"] >= 5 for w in s["workers"] if w["id"] == "wA"
                                             for j in w["running"]), "tokens flowing on wA", timeout=60)
        pool.workers["wA"].send_signal(signal.SIGKILL)
        pool.workers["wA"].wait(10)
        results = [f.result(timeout=120) for f in futures]
    for text, generated in results:
        assert len(text) > 40 and 0 < generated <= 60
    assert "wA" not in pool.worker_ids()
    assert any(e["event"] == "lost" for e in pool.status()["timeline"])

    pool.start_worker("wA")
    pool.wait_for(lambda s: {"wA", "wB"} <= {w["id"] for w in s["workers"]}, "wA to rejoin")


def test_pool_status_and_metrics(pool: Pool) -> None:
    status = pool.status()
    assert {w["id"] for w in status["workers"]} >= {"wB"}
    assert all(w["slots"] == 2 and w["device"].startswith("cpu") for w in status["workers"])
    metrics = httpx.get(f"{pool.url}/metrics").text
    for name in ("amphibia_queue_depth", "amphibia_running_sequences", "amphibia_time_to_first_token_seconds",
                 "amphibia_inter_token_seconds", "amphibia_generated_tokens_total", "amphibia_rejections_total"):
        assert name in metrics, name
    assert 'amphibia_rejections_total{app="limited",reason="overloaded"}' in metrics


# --- the browser bridge (server side) ----------------------------------------------------------------
def bridge_token(pool: Pool, app: str = "chat", origin: str | None = None) -> httpx.Response:
    headers = {"origin": origin} if origin else {}
    return httpx.get(f"{pool.url}/bridge/token", params={"app": app}, headers=headers)


async def bridge(pool: Pool, token: str, frames: list[str], origin: str | None = None,
                 until: str = "done") -> tuple[list[dict], int | None]:
    """Send frames; collect replies until a message of type `until` (or the close)."""
    url = f"ws://127.0.0.1:{pool.port}/bridge?token={token}"
    got: list[dict] = []
    try:
        async with websockets.connect(url, origin=origin or pool.url, max_size=None) as ws:
            for frame in frames:
                await ws.send(frame)
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                got.append(msg)
                if msg["type"] == until:
                    return got, None
    except websockets.ConnectionClosed as closed:
        return got, closed.rcvd.code if closed.rcvd else None
    return got, None


def test_bridge_generates_embeds_and_cancels(pool: Pool) -> None:
    res = bridge_token(pool)
    assert res.status_code == 200 and res.headers["cache-control"] == "no-store"
    token = res.json()["token"]
    assign = wire.Assign(id="p1", model="", params={"temperature": 0.0, "max_tokens": 32}, messages=FRANCE[1:])
    got, code = asyncio.run(bridge(pool, token, [assign.encode()]))
    assert code is None and got[0]["type"] == "token" and all(m["id"] == "p1" for m in got)
    assert "".join(m["text"] for m in got if m["type"] == "token") == "The capital of France is Paris."
    assert got[-1]["generated_tokens"] == 7
    # A page whose local engine failed after "The capital of" finishes the answer here: only the
    # rest comes back, and the usage counts the tokens the page says it already had.
    resumed = wire.Assign(id="p2", model="", params={"temperature": 0.0, "max_tokens": 32}, messages=FRANCE[1:],
                          resume_text="The capital of", resume_tokens=3)
    got, _ = asyncio.run(bridge(pool, token, [resumed.encode()]))
    assert "".join(m["text"] for m in got if m["type"] == "token") == " France is Paris."
    assert got[-1]["type"] == "done" and got[-1]["generated_tokens"] == 7

    call = wire.Call(id="e1", model="", method="embed", args={"texts": ["frog"]})  # the default embedding model
    got, _ = asyncio.run(bridge(pool, token, [call.encode()], until="result"))
    assert len(got[-1]["value"]["embeddings"][0]) == 384

    story = wire.Assign(id="s1", model="smollm2", params={"max_tokens": 300, "temperature": 0.0},
                        messages=[{"role": "user", "content": "Write a very long story about a frog."}])
    got, _ = asyncio.run(bridge(pool, token, [story.encode()], until="token"))
    pool.wait_for(lambda s: all(not w["running"] for w in s["workers"]), "the page's slot to be freed", timeout=10)

    bad = wire.Assign(id="b1", model="gpt-9", params={}, prompt="hi")
    got, _ = asyncio.run(bridge(pool, token, [bad.encode()], until="failed"))
    assert got[-1]["error_type"] == "model_not_supported"
    # A refusal carries the broker's retry hint to the page.
    twice = wire.Call(id="d", model="smollm2", method="tokenize", args={"text": "hi"}).encode()
    got, _ = asyncio.run(bridge(pool, token, [twice, twice], until="failed"))
    assert got[-1]["error_type"] == "overloaded" and got[-1]["retry_after_ms"] == 1000


def test_bridge_rejects_bad_tokens_origins_frames_and_floods(pool: Pool) -> None:
    from amphibia.http.bridge import CLOSE_BAD_TOKEN, CLOSE_FLOOD, CLOSE_ORIGIN, issue_token

    assert bridge_token(pool, "nope").status_code == 404
    assert bridge_token(pool, "limited").status_code == 403  # an app that did not opt in to the bridge
    assert bridge_token(pool, origin="https://evil.example").status_code == 403
    token = bridge_token(pool).json()["token"]
    secret = pool.app.state.gateway.bridge_secret
    ping = wire.Call(id="t", model="smollm2", method="tokenize", args={"text": "hi"}).encode()
    assert asyncio.run(bridge(pool, "", [ping]))[1] == CLOSE_BAD_TOKEN
    assert asyncio.run(bridge(pool, token[:-4] + "AAAA", [ping]))[1] == CLOSE_BAD_TOKEN
    expired = issue_token(secret, "chat", pool.url, ttl_s=-1)
    assert asyncio.run(bridge(pool, expired, [ping]))[1] == CLOSE_BAD_TOKEN
    assert asyncio.run(bridge(pool, token, [ping], origin="https://evil.example"))[1] == CLOSE_ORIGIN
    foreign = issue_token(secret, "chat", "https://evil.example")  # signed, but for an origin not allowed
    assert asyncio.run(bridge(pool, foreign, [ping], origin="https://evil.example"))[1] == CLOSE_ORIGIN
    assert asyncio.run(bridge(pool, token, ['{"type": "hello"}']))[1] == wire.CLOSE_PROTOCOL
    assert asyncio.run(bridge(pool, token, ["x" * (2 << 20)]))[1] == wire.CLOSE_TOO_BIG
    assert asyncio.run(bridge(pool, token, [ping] * 200, until="never"))[1] == CLOSE_FLOOD
    # The server and the pool are fine.
    got, code = asyncio.run(bridge(pool, token, [ping], until="result"))
    assert code is None and got[-1]["value"] == [6004]
    assert pool.worker_ids() == {"wA", "wB", "wE"}
