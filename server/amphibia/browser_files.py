"""`/apps/{name}/browser/...`: the app's browser build (jco output), served for pages.

Only files listed in the app's build manifest are served, so no path outside the build can be
asked for. Under `@{version}/` (the first 16 hex digits of the component's sha256) a file is
immutable and cached for a year; without it, it is revalidated by ETag. Text and wasm are
compressed once per file and encoding (brotli where the browser takes it, else gzip) and kept in memory.
"""
from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import brotli

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".ts": "text/plain; charset=utf-8"}
# (file sha256, encoding) -> compressed body; content-addressed, so never stale.
_compressed: dict[tuple[str, str], bytes] = {}
ENCODERS = {
    # Quality 5 compresses the 11 MB core module in ~0.4 s and within a few % of gzip -9's time to
    # decode; quality 11 would take ~30 s per build.
    "br": lambda data: brotli.compress(data, quality=5),
    "gzip": lambda data: gzip.compress(data, compresslevel=6),
}


def _not_found(message: str) -> Response:
    return JSONResponse({"error": {"type": "not_found", "message": message}}, 404)


def version_of(manifest: dict) -> str:
    return manifest["wasm_sha256"][:16]


async def browser_file(request: Request) -> Response:
    gateway = request.app.state.gateway
    name, path = request.path_params["name"], request.path_params["path"]
    app = gateway.apps.get(name)
    if app is None:
        return _not_found(f"no app named {name!r}")
    files: dict[str, str] = app.manifest.get("browser") or {}
    if not files:
        return _not_found(f"app {name!r} has no browser build (jco is installed by `make`)")
    version = None
    if path.startswith("@"):
        version, _, path = path[1:].partition("/")
        if version != version_of(app.manifest):
            return _not_found(f"version {version} of {name!r} is not served (current: {version_of(app.manifest)})")
    sha = files.get(path)
    if sha is None:
        return _not_found(f"{path!r} is not part of {name!r}'s browser build")
    etag = f'"{sha[:32]}"'
    headers = {
        "etag": etag,
        "cache-control": "public, max-age=31536000, immutable" if version else "no-cache",
        "vary": "accept-encoding",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media_type = MEDIA_TYPES.get(Path(path).suffix, "application/octet-stream")
    file = app.spec.path / ".amphibia" / "browser" / path
    # Reading and compressing an 11 MB core module takes ~0.5 s: never on the event loop.
    accepted = {part.split(";")[0].strip() for part in request.headers.get("accept-encoding", "").split(",")}
    encoding = next((e for e in ENCODERS if e in accepted), None)
    if encoding:
        body = _compressed.get((sha, encoding))
        if body is None:
            compressed = await asyncio.to_thread(lambda: ENCODERS[encoding](file.read_bytes()))
            body = _compressed.setdefault((sha, encoding), compressed)
        headers["content-encoding"] = encoding
    else:
        body = await asyncio.to_thread(file.read_bytes)
    return Response(body, media_type=media_type, headers=headers)


PUBLIC_PREFIXES = ("/amphibia/", "/api/apps", "/models/")


class PublicAssets:
    """ASGI middleware: the in-page runtime, app builds, models and the app list may be loaded by pages on
    any origin (`examples/embed.html`), so they carry `Access-Control-Allow-Origin: *` and a
    cross-origin resource policy. They are public, credential-free files; what needs a guard (the
    bridge) checks origins itself."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(PUBLIC_PREFIXES) or "/browser/" in path):
            await self.app(scope, receive, send)
            return

        async def send_public(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"access-control-allow-origin", b"cross-origin-resource-policy")]
                headers += [(b"access-control-allow-origin", b"*"), (b"cross-origin-resource-policy", b"cross-origin")]
                if path.endswith(".js"):  # a Worker started by a cross-origin isolated page must opt in too
                    headers.append((b"cross-origin-embedder-policy", b"require-corp"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_public)
