"""Tokenization inside the sandbox: inspect, count and truncate text by tokens.

POST text to / for the tokens; POST text to /truncate?max=N to cut it to N tokens.
"""
from amphibia_guest import App, HTTPError, Request, Response, llm

app = App()


@app.route("/", methods=["POST"])
def tokens(req: Request) -> Response:
    text = req.text()
    ids = llm.tokenize(text)
    return Response.json({
        "count": len(ids),
        "tokens": ids,
        "pieces": [llm.detokenize([t]) for t in ids[:256]],
        "roundtrip": llm.detokenize(ids) == text,
    })


@app.route("/truncate", methods=["POST"])
def truncate(req: Request) -> Response:
    try:
        limit = int(req.args.get("max", "16"))
    except ValueError:
        raise HTTPError(400, "max must be an integer", "invalid_input") from None
    if limit < 0:
        raise HTTPError(400, "max must be >= 0", "invalid_input")
    ids = llm.tokenize(req.text())
    return Response.json({"text": llm.detokenize(ids[:limit]), "kept": min(limit, len(ids)), "total": len(ids)})

