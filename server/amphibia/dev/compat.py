"""What an app imports that the page copy (Pyodide) or the compiled component cannot have.

Read from the app's source (no code runs): the page shows these notes beside the editor, and the
page's Pyodide adds the standard-library modules it finds missing at run time (its npm package holds
the core library only). Whether the component can import a standard-library module shows when it is
built (componentize-py imports the app then), or in the dev component's trial import.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Modules that exist only in the browser's Pyodide.
BROWSER_ONLY = {"js", "pyodide", "pyodide_js", "micropip", "_pyodide"}
# Modules both sandboxes have but cannot use: neither has sockets, processes or threads.
SANDBOXED = {
    "socket": "neither sandbox has sockets: reach models through `llm`, not the network",
    "ssl": "neither sandbox has sockets (so no TLS)",
    "http.client": "neither sandbox has sockets: `http.client` cannot connect",
    "urllib.request": "neither sandbox has sockets: `urllib.request` cannot fetch",
    "subprocess": "neither sandbox can start processes",
    "multiprocessing": "neither sandbox can start processes",
    "threading": "neither sandbox can start threads (importing works, `Thread.start` fails)",
    "concurrent.futures": "neither sandbox can start threads or processes",
}
SDK_MODULES = {"amphibia_guest", "wit_world", "componentize_py_types"}


@dataclass(frozen=True)
class Note:
    module: str
    file: str  # relative to the app folder
    line: int
    lacking: str  # "component", "pyodide" or "both"
    message: str


def local_modules(folder: Path, files: list[Path]) -> set[str]:
    """Top-level names importable from the app folder itself."""
    out = set()
    for path in files:
        rel = path.relative_to(folder)
        if path.suffix == ".py":
            out.add(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
    return out


def imports_of(source: str) -> list[tuple[str, int]]:
    """(dotted module, line) for each absolute import; a file that does not parse has none (the page
    shows its SyntaxError instead)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


def notes(folder: Path, files: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The notes for an app's files ({relative path: source}), and the standard-library modules it
    imports (the page checks those against its Pyodide)."""
    paths = [folder / rel for rel in files]
    local = local_modules(folder, paths)
    found: list[Note] = []
    stdlib: set[str] = set()
    for rel, source in sorted(files.items()):
        if not rel.endswith(".py"):
            continue
        for module, line in imports_of(source):
            top = module.split(".")[0]
            if top in local or top in SDK_MODULES:
                continue
            if top in BROWSER_ONLY:
                found.append(Note(module, rel, line, "component",
                                  f"`{module}` exists only in the page (Pyodide): the compiled component cannot import it"))
                continue
            if top not in sys.stdlib_module_names:
                found.append(Note(module, rel, line, "both",
                                  f"`{module}` is neither in the app folder nor in the standard library: the "
                                  "component and the page copy cannot import it (put pure-Python modules in the "
                                  "app folder; native extensions run in neither)"))
                continue
            stdlib.add(module)
            reason = SANDBOXED.get(module) or SANDBOXED.get(top)
            if reason:
                found.append(Note(module, rel, line, "both", reason))
    return [asdict(n) for n in found], sorted(stdlib)
