"""A benchmark app: GET /?n=N makes N llm.infer calls and answers how many it made.

With the browser's echo engine (no model), the time per call is what an llm call costs in the
browser itself: the guest's import, JSPI suspension and resumption, the engine's JS.
"""
from amphibia_guest import App, Request, Response, llm

app = App()


@app.route("/", methods=["GET"])
def calls(req: Request) -> Response:
    n = int(req.args.get("n", "0"))
    chars = 0
    for i in range(n):
        chars += len(llm.infer(f"call {i}", max_tokens=1).text)
    return Response.json({"calls": n, "chars": chars})
