"""Apps in the kernel: built with the normal build, run in the normal sandbox, called like a web client.

`load(path)` builds (or reuses the cached build of) an app folder and returns a `NotebookApp`
whose `get`/`post`/`stream` run one request each in a fresh instance on the kernel's Runtime,
exactly as the gateway does, and return the app's HTTP answer as a `Response`.
"""
from __future__ import annotations

import json as jsonlib
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ..build import BuildResult, build, source_hash
from ..config import Limits, load_app
from ..errors import AmphibiaError, BuildError
from ..sandbox.runtime import HttpRequest
from .session import Session

_NO_BODY = object()


class NotebookBuildError(BuildError):
    """A BuildError that IPython shows as a short traceback into the app's source, not into ours.

    `cell_offset`: lines above the source in its cell (the `%%amphibia_app` line), so the cell's
    own line number can be named as well.
    """

    def __init__(self, error: BuildError, app: str, cell_offset: int | None = None) -> None:
        super().__init__(error.message, **error.extra)
        self.app, self.cell_offset = app, cell_offset
        self.file: str | None = error.extra.get("file")
        self.line: int | None = error.extra.get("line")

    def _render_traceback_(self) -> list[str]:
        """IPython calls this instead of formatting our frames (see InteractiveShell.showtraceback)."""
        head = f"BuildError: app {self.app!r} did not build"
        if self.line is not None and self.cell_offset is not None:
            head += f" (line {self.line + self.cell_offset} of the cell)"
        summary, _, rest = self.message.partition("\n")
        if self.file and summary.startswith(self.file):  # "FILE:LINE[:COL]: what" -> "what"
            summary = summary[len(self.file):].lstrip(":0123456789 ")
        lines = [head]
        details = rest.strip("\n").splitlines()
        if "Traceback (most recent call last):" in rest:  # the app's import failed during the build:
            lines += details  # its own traceback, already pointing into the app
            if details and details[-1].strip() == summary.strip():
                return lines
        else:
            if self.file and self.line is not None:
                lines.append(f'  File "{self.file}", line {self.line}')
                if not details:
                    try:
                        lines.append("    " + Path(self.file).read_text().splitlines()[self.line - 1].strip())
                    except (OSError, IndexError):
                        pass
            lines += details
        lines.append(summary)
        return lines

    def __str__(self) -> str:
        return "\n".join(self._render_traceback_())


@dataclass
class Response:
    """An app's HTTP answer, as a client sees it."""

    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str = ""
    elapsed_s: float = 0.0
    engine: str = ""  # what served the app's llm calls: "local" or the remote pool
    pieces: list[str] = field(default_factory=list)  # generated pieces seen by the host (stream())
    output: list[str] = field(default_factory=list)  # what the guest printed

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def raise_for_status(self) -> "Response":
        if not self.ok:
            raise AmphibiaError(f"the app answered {self.status}: {self.text[:500]}")
        return self

    def __repr__(self) -> str:
        kind = self.headers.get("content-type", "").split(";")[0] or "no content-type"
        preview = self.text if len(self.text) <= 400 else self.text[:400] + "..."
        return f"<Response {self.status} {kind}, {self.elapsed_s:.2f} s, llm: {self.engine}>\n{preview}"

    @classmethod
    def from_error(cls, exc: AmphibiaError, request_id: str) -> "Response":
        """What the gateway would answer for the same failure (a trap, a timeout, ...)."""
        headers = {"content-type": "application/json"}
        return cls(exc.status, headers, jsonlib.dumps(exc.to_json()).encode(), request_id)


class NotebookApp:
    """One built app, loaded in the kernel's Runtime."""

    def __init__(self, session: Session, spec: Any, result: BuildResult, component: Any) -> None:
        self.session, self.spec, self.build, self.component = session, spec, result, component

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def path(self) -> Path:
        return self.spec.path

    @property
    def manifest(self) -> dict:
        return self.build.manifest

    def __repr__(self) -> str:
        return (f"<NotebookApp {self.name!r} from {self.path} (component {self.build.sha256[:12]}, "
                f"{self.manifest.get('wasm_bytes', 0) / 1e6:.1f} MB, model {self.spec.model})>")

    # --- requests ---------------------------------------------------------------------------------
    def _http(self, method: str, path: str, json: Any, data: Any, params: dict | None,
              headers: dict | None) -> HttpRequest:
        path, _, query = path.partition("?")
        if params:
            query = "&".join(q for q in (query, urlencode(params, doseq=True)) if q)
        hdrs = {k.lower(): str(v) for k, v in (headers or {}).items()}
        body = b""
        if json is not _NO_BODY:
            body = jsonlib.dumps(json).encode()
            hdrs.setdefault("content-type", "application/json")
        elif data is not None:
            body = data.encode() if isinstance(data, str) else bytes(data)
            hdrs.setdefault("content-type", "text/plain; charset=utf-8" if isinstance(data, str)
                            else "application/octet-stream")
        if body:
            hdrs["content-length"] = str(len(body))
        return HttpRequest(method.upper(), "/" + path.lstrip("/"), query, list(hdrs.items()), body)

    def _run(self, http: HttpRequest, request_id: str) -> Response:
        """One request in a fresh instance (blocking), answered like the gateway would."""
        started = time.perf_counter()
        engine = self.session.engine.label
        with self.session.output.capture(request_id) as output:
            try:
                res = self.session.runtime.handle(self.spec, self.component, http, request_id)
                headers: dict[str, str] = {}
                for key, value in res.headers:
                    key = key.lower()
                    headers[key] = f"{headers[key]}, {value}" if key in headers else value
                response = Response(res.status, headers, res.body, request_id)
            except AmphibiaError as exc:
                response = Response.from_error(exc, request_id)
            response.output = list(output)
        response.elapsed_s, response.engine = time.perf_counter() - started, engine
        return response

    def request(self, method: str, path: str = "/", *, json: Any = _NO_BODY, data: str | bytes | None = None,
                params: dict | None = None, headers: dict | None = None) -> Response:
        response = self._run(self._http(method, path, json, data, params, headers), _request_id())
        _echo(response.output)
        return response

    def get(self, path: str = "/", *, params: dict | None = None, headers: dict | None = None) -> Response:
        return self.request("GET", path, params=params, headers=headers)

    def post(self, path: str = "/", *, json: Any = _NO_BODY, data: str | bytes | None = None,
             params: dict | None = None, headers: dict | None = None) -> Response:
        return self.request("POST", path, json=json, data=data, params=params, headers=headers)

    def stream(self, path: str = "/", *, json: Any = _NO_BODY, data: str | bytes | None = None,
               params: dict | None = None, headers: dict | None = None, method: str = "POST",
               display: bool = True, widget: bool | None = None) -> Response:
        """Like `post`, and shows the generated text live in the output cell while the app runs.

        The guest hands back its response only at the end, so the live text comes from the host:
        every piece the engine gives this request's `llm` calls, as it hands them to the guest.
        `widget`: use ipywidgets (default: where installed and a kernel runs).
        """
        from .streaming import TokenView

        request_id = _request_id()
        http = self._http(method, path, json, data, params, headers)
        pieces: queue.Queue[str] = queue.Queue()
        seen: list[str] = []
        view = TokenView(f"{self.name} {method.upper()} {http.path}", widget) if display else None
        with self.session.engine.tap(request_id, pieces.put):
            # A guest thread runs the request; this (the kernel's) thread draws the pieces.
            future = self.session.runtime.guest_threads.submit(self._run, http, request_id)
            while True:
                try:
                    piece = pieces.get(timeout=0.05)
                except queue.Empty:
                    if future.done():
                        break
                    continue
                seen.append(piece)
                if view is not None:
                    view.add(piece)
        response = future.result()
        response.pieces = seen
        if view is not None:
            view.finish(f"{response.status} in {response.elapsed_s:.2f} s, {len(seen)} pieces, llm: {response.engine}")
        _echo(response.output)
        return response


def _request_id() -> str:
    return "nb-" + uuid.uuid4().hex[:10]


def _echo(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stdout)


def load(session: Session, path: str | Path, name: str | None = None, *, model: str | None = None,
         limits: Limits | dict | None = None, weight: float | None = None,
         cell_offset: int | None = None) -> NotebookApp:
    """Build the app in `path` (a folder with app.py) unless its build is current, and load it."""
    overrides: dict[str, Any] = {k: v for k, v in (("name", name), ("model", model), ("weight", weight)) if v is not None}
    if limits is not None:
        overrides["limits"] = vars(limits) if isinstance(limits, Limits) else dict(limits)
    spec = load_app(Path(path), session.config.limits, overrides)
    if not _is_built(spec.path):
        print(f"building {spec.name} (componentize-py; about 15-20 s the first time) ...", flush=True)
    try:
        result = build(spec.path, name=spec.name)
    except BuildError as exc:
        raise NotebookBuildError(exc, spec.name, cell_offset) from None
    if result.rebuilt:
        print(f"built {spec.name} in {result.manifest.get('build_seconds', 0):.1f} s "
              f"({result.manifest['wasm_bytes'] / 1e6:.1f} MB component)", flush=True)
    app = NotebookApp(session, spec, result, session.runtime.load(result.wasm, result.sha256))
    session.apps[spec.name] = app
    return app


def _is_built(app_dir: Path) -> bool:
    manifest = app_dir / ".amphibia" / "manifest.json"
    try:
        return jsonlib.loads(manifest.read_text()).get("source_sha256") == source_hash(app_dir)
    except (OSError, ValueError):
        return False


def with_overrides(app: NotebookApp, name: str | None = None, **overrides: Any) -> Any:
    """`app`'s spec under another name and/or other limits or weight (a second tenant of one component)."""
    spec = app.spec
    if "limits" in overrides:  # a Limits replaces the app's; a dict changes only the keys it names
        limits = overrides.pop("limits")
        spec = replace(spec, limits=limits if isinstance(limits, Limits) else replace(spec.limits, **limits))
    return replace(spec, name=name or spec.name, **overrides)
