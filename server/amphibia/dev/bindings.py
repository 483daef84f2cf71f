"""The WIT world's Python bindings, as componentize-py generates them, for the page's Pyodide.

Inside a component these modules (`wit_world...`, `componentize_py_types`) are generated and backed by
the component's imports. In Pyodide the same generated types are used, and the page's host module
(`browser/src/pyodide/amphibia_pyodide.py`) puts the engines behind their functions, so the SDK sees
exactly the classes it sees in a build: the WIT world stays the one contract.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..build import WORLD, toolchain_hash
from ..contract import WIT_DIR
from ..errors import BuildError

KEEP = ("wit_world/", "componentize_py_types.py")  # the async-support helpers are not used by the SDK


@functools.lru_cache(maxsize=4)
def _generate(key: str) -> dict[str, str]:
    tool = Path(sys.executable).parent / "componentize-py"
    cmd = [str(tool) if tool.exists() else (shutil.which("componentize-py") or "componentize-py"),
           "-d", str(WIT_DIR), "-w", WORLD, "bindings"]
    with tempfile.TemporaryDirectory(prefix="amphibia-bindings-") as tmp:
        proc = subprocess.run([*cmd, tmp], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise BuildError(f"componentize-py bindings failed:\n{proc.stderr.strip()[-2000:]}")
        out = {}
        for path in sorted(Path(tmp).rglob("*.py")):
            rel = path.relative_to(tmp).as_posix()
            if rel.startswith(KEEP):
                out[rel] = path.read_text()
        return out


def bindings() -> dict[str, str]:
    """{relative path: source} of the world's bindings; generated once per toolchain (about 30 ms)."""
    return _generate(toolchain_hash())
