"""`/models/{name}.gguf`: model weights for pages that run the model on the visitor's device.

Browsers fetch a GGUF once and keep it (wllama stores it in OPFS, keyed by URL), so pages ask
for the versioned URL `/models/@{version}/{name}.gguf`, where the version changes whenever the
file does, and that URL is cached for a year; the plain URL is revalidated by ETag. Both support
HTTP Range requests (Starlette's FileResponse), for resumable and parallel downloads.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .config import Config, ConfigError, ModelSpec


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
    config: Config = request.app.state.gateway.config
    name, version = request.path_params["name"], request.path_params.get("version")
    spec = config.models.get(name)
    if spec is None or not spec.browser:
        return JSONResponse({"error": {"type": "not_found", "message": f"model {name!r} is not served to browsers"}},
                            404)
    path = spec.gguf_path()
    current = model_version(path)
    if version is not None and version != current:
        return JSONResponse({"error": {"type": "not_found",
                                       "message": f"version {version} of {name!r} is gone (current: {current})"}}, 404)
    etag = f'"{current}"'
    headers = {
        "etag": etag,
        "cache-control": "public, max-age=31536000, immutable" if version else "no-cache",
        # (CORS and CORP come from browser_files.PublicAssets, as for every public asset.)
        "access-control-expose-headers": "content-length, content-range, etag, accept-ranges",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="application/octet-stream", headers=headers)
