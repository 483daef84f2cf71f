"""What the page's Pyodide needs to run an app from its source: the app's files, the guest SDK and the
world's bindings. Sent as one JSON document: a few hundred KB, fetched at page load and again after
each change on disk (`version` says whether anything changed)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..build import SDK_DIR, build_inputs, source_files
from ..config import AppSpec
from ..errors import BadRequest
from .bindings import bindings
from .compat import notes

MAX_FILE_BYTES = 1 << 20  # a file larger than this is not sent to the page (nor saved from it)
MAX_FILES = 500


def app_files(folder: Path) -> tuple[dict[str, str], list[str]]:
    """{relative path: text} of the app's files as a build sees them, and the files left out (not
    UTF-8 text, or too large). `app.toml` configures the serving, not the app: it is not sent."""
    files: dict[str, str] = {}
    skipped: list[str] = []
    for path in build_inputs(folder)[:MAX_FILES]:
        rel = path.relative_to(folder).as_posix()
        try:
            data = path.read_bytes()
            if len(data) > MAX_FILE_BYTES:
                raise ValueError("too large")
            files[rel] = data.decode("utf-8")
        except (OSError, ValueError):
            skipped.append(rel)
    return files, skipped


def version_of(files: dict[str, str]) -> str:
    """A digest of the files' contents: equal versions mean the page already runs these files."""
    h = hashlib.sha256()
    for rel, text in sorted(files.items()):
        h.update(f"{rel}\0{len(text)}\0".encode())
        h.update(text.encode())
    return h.hexdigest()[:16]


def sdk_files() -> dict[str, str]:
    return {f"{SDK_DIR.name}/{p.relative_to(SDK_DIR).as_posix()}": p.read_text()
            for p in source_files(SDK_DIR) if p.suffix == ".py"}


def bundle(spec: AppSpec) -> dict:
    folder = spec.path.resolve()
    if not (folder / "app.py").is_file():
        raise BadRequest(f"app {spec.name!r} has no app.py in {folder}")
    files, skipped = app_files(folder)
    found, stdlib = notes(folder, files)
    if spec.files:
        found.append({"module": "", "file": "app.toml", "line": 0, "lacking": "pyodide",
                      "message": f"the folders in `files` ({', '.join(spec.files)}) are mounted for the component "
                                 "only: the page copy does not have them"})
    return {
        "name": spec.name,
        "version": version_of(files),
        "files": files,
        "skipped": skipped,
        "notes": found,
        "stdlib": stdlib,
        "sdk": sdk_files(),
        "bindings": bindings(),
        "editable": sorted(rel for rel in files if rel.endswith(".py")),
    }
