"""Apps that stream their answers: server-sent events and chunked bodies from a server-side app,
through the gateway and the real pool, and the same app streaming in a real Chromium page."""
from __future__ import annotations

import json
import time

import httpx

from conftest import Pool

ASK = {"messages": [{"role": "user", "content": "Write a short story about a frog who learns to sing."}],
       "max_tokens": 48, "temperature": 0}


def events(res: httpx.Response) -> list[tuple[float, str, dict]]:
    """(arrival time, event name, data) for each server-sent event, as read off the wire."""
    out, name, data, buffer = [], "message", [], ""
    for chunk in res.iter_text():
        now = time.perf_counter()
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                out.append((now, name, json.loads("\n".join(data))))
                name, data = "message", []
    return out


def test_chat_streams_tokens_as_they_come_and_says_the_same(pool: Pool) -> None:
    whole = httpx.post(f"{pool.url}/apps/chat/", json=ASK, timeout=120).json()
    with httpx.stream("POST", f"{pool.url}/apps/chat/", json={**ASK, "stream": True}, timeout=120) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        got = events(res)
    tokens = [e for e in got if "token" in e[2]]
    done = [e for e in got if e[1] == "done"]
    assert len(tokens) > 5 and len(done) == 1
    # On the wire: the first token arrived before the last one was generated (several arrivals).
    assert tokens[0][0] < done[0][0] and len({round(t, 3) for t, _, _ in tokens}) > 3
    assert "".join(e[2]["token"] for e in tokens).strip() == whole["reply"] == done[0][2]["reply"]
    # `Accept: text/event-stream` asks for the same stream.
    with httpx.stream("POST", f"{pool.url}/apps/chat/", content=ASK["messages"][0]["content"],
                      headers={"accept": "text/event-stream"}, timeout=120) as res:
        assert [e[1] for e in events(res)][-1] == "done"


def test_a_client_that_leaves_mid_stream_frees_its_slot(pool: Pool) -> None:
    long = {"messages": [{"role": "user", "content": "Write a very long story about a frog who travels the world."}],
            "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{pool.url}/apps/chat/", json=long, timeout=120) as res:
        lines = res.iter_lines()  # kept open: leaving this iterator would close the connection
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data: ")
        status = pool.status()
        assert any(j["app"] == "chat" for w in status["workers"] for j in w["running"]), status["timeline"][-4:]
    # Closed: the guest's writes fail, its llm stream is dropped, the slot is free within moments.
    pool.wait_for(lambda s: not any(j["app"] == "chat" for w in s["workers"] for j in w["running"]),
                  "the chat slot to be freed", timeout=30)


def test_a_guest_that_fails_mid_stream_ends_it_cleanly(pool: Pool) -> None:
    with httpx.stream("GET", f"{pool.url}/apps/misbehave/stream-raise", timeout=60) as res:
        got = events(res)
    assert [e[1] for e in got][-1] == "error" and len(got) >= 3
    assert got[-1][2]["error"] == {"type": "guest_exception", "message": "ValueError: broke mid-stream"}
    res = httpx.get(f"{pool.url}/apps/misbehave/stream-cut", timeout=60)
    assert res.status_code == 200 and res.text == "first piece\n"  # the body ends where it broke
    assert httpx.get(f"{pool.url}/apps/misbehave/ok", timeout=60).text == "ok"  # and the app serves on
