"""Chat with history: POST {"messages": [{"role": "user", "content": "..."}], ...} or plain text.

Streams its answer as server-sent events when asked (`Accept: text/event-stream`, or `"stream": true`):
`curl -N -H 'accept: text/event-stream' -d 'Hi' http://127.0.0.1:8000/apps/chat/`."""
from amphibia_guest import App, HTTPError, Request, Response, llm

app = App()
SYSTEM = "You are a concise, friendly assistant."


def conversation(req: Request) -> tuple[list[dict], dict]:
    if req.headers.get("content-type", "").startswith("application/json"):
        data = req.json()
        if not isinstance(data, dict):
            raise HTTPError(400, "expected a JSON object with 'messages'", "invalid_input")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "'messages' must be a non-empty list", "invalid_input")
        options = {k: data[k] for k in ("max_tokens", "temperature", "seed") if k in data}
    else:
        text = req.text().strip()
        if not text:
            raise HTTPError(400, "send a message as text or JSON", "invalid_input")
        messages, options = [{"role": "user", "content": text}], {}
    if messages[0].get("role") != "system":
        messages = [{"role": "system", "content": SYSTEM}, *messages]
    options.setdefault("max_tokens", 96)
    return messages, options


@app.route("/", methods=["GET", "POST"])
def chat(req: Request) -> Response:
    if req.method == "GET":
        return Response.json({"usage": "POST {'messages': [{'role': 'user', 'content': 'Hi'}]} or plain text"})
    messages, options = conversation(req)
    if _wants_stream(req):  # server-sent events: a `token` event per piece, then `done` with the reply
        return Response.sse(_events(messages, options))
    out = llm.chat(messages, **options)
    return Response.json({
        "reply": out.text.strip(),
        "messages": [*messages[1:], {"role": "assistant", "content": out.text.strip()}],
        "usage": {"prompt_tokens": out.usage.prompt_tokens, "generated_tokens": out.usage.generated_tokens},
    })


@app.post("/stream")
def stream(req: Request) -> Response:
    """The same answer built from streamed pieces (the pieces are counted to show streaming works)."""
    messages, options = conversation(req)
    pieces = list(llm.chat_stream(messages, **options))
    return Response.json({"reply": "".join(pieces).strip(), "pieces": len(pieces)})


def _wants_stream(req: Request) -> bool:
    if "text/event-stream" in req.headers.get("accept", ""):
        return True
    if req.headers.get("content-type", "").startswith("application/json"):
        data = req.json()
        return isinstance(data, dict) and data.get("stream") is True
    return False


def _events(messages: list[dict], options: dict):
    pieces = []
    for piece in llm.chat_stream(messages, **options):
        pieces.append(piece)
        yield {"token": piece}
    yield ("done", {"reply": "".join(pieces).strip()})
