"""A test app that does every bad thing an app can do, one route each."""
import os

from amphibia_guest import App, InvalidInput, LLMError, ModelNotSupported, Request, Response, llm

app = App()


@app.get("/ok")
def ok(req: Request) -> Response:
    return Response.text("ok")


@app.get("/loop")
def loop(req: Request) -> Response:
    while True:
        pass


@app.get("/alloc")
def alloc(req: Request) -> Response:
    hoard = []
    while True:
        hoard.append(bytearray(8 << 20))


@app.get("/raise")
def boom(req: Request) -> Response:
    raise ValueError("boom from the guest")


@app.get("/trap")
def trap(req: Request) -> Response:
    os.abort()


@app.get("/exit")
def leave(req: Request) -> Response:
    os._exit(3)


@app.get("/bad-status")
def bad_status(req: Request) -> Response:
    return Response(status=42)


@app.get("/print")
def shout(req: Request) -> Response:
    print("hello from the guest's stdout")
    return Response.text("printed")


@app.get("/model")
def model(req: Request) -> Response:
    """Ask for a model by name; report which LLMError subclass came back."""
    try:
        out = llm.infer("Hello", model=req.args.get("name"), max_tokens=2, temperature=0)
        return Response.json({"text": out.text})
    except ModelNotSupported as exc:
        return Response.json({"error": "ModelNotSupported", "message": str(exc)})
    except InvalidInput as exc:
        return Response.json({"error": "InvalidInput", "message": str(exc)})


@app.get("/params")
def params(req: Request) -> Response:
    options = {k: (float(v) if "." in v else int(v)) for k, v in req.args.items()}
    try:
        out = llm.infer("Hello", **options)
        return Response.json({"text": out.text})
    except InvalidInput as exc:
        return Response.json({"error": "InvalidInput", "message": str(exc)})


@app.get("/uncaught-llm-error")
def uncaught(req: Request) -> Response:
    llm.infer("Hello", max_tokens=-5)
    return Response.text("unreachable")


@app.get("/stream-error")
def stream_error(req: Request) -> Response:
    """A prompt longer than the context fails inside the stream, on the first next()."""
    try:
        return Response.json({"pieces": list(llm.stream("frog " * 5000, max_tokens=4))})
    except LLMError as exc:
        return Response.json({"error": type(exc).__name__, "message": str(exc)})


@app.get("/stream-early-stop")
def stream_early_stop(req: Request) -> Response:
    """Stop reading after two pieces: dropping the stream cancels the generation."""
    pieces = []
    for piece in llm.stream("Count from one to fifty:", max_tokens=200, temperature=0):
        pieces.append(piece)
        if len(pieces) == 2:
            break
    return Response.json({"pieces": pieces})


@app.get("/busy-llm")
def busy_llm(req: Request) -> Response:
    """Slow LLM work with a tiny CPU budget: waiting on the host must not count as guest CPU."""
    out = llm.chat([{"role": "user", "content": "Write a long story about a frog."}], max_tokens=160, temperature=0)
    return Response.json({"tokens": out.usage.generated_tokens})


@app.get("/files")
def files(req: Request) -> Response:
    """Read the granted folder; try to write to it, to read outside it, and to open a socket."""
    report = {"read": open("/data/hello.txt").read().strip()}
    for name, attempt in [
        ("write", lambda: open("/data/new.txt", "w").write("x")),
        ("outside", lambda: open("/etc/passwd").read()),
        ("socket", lambda: __import__("socket").create_connection(("127.0.0.1", 80), timeout=1)),
    ]:
        try:
            attempt()
            report[name] = "allowed"
        except Exception as exc:
            report[name] = f"denied: {type(exc).__name__}"
    return Response.json(report)


@app.get("/sleep")
def nap(req: Request) -> Response:
    """Block in a host call (WASI sleep): the CPU deadline does not see it, the wall clock does."""
    import time

    time.sleep(float(req.args.get("s", "30")))
    return Response.json({"slept": True})


@app.get("/long-llm")
def long_llm(req: Request) -> Response:
    """A long generation, for deadlines and clients that leave."""
    try:
        out = llm.chat([{"role": "user", "content": "Write a very long story about a frog."}], max_tokens=400,
                       temperature=0)
    except LLMError as exc:
        return Response.json({"error": type(exc).__name__, "message": str(exc)}, status=504)
    return Response.json({"tokens": out.usage.generated_tokens})


_served = 0


@app.get("/count")
def count(req: Request) -> Response:
    """How many requests this instance served: always 1, since every request gets a fresh instance."""
    global _served
    _served += 1
    return Response.json({"served": _served})


@app.get("/stream-raise")
def stream_raise(req: Request) -> Response:
    """Server-sent events that fail midway: the stream must end with an `error` event, not hang."""
    def events():
        for i, piece in enumerate(llm.stream("Count: 1, 2, 3,", max_tokens=40, temperature=0)):
            yield {"token": piece}
            if i == 2:
                raise ValueError("broke mid-stream")
    return Response.sse(events())


@app.get("/stream-cut")
def stream_cut(req: Request) -> Response:
    """A plain streamed body that fails midway: the body ends where it broke."""
    def pieces():
        yield "first piece\n"
        raise ValueError("cut")
    return Response.stream(pieces())
