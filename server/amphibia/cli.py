"""The `amphibia` command: new, build, up, models, bench."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

import jinja2

from .config import APP_NAME, load_config
from .errors import AmphibiaError


def cmd_new(args: argparse.Namespace) -> int:
    name = args.name
    if not APP_NAME.match(name):
        raise AmphibiaError(f"app name {name!r} must be lowercase letters, digits, '-' or '_'")
    target = Path(args.dir) / name
    if target.exists():
        raise AmphibiaError(f"{target} already exists")
    env = jinja2.Environment(loader=jinja2.PackageLoader("amphibia", "templates/new"), keep_trailing_newline=True)
    target.mkdir(parents=True)
    for template in ("app.py.j2", "app.toml.j2"):
        text = env.get_template(template).render(name=name, description=args.description)
        (target / template.removesuffix(".j2")).write_text(text)
    print(f"created {target}/app.py and app.toml; next: amphibia build {target}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Each target: one app's folder (built into its `.amphibia`, or `-o`), a folder of apps (each into
    its own), or an amphibia.toml (its apps into its `[server] build_dir`, one build per distinct input)."""
    from .build_all import Job, build_all
    from .config import discover_apps, load_app

    jobs: list[Job] = []
    for target in args.targets:
        path = Path(target)
        if (path / "app.py").is_file():
            jobs.append(Job(load_app(path).name, path.resolve(), Path(args.output) if args.output else None))
        elif path.is_dir() and not (path / "amphibia.toml").is_file():
            jobs += [Job(spec.name, spec.path) for spec in discover_apps(path.resolve()).values()]
        else:
            config = load_config(target)
            jobs += [Job(spec.name, spec.path, store=config.server.build_dir) for spec in config.apps.values()]
    if args.output and len(jobs) != 1:
        raise AmphibiaError("-o/--output needs exactly one app to build")
    if not jobs:
        raise AmphibiaError(f"no apps in {', '.join(args.targets)}")
    outcomes = build_all(jobs, force=args.force, parallel=args.jobs)
    for o in outcomes:
        if o.result is not None:
            print(f"{o.result.wasm} {o.state} (sha256 {o.result.sha256[:16]}, "
                  f"{o.result.manifest['wasm_bytes'] / 1e6:.1f} MB)")
    return 1 if any(o.error for o in outcomes) else 0


class RedactTokens(logging.Filter):
    """Bridge tokens travel in the query (`/bridge?token=...`, browsers cannot set WebSocket headers):
    keep them out of the access log."""

    TOKEN = re.compile(r"(token=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args)
        return True


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from .http.app import create_app
    from .inference.pool.wire import MAX_FRAME_BYTES

    config = load_config(args.target)
    host = args.host or config.server.host
    port = args.port or config.server.port
    config = replace(config, server=replace(config.server, host=host, port=port))  # the trusted hosts need it
    if args.ray is not None:  # --ray [ADDRESS]: workers are Ray actors (and no local worker process)
        ray = replace(config.pool.ray, enabled=True, address=args.ray or config.pool.ray.address)
        config = replace(config, pool=replace(config.pool, ray=ray))
    print(f"Amphibia: {len(config.apps)} app(s) on http://{host}:{port}/ ({', '.join(config.apps) or 'none'})",
          flush=True)
    dev = getattr(args, "dev", False)
    app = create_app(config, local_worker_port=None if args.no_local_worker else port, config_target=args.target,
                     watch=args.watch, dev=dev)
    if dev:
        for name in config.apps:
            print(f"  dev page: http://{host}:{port}/dev/apps/{name}/", flush=True)
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, access_log=args.access_log,
                ws_max_size=MAX_FRAME_BYTES)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from .inference.pool.worker import WorkerOptions, run

    config = load_config(args.config) if args.config else load_config(None)
    if args.model not in config.models:
        raise AmphibiaError(f"unknown model {args.model!r}; known: {', '.join(config.models)}")
    spec = config.models[args.model]
    if args.gpu_layers is not None:
        spec = replace(spec, gpu_layers=args.gpu_layers)
    if args.threads is not None:
        spec = replace(spec, threads=args.threads)
    token = args.token or os.environ.get("AMPHIBIA_POOL_TOKEN") or config.pool.token
    if not token:
        raise AmphibiaError("a pool token is needed: --token, AMPHIBIA_POOL_TOKEN or [pool] token in amphibia.toml")
    opts = WorkerOptions(gateway=args.gateway, token=token, model=spec, slots=args.slots, worker_id=args.worker_id or "")
    run(opts)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    config = load_config(args.target)
    rows = []
    for spec in config.models.values():
        try:
            path, ok = str(spec.gguf_path()), True
        except AmphibiaError as exc:
            path, ok = exc.message, False
        rows.append({"name": spec.name, "purpose": spec.purpose, "path": path, "available": ok, "n_ctx": spec.n_ctx,
                     "gpu_layers": spec.gpu_layers, "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<12} {r['purpose']:<10} n_ctx={r['n_ctx']:<6} gpu_layers={r['gpu_layers']:<4} "
                  f"{'ok ' if r['available'] else 'MISSING '}{r['path']}")
    return 0


BENCHMARKS = {"cold-start": "cold_start", "pool": "pool", "browser": "browser", "chaos": "chaos",
              "inflight": "inflight", "density": "density",
              "broker": "broker", "dev": "dev"}  # `amphibia bench NAME` -> amphibia.bench.MODULE


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f".bench.{BENCHMARKS[args.which]}", __package__).main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amphibia", description="Python AI apps as WebAssembly components.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("new", help="scaffold an app")
    s.add_argument("name")
    s.add_argument("--dir", default=".", help="parent folder (default: .)")
    s.add_argument("--description", default="An Amphibia app.")
    s.set_defaults(fn=cmd_new)

    s = sub.add_parser("build", help="compile apps to components (app folders, folders of apps, amphibia.toml)")
    s.add_argument("targets", nargs="+", metavar="TARGET")
    s.add_argument("-o", "--output", help="output folder for a single app (default: APP_DIR/.amphibia)")
    s.add_argument("--force", action="store_true", help="rebuild even if sources are unchanged")
    s.add_argument("-j", "--jobs", type=int, default=None, help="builds at once (default: one per core)")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("up", help="serve apps (an amphibia.toml, a folder of apps, or one app)")
    _serving_arguments(s)
    s.add_argument("--watch", action="store_true",
                   help="rebuild an app when its files change and swap it in (the old build serves meanwhile)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="place the pool's workers as actors on a Ray cluster (default address: [pool.ray] "
                        "address, else auto); needs pip install 'amphibia[ray]'")
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("dev", help="serve apps like `up --watch`, with a dev page per app: edit the source and "
                                   "run it in the page (Pyodide), save it, compare with the compiled component")
    _serving_arguments(s)
    s.set_defaults(fn=cmd_up, dev=True, watch=True, ray=None)

    s = sub.add_parser("worker", help="serve a model to a gateway's pool")
    s.add_argument("--gateway", required=True, help="ws://HOST:PORT/pool")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--slots", type=int, default=4, help="sequences batched together")
    s.add_argument("--gpu-layers", type=int, default=None, help="layers to offload (needs a CUDA build)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for llama.cpp (default: the model's `threads`; several workers on one "
                        "machine should split its cores, not each take them all)")
    s.add_argument("--token", help="the pool token (default: $AMPHIBIA_POOL_TOKEN or [pool] token)")
    s.add_argument("--worker-id")
    s.add_argument("--config", help="amphibia.toml (for its model registry)")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("models", help="list the model registry")
    s.add_argument("target", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("bench", help="run a benchmark; the last line printed is JSON")
    s.add_argument("which", choices=list(BENCHMARKS))
    s.add_argument("--quick", action="store_true", help="pool, browser, chaos, density, dev: a reduced run (a minute or two)")
    s.add_argument("--json", action="store_true", help="print only the JSON result line")
    s.add_argument("--app", default=None, help="app folder (default: examples/chat)")
    s.add_argument("-n", "--requests", type=int, default=300)
    s.set_defaults(fn=cmd_bench)
    return p


def _serving_arguments(s: argparse.ArgumentParser) -> None:
    """What `up` and `dev` both take."""
    s.add_argument("target", nargs="?")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true")
    s.add_argument("--no-local-worker", action="store_true", help="a pure gateway: only remote workers serve")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except AmphibiaError as exc:
        print(f"amphibia: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
