"""Process-per-request baseline for `amphibia bench cold-start`: the chat example's handler as a plain
Python program (same SDK routing, same JSON work, the same echo in place of the model), run as a new
`python` process for every request, the way CGI-style or fork-per-request hosting would."""
import sys

from amphibia_guest import App, Request, Response

app = App()


@app.route("/", methods=["GET", "POST"])
def chat(req: Request) -> Response:
    data = req.json()
    messages = [{"role": "system", "content": "You are a concise, friendly assistant."}, *data["messages"]]
    reply = messages[-1]["content"]  # the echo model
    return Response.json({"reply": reply, "messages": [*messages[1:], {"role": "assistant", "content": reply}]})


if __name__ == "__main__":
    res = app.dispatch(Request("POST", "/", "", {"content-type": "application/json"}, sys.stdin.buffer.read()))
    sys.stdout.buffer.write(res.body)
