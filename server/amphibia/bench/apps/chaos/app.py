"""The chaos benchmark's server-side guest.

POST / {"prompt", "max_tokens"}: a greedy completion (the text is compared with an undisturbed run).
GET /sleep: blocks in a host call far past its wall deadline. GET /spin: burns its CPU deadline.
"""
from amphibia_guest import App, Request, Response, llm

app = App()


@app.post("/")
def complete(req: Request) -> Response:
    data = req.json()
    out = llm.infer(data["prompt"], max_tokens=int(data.get("max_tokens", 24)), temperature=0)
    return Response.json({"text": out.text, "tokens": out.usage.generated_tokens})


@app.get("/sleep")
def nap(req: Request) -> Response:
    import time

    time.sleep(30)
    return Response.json({"slept": True})


@app.get("/spin")
def spin(req: Request) -> Response:
    n = 0
    while True:
        n += 1
