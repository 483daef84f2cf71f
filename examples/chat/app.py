"""Chat with history: POST {"messages": [{"role": "user", "content": "..."}], ...} or plain text."""
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
