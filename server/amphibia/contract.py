"""The WIT world's package and version, read from `guest-sdk/wit/world.wit`: the one contract.

Hosts name its interfaces with the version (wasmtime links `amphibia:ai/llm@0.2.0`), so a change to
the world changes them all here, from the file, not in several constants that could drift."""
from __future__ import annotations

import re
from pathlib import Path

import amphibia_guest

WIT_DIR = Path(amphibia_guest.__file__).resolve().parent.parent / "wit"
_PACKAGE = re.search(r"^\s*package\s+([\w-]+:[\w-]+)@([\w.\-+]+)\s*;", (WIT_DIR / "world.wit").read_text(), re.M)
if _PACKAGE is None:  # pragma: no cover - the repository's own file
    raise RuntimeError(f"no `package name@version;` line in {WIT_DIR / 'world.wit'}")
PACKAGE, VERSION = _PACKAGE.group(1), _PACKAGE.group(2)


def interface(name: str) -> str:
    """`llm` -> "amphibia:ai/llm@VERSION", as wasmtime and jco name the world's interfaces."""
    return f"{PACKAGE}/{name}@{VERSION}"
