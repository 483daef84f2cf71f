"""Saving a file from the dev page: only inside the app's folder, only its Python sources, atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from ..build import SKIP
from ..errors import BadRequest
from .bundle import MAX_FILE_BYTES


def target(folder: Path, rel: str) -> Path:
    """The file `rel` names inside `folder`, or BadRequest: a relative POSIX path to a `.py` file
    with no `..`, no hidden or build folders, that resolves (symlinks too) inside the folder."""
    pure = PurePosixPath(rel)
    if (not rel or pure.is_absolute() or "\\" in rel or "\0" in rel or pure.suffix != ".py"
            or any(part in ("..", "") or part.startswith(".") or part in SKIP for part in pure.parts)):
        raise BadRequest(f"cannot save {rel!r}: only .py files inside the app's folder can be saved")
    root = folder.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise BadRequest(f"cannot save {rel!r}: it resolves outside the app's folder")
    return path


def save(folder: Path, rel: str, data: bytes) -> Path:
    """Write `data` (UTF-8 text) to `rel` in `folder` through a temporary file and a rename, so that
    the watcher and the build never read half a file."""
    if len(data) > MAX_FILE_BYTES:
        raise BadRequest(f"cannot save {rel!r}: {len(data)} bytes is over the {MAX_FILE_BYTES} byte limit")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"cannot save {rel!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    path = target(folder, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".amphibia-save-", suffix=".py")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
