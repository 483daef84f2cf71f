"""`amphibia build`: an app folder -> `app.wasm` (componentize-py) + `manifest.json`.

Builds are keyed by a hash of everything that goes into them (app sources, guest SDK, WIT,
componentize-py version), so an unchanged app is never rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import amphibia_guest

from .contract import WIT_DIR, interface
from .errors import BuildError

WORLD = "app"
ENTRY_MODULE = "amphibia_guest.entry"
DEV_ENTRY_MODULE = "amphibia_guest.dev_entry"  # the dev component: the app is imported per instance
SDK_DIR = Path(amphibia_guest.__file__).resolve().parent
SKIP = {"__pycache__", ".amphibia", "build", ".git"}
SERVING_ONLY = {"app.toml"}  # configures how an app is served (name, limits, ...), not its component
BROWSER_DIR = SDK_DIR.parent.parent / "browser"  # package.json pins jco; `make` runs npm ci there
STREAM_IMPORTS = ("start", "write")
LLM_IMPORTS = ("infer", "chat", "infer-stream", "chat-stream", "generate-embeddings", "tokenize", "detokenize",
               "[method]token-stream.next")


@dataclass(frozen=True)
class BuildResult:
    wasm: Path
    manifest: dict
    rebuilt: bool

    @property
    def sha256(self) -> str:
        return self.manifest["wasm_sha256"]


def source_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in SKIP or part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in {".wasm", ".pyc"}:
            continue
        out.append(path)
    return out


def build_inputs(app_dir: Path) -> list[Path]:
    """The app's files a build reads: its sources without what only configures serving (`app.toml`)."""
    return [p for p in source_files(app_dir) if p.relative_to(app_dir).as_posix() not in SERVING_ONLY]


def toolchain_hash() -> str:
    """What every build depends on besides the app: componentize-py, the guest SDK and the WIT world.
    When it changes (an upgrade), every app builds again; gateways serve the old builds meanwhile."""
    h = hashlib.sha256()
    h.update(f"componentize-py {metadata.version('componentize-py')}\n".encode())
    for label, folder in (("sdk", SDK_DIR), ("wit", WIT_DIR)):
        for path in source_files(folder):
            h.update(f"{label}/{path.relative_to(folder).as_posix()}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def source_hash(app_dir: Path, toolchain: str | None = None) -> str:
    """Everything a build depends on; equal hashes mean equivalent components. (Not byte-identical ones:
    componentize-py 0.25 snapshots an interpreter that saw random seeds and clocks, so the same input
    built twice differs; hence one build per input, kept in the store.) Pass `toolchain_hash()` when
    hashing many apps."""
    h = hashlib.sha256()
    h.update(f"toolchain {toolchain or toolchain_hash()}\n".encode())
    for path in build_inputs(app_dir):
        h.update(f"app/{path.relative_to(app_dir).as_posix()}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def check_syntax(app_dir: Path) -> None:
    """Fail before the 15-second componentize step, with file:line like a traceback."""
    for path in source_files(app_dir):
        if path.suffix != ".py":
            continue
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            line = (exc.text or "").rstrip("\n")
            caret = " " * max((exc.offset or 1) - 1, 0) + "^"
            raise BuildError(
                f"{path}:{exc.lineno}:{exc.offset}: SyntaxError: {exc.msg}\n    {line.strip()}\n    {caret}",
                file=str(path), line=exc.lineno,
            ) from None


def _guest_traceback(stderr: str, app_dir: Path) -> BuildError:
    """Turn componentize-py's pre-initialisation failure into an error that points into the app.

    componentize-py runs the app's imports inside the sandbox at build time; guest paths are
    `/0/...` for the app folder, `/1/...` for the SDK and `/N/...` for other search paths.
    """
    body = stderr.split("AssertionError: ", 1)[-1].split("\n\nCaused by:", 1)[0]
    body = body.replace('File "/0/', f'File "{app_dir}/')
    frames = re.findall(r'File "([^"]+)", line (\d+)', body)
    app_frames = [(f, int(n)) for f, n in frames if f.startswith(str(app_dir))]
    last_line = next((ln for ln in reversed(body.strip().splitlines()) if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", ln)),
                     body.strip().splitlines()[-1] if body.strip() else "componentize-py failed")
    hint = ""
    if "ModuleNotFoundError" in body or "ImportError" in body:
        hint = ("\nhint: apps run in a WebAssembly sandbox (CPython 3.14 for WASI): pure-Python modules "
                "in the app folder work, native extensions (numpy, ...) and host-only modules do not.")
    where = f"{app_frames[-1][0]}:{app_frames[-1][1]}: " if app_frames else ""
    return BuildError(f"{where}{last_line}{hint}\n\n{body.strip()}",
                      **({"file": app_frames[-1][0], "line": app_frames[-1][1]} if app_frames else {}))


# The build tools (componentize-py, jco) running now, and for whom (`build_owner`, e.g. a gateway),
# so that one told to stop does not wait for its builds. Shared by every build thread: hence the lock.
build_owner: ContextVar[object | None] = ContextVar("amphibia_build_owner", default=None)
_running: dict[subprocess.Popen, object | None] = {}
_running_lock = threading.Lock()


BUILD_NICENESS = 10  # builds are background work: the answers being served (inference) come first


def background_priority() -> None:
    """Lower this thread's CPU priority (Linux: a thread's own nice value; the threads it starts,
    such as wasmtime's compile pool, inherit it). A gateway builds and compiles on such threads, so a
    build never slows the answers it serves meanwhile (on 2 cores, an edit's build halved the speed
    of the chat answer the dev loop waited for)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: builds only compete more
        pass


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    nice = shutil.which("nice")  # (not preexec_fn: that is unsafe in a process with threads)
    if nice:
        cmd = [nice, "-n", str(BUILD_NICENESS), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with _running_lock:
        _running[proc] = build_owner.get()
    try:
        out, err = proc.communicate()
    finally:
        with _running_lock:
            _running.pop(proc, None)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop_builds(owner: object) -> None:
    """Stop the build tools running for `owner` now: their builds fail, and it can exit at once."""
    with _running_lock:
        running = [proc for proc, whose in _running.items() if whose is owner]
    for proc in running:
        proc.kill()


def componentize(app_dir: Path | None, out: Path, entry: str = ENTRY_MODULE) -> None:
    """componentize-py runs the app's import-time code to pre-initialise it, with the search paths
    mounted in its sandbox: it gets copies of the app and the SDK, so that code can change nothing
    outside the build (not the app folder, not the shared guest-sdk/). With no `app_dir`, the app's
    place (/0) is an empty folder: the dev component."""
    with tempfile.TemporaryDirectory(prefix="amphibia-build-") as tmp:
        app_copy, sdk_copy = Path(tmp) / "app", Path(tmp) / "sdk"
        skip = shutil.ignore_patterns(".amphibia", "__pycache__", ".git", *SERVING_ONLY)
        if app_dir is None:
            app_copy.mkdir()
        else:
            shutil.copytree(app_dir, app_copy, ignore=skip, symlinks=True)
        shutil.copytree(SDK_DIR, sdk_copy / SDK_DIR.name, ignore=skip)
        # An empty virtualenv: componentize-py otherwise finds the host's site-packages (asking pipenv
        # and python) and mounts it in the build, so an app could import host packages that are in no
        # source hash; and the search costs 0.1-0.4 s per build.
        no_venv = Path(tmp) / "no-venv"
        (no_venv / "lib" / "site-packages").mkdir(parents=True)
        _componentize(app_dir or app_copy, app_copy, sdk_copy, out, entry, no_venv)


def _componentize(app_dir: Path, app_copy: Path, sdk_copy: Path, out: Path, entry: str, no_venv: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "componentize-py"),
        "-d", str(WIT_DIR), "-w", WORLD,
        "componentize", entry,
        "-p", str(app_copy), "-p", str(sdk_copy),
        "-o", str(out),
    ]
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("componentize-py") or "componentize-py"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "RUST_BACKTRACE": "0", "VIRTUAL_ENV": str(no_venv)}
    proc = _run(cmd, env)
    if proc.returncode != 0:
        if "AssertionError: Traceback" in proc.stderr:
            raise _guest_traceback(proc.stderr, app_dir)
        raise BuildError(f"componentize-py failed for {app_dir}:\n{proc.stderr.strip()[-4000:]}")


def build_in_store(app_dir: str | Path, store: Path, name: str | None = None, src: str | None = None,
                   browser_later: bool = False) -> BuildResult:
    """Build into `store`, keyed by what goes in (`source_hash`): apps with the same sources, toolchain
    and SDK share one build (each app's own `app.toml` is not part of it). A current build in the app's
    own folder (`amphibia build`, a notebook) is used as it is rather than built again. With
    `browser_later`, see `build`."""
    app_dir = Path(app_dir).resolve()
    src = src or source_hash(app_dir)
    shared = store / src[:32]
    if _current(shared, src, browser_later) is None:
        own = _current(app_dir / ".amphibia", src)
        if own is not None:
            return own
    return build(app_dir, shared, name, src=src, browser_later=browser_later)


def _current(out_dir: Path, src: str, pending: bool = False) -> BuildResult | None:
    """The build in `out_dir` if it was made from sources with hash `src` and is complete (or, with
    `pending`, complete but for its browser part)."""
    found = complete_build(out_dir, pending)
    if found is None or found.manifest.get("source_sha256") != src or found.sha256 != _sha256(found.wasm):
        return None
    return found


def browser_pending(manifest: dict) -> bool:
    """Whether this build's browser part is still to be made (`finish_browser`)."""
    return bool(manifest.get("browser_pending"))


def complete_build(out_dir: Path, pending: bool = False) -> BuildResult | None:
    """The build in `out_dir`, whatever its sources, if it is all there (a cheap check: sizes, not
    hashes); with `pending`, also one whose browser part is still to be made."""
    wasm, manifest_path = out_dir / "app.wasm", out_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        size = wasm.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("wasm_bytes") != size or not manifest.get("wasm_sha256"):
        return None
    needs_browser = not manifest.get("dev") and not (pending and browser_pending(manifest))  # (pages never get the dev component)
    if manifest.get("browser") is None and jco_path() is not None and needs_browser:
        return None
    return BuildResult(wasm, manifest, rebuilt=False)


def build(app_dir: str | Path, out_dir: str | Path | None = None, name: str | None = None,
          force: bool = False, src: str | None = None, browser_later: bool = False) -> BuildResult:
    """Build `app_dir` into `out_dir` (default: `app_dir/.amphibia`), unless an identical build is there.
    With `browser_later`, the build is written without its browser part (`browser_pending` in the
    manifest) for the caller to serve at once and make with `finish_browser`: a gateway serves an
    edit 2-4 s sooner, as jco's two transpiles no longer come first."""
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "app.py").is_file():
        raise BuildError(f"{app_dir} has no app.py")
    out_dir = Path(out_dir) if out_dir else app_dir / ".amphibia"
    out_dir.mkdir(parents=True, exist_ok=True)
    wasm = out_dir / "app.wasm"
    src = src or source_hash(app_dir)
    current = None if force else _current(out_dir, src, browser_later)
    if current is not None:
        return current

    check_syntax(app_dir)
    started = time.perf_counter()
    # Build next to the target and rename: a reader never sees a half-written component, and two
    # concurrent builds of one app both end with a complete one.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_wasm = Path(tmp) / "app.wasm"
        componentize(app_dir, tmp_wasm)
        digest = _sha256(tmp_wasm)
        manifest = {
            "name": name or app_dir.name,
            "world": interface(WORLD),
            "source_sha256": src,
            "wasm_sha256": digest,
            "wasm_bytes": tmp_wasm.stat().st_size,
            "componentize_py": metadata.version("componentize-py"),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        later = browser_later and jco_path() is not None
        manifest["browser"] = None if later else transpile_for_browser(tmp_wasm, Path(tmp) / "browser")
        if later:
            manifest["browser_pending"] = True
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        os.replace(tmp_wasm, wasm)
        if manifest["browser"] is not None:
            shutil.rmtree(out_dir / "browser", ignore_errors=True)
            os.replace(Path(tmp) / "browser", out_dir / "browser")
        _publish_manifest(manifest, Path(tmp), out_dir)
    return BuildResult(wasm, manifest, rebuilt=True)


def build_dev_component(store: Path) -> BuildResult:
    """The dev component (`DEV_ENTRY_MODULE`, no app): one per toolchain, kept in the store like a
    build. `--watch` serves an edit with it, from the edit's files mounted at /0, until the edit's
    own build is ready. It has no browser build: pages wait for the real one."""
    src = hashlib.sha256(f"dev component\n{toolchain_hash()}".encode()).hexdigest()
    out_dir = store / f"dev-{src[:24]}"
    current = _current(out_dir, src)
    if current is not None:
        return current
    out_dir.mkdir(parents=True, exist_ok=True)
    wasm = out_dir / "app.wasm"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_wasm = Path(tmp) / "app.wasm"
        componentize(None, tmp_wasm, DEV_ENTRY_MODULE)
        manifest = {"name": "(dev component)", "dev": True, "world": interface(WORLD), "source_sha256": src,
                    "wasm_sha256": _sha256(tmp_wasm), "wasm_bytes": tmp_wasm.stat().st_size, "browser": None,
                    "componentize_py": metadata.version("componentize-py"),
                    "build_seconds": round(time.perf_counter() - started, 2)}
        os.replace(tmp_wasm, wasm)
        _publish_manifest(manifest, Path(tmp), out_dir)
    return BuildResult(wasm, manifest, rebuilt=True)


def _publish_manifest(manifest: dict, tmp: Path, out_dir: Path) -> None:
    """Write the manifest last, through a rename: readers see the build before or after, never half."""
    tmp_manifest = tmp / "manifest.json"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, out_dir / "manifest.json")


def finish_browser(result: BuildResult) -> BuildResult:
    """Make the browser part of a build written with `browser_later`, and the manifest that lists it
    (written last, atomically: readers see the build pending or complete, never half of it)."""
    if not browser_pending(result.manifest):
        return result
    out_dir = result.wasm.parent
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        files = transpile_for_browser(result.wasm, Path(tmp) / "browser")
        done = complete_build(out_dir)  # another process finished it meanwhile: keep theirs
        if done is not None and done.sha256 == result.sha256:
            return done
        manifest = {k: v for k, v in result.manifest.items() if k != "browser_pending"}
        manifest["browser"] = files
        if files is not None:
            shutil.rmtree(out_dir / "browser", ignore_errors=True)
            os.replace(Path(tmp) / "browser", out_dir / "browser")
        _publish_manifest(manifest, Path(tmp), out_dir)
    return BuildResult(result.wasm, manifest, rebuilt=result.rebuilt)


def jco_path() -> Path | None:
    jco = BROWSER_DIR / "node_modules" / ".bin" / "jco"
    return jco if jco.exists() and shutil.which("node") else None


def transpile_for_browser(wasm: Path, out: Path) -> dict | None:
    """The same component for the browser, with jco: a JSPI build (`app.js`: every `llm` import and
    `handle` async) and a sync build (`app.sync.js`) for browsers without JSPI. Both load the same
    core .wasm files. Returns {file: sha256}, or None where jco is not installed."""
    jco = jco_path()
    if jco is None:
        return None
    base = [str(jco), "transpile", str(wasm), "-q", "-I", "async"]
    jspi = ["--async-mode", "jspi", "--async-exports", "handle"]
    for name in LLM_IMPORTS:
        jspi += ["--async-imports", f"{interface('llm')}#{name}"]
    for name in STREAM_IMPORTS:  # a slow reader suspends the app's write in the page too
        jspi += ["--async-imports", f"{interface('response-stream')}#{name}"]
    for args, target in ((jspi, out), ([], out / "sync")):
        proc = _run([*base, *args, "-o", str(target)])
        if proc.returncode != 0:
            raise BuildError(f"jco transpile failed for {wasm}:\n{proc.stderr.strip()[-3000:]}")
    # The sync build's core modules are byte-identical to the JSPI build's: keep one copy.
    for core in (out / "sync").glob("*.wasm"):
        if _sha256(core) != _sha256(out / core.name):
            raise BuildError(f"jco's sync and JSPI builds differ in {core.name}")
        core.unlink()
    os.replace(out / "sync" / "app.js", out / "app.sync.js")
    shutil.rmtree(out / "sync")
    return {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
