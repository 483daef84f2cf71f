"""The guest SDK's routing and responses, run as plain Python (no component needed for these)."""
from __future__ import annotations

import json

import pytest

from amphibia_guest import App, HTTPError, Request, Response, llm
from amphibia_guest.errors import Overloaded, RuntimeFailure


def make_app() -> App:
    app = App()

    @app.route("/", methods=["GET", "POST"])
    def index(req: Request) -> Response:
        return Response.json({"method": req.method, "args": req.args})

    @app.get("/users/{uid}")
    def user(req: Request) -> dict:
        return {"uid": req.params["uid"]}

    @app.post("/json")
    def body(req: Request) -> Response:
        return Response.json(req.json())

    @app.get("/fail")
    def fail(req: Request) -> Response:
        raise RuntimeError("kaput")

    @app.get("/teapot")
    def teapot(req: Request) -> Response:
        raise HTTPError(418, "short and stout", "teapot")

    @app.get("/busy")
    def busy(req: Request) -> Response:
        raise Overloaded(2500)

    return app


def call(app: App, method: str, path: str, body: bytes = b"", query: str = "") -> tuple[int, dict, dict]:
    res = app.dispatch(Request(method, path, query, {}, body))
    return res.status, dict(res.headers), json.loads(res.body)


def test_routing_params_and_query() -> None:
    app = make_app()
    assert call(app, "GET", "/", query="a=1&b=2") == (200, {"content-type": "application/json"},
                                                      {"method": "GET", "args": {"a": "1", "b": "2"}})
    assert call(app, "GET", "/users/42")[2] == {"uid": "42"}
    assert call(app, "HEAD", "/users/42")[0] == 200


def test_errors_are_json() -> None:
    app = make_app()
    status, headers, body = call(app, "GET", "/missing")
    assert status == 404 and body["error"]["type"] == "not_found"
    status, headers, body = call(app, "DELETE", "/users/1")
    assert status == 405 and headers["allow"] == "GET"
    status, _, body = call(app, "POST", "/json", b"{oops")
    assert status == 400 and body["error"]["type"] == "invalid_json"
    status, _, body = call(app, "GET", "/fail")
    assert status == 500 and body["error"] == {"type": "guest_exception", "message": "RuntimeError: kaput"}
    assert call(app, "GET", "/teapot")[0] == 418
    status, headers, body = call(app, "GET", "/busy")
    assert status == 429 and headers["retry-after"] == "2" and body["error"]["type"] == "overloaded"


def test_llm_outside_a_host_says_so() -> None:
    with pytest.raises(RuntimeFailure, match="not running inside an Amphibia host"):
        llm.infer("hi")


def test_unknown_llm_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown llm parameter"):
        llm._params({"max_token": 3})


def test_route_must_start_with_slash() -> None:
    with pytest.raises(ValueError):
        App().route("nope")
