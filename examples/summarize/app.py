"""Summarize text: POST the text (plain or {"text": ..., "sentences": 2})."""
from amphibia_guest import App, HTTPError, Request, Response, llm

app = App()
MAX_INPUT_TOKENS = 1500


@app.route("/", methods=["POST"])
def summarize(req: Request) -> Response:
    if req.headers.get("content-type", "").startswith("application/json"):
        data = req.json()
        text, sentences = str(data.get("text", "")), int(data.get("sentences", 2))
    else:
        text, sentences = req.text(), 2
    text = text.strip()
    if not text:
        raise HTTPError(400, "nothing to summarize", "invalid_input")
    # Pre-processing inside the sandbox: keep the prompt within the model's context.
    tokens = llm.tokenize(text)
    truncated = len(tokens) > MAX_INPUT_TOKENS
    if truncated:
        text = llm.detokenize(tokens[:MAX_INPUT_TOKENS])
    out = llm.chat(
        [
            {"role": "system", "content": "You summarize texts accurately and briefly."},
            {"role": "user", "content": f"Summarize in {sentences} sentence(s):\n\n{text}"},
        ],
        max_tokens=40 * sentences + 20,
        temperature=0.0,
    )
    return Response.json({"summary": out.text.strip(), "input_tokens": len(tokens), "truncated": truncated})
