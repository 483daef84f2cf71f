"""Files pages load: an app's browser build (`/apps/{name}/browser/...`), model weights for the
visitor's device (`/models/...`), and the CORS rules that let pages on any origin load them.

Browser builds: only files listed in the app's build manifest are served, so no path outside the build can be
asked for. Under `@{version}/` (the first 16 hex digits of the component's sha256) a file is
immutable and cached for a year; without it, it is revalidated by ETag. Text and wasm are
compressed once per file and encoding (brotli where the browser takes it, else gzip) and kept in memory.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
from pathlib import Path

import brotli
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ..config import Config, ConfigError, ModelSpec
from ..errors import NotFound
from .gateway import gateway_of, served_app

MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".ts": "text/plain; charset=utf-8"}
# (file sha256, encoding) -> compressed body; content-addressed, so never stale.
_compressed: dict[tuple[str, str], bytes] = {}
ENCODERS = {
    # Quality 5 compresses the 11 MB core module in ~0.4 s and within a few % of gzip -9's time to
    # decode; quality 11 would take ~30 s per build.
    "br": lambda data: brotli.compress(data, quality=5),
    "gzip": lambda data: gzip.compress(data, compresslevel=6),
}


def _validators(tag: str, versioned: bool) -> dict[str, str]:
    """A versioned URL never changes (cached for a year); a plain one is revalidated by its ETag."""
    return {"etag": f'"{tag}"', "cache-control": "public, max-age=31536000, immutable" if versioned else "no-cache"}


def _not_modified(request: Request, headers: dict[str, str]) -> bool:
    return headers["etag"] in request.headers.get("if-none-match", "")


def version_of(manifest: dict) -> str:
    return manifest["wasm_sha256"][:16]


async def browser_file(request: Request) -> Response:
    gateway = gateway_of(request)
    name, path = request.path_params["name"], request.path_params["path"]
    page = served_app(gateway, name).page
    files: dict[str, str] = page.manifest.get("browser") or {} if page is not None else {}
    if page is None or not files:
        raise NotFound(f"app {name!r} has no browser build (jco is installed by `make`)")
    version = None
    if path.startswith("@"):
        version, _, path = path[1:].partition("/")
        if version != version_of(page.manifest):
            raise NotFound(f"version {version} of {name!r} is not served (current: {version_of(page.manifest)})")
    sha = files.get(path)
    if sha is None:
        raise NotFound(f"{path!r} is not part of {name!r}'s browser build")
    headers = {**_validators(sha[:32], versioned=version is not None), "vary": "accept-encoding"}
    if _not_modified(request, headers):
        return Response(status_code=304, headers=headers)
    media_type = MEDIA_TYPES.get(Path(path).suffix, "application/octet-stream")
    file = page.build_dir / "browser" / path
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


# --- model weights ------------------------------------------------------------------------------------
# Browsers fetch a GGUF once and keep it (wllama stores it in OPFS, keyed by URL), so pages ask for the
# versioned URL `/models/@{version}/{name}.gguf`, where the version changes whenever the file does, and
# that URL is cached for a year; the plain URL is revalidated by ETag. Both support HTTP Range requests
# (Starlette's FileResponse), for resumable and parallel downloads.
def model_version(path: Path) -> str:
    """Changes when the file does; cheap (no hashing of 100 MB per start)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def browser_model(config: Config, name: str) -> dict | None:
    """What a page needs to decide about running model `name` locally, or None if it may not."""
    spec: ModelSpec | None = config.models.get(name)
    if spec is None or not spec.browser:
        return None
    try:
        path = spec.gguf_path()
    except ConfigError:
        return None
    return {"name": name, "url": f"/models/@{model_version(path)}/{name}.gguf", "bytes": path.stat().st_size,
            "n_ctx": spec.n_ctx}


async def model_file(request: Request) -> Response:
    config = gateway_of(request).config
    name, version = request.path_params["name"], request.path_params.get("version")
    spec = config.models.get(name)
    if spec is None or not spec.browser:
        raise NotFound(f"model {name!r} is not served to browsers")
    path = spec.gguf_path()
    current = model_version(path)
    if version is not None and version != current:
        raise NotFound(f"version {version} of {name!r} is gone (current: {current})")
    headers = {
        **_validators(current, versioned=version is not None),
        # (CORS and CORP come from PublicAssets, as for every public asset.)
        "access-control-expose-headers": "content-length, content-range, etag, accept-ranges",
    }
    if _not_modified(request, headers):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


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
