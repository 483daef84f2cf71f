"""Jupyter support (`amphibia.notebook`): the magic, in-kernel apps, live streams, the remote pool over
the bridge, the background gateway, pool pictures, and the notebooks in notebooks/ run by nbclient.

Everything is real: real builds, the real model, real gateways, worker processes and WebSockets."""
from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import time
from typing import Iterator

import httpx
import pytest

import amphibia
from amphibia.config import Config
from amphibia.errors import BuildError
from amphibia.inference.inprocess import InProcessEngine

from conftest import CACHE, EXAMPLES, FRANCE, ROOT, TEST_APPS, Pool

NOTEBOOKS = ROOT / "notebooks"
CELL_APPS = ROOT / ".amphibia" / "test-notebook-apps"  # cell apps of these tests; builds cached by source hash
PARIS = "The capital of France is Paris."
ECHO_APP = '''from amphibia_guest import App, Request, Response, llm

app = App()


@app.post("/")
def index(req: Request) -> Response:
    ids = llm.tokenize(req.text())
    print("tokens:", len(ids))
    return Response.json({"count": len(ids), "text": llm.detokenize(ids)})
'''


@pytest.fixture(scope="module")
def nb(config: Config, engine: InProcessEngine) -> Iterator[amphibia.notebook.Session]:
    """The kernel's session, sharing the test session's model instead of loading another."""
    from amphibia.notebook import Session, use_session

    session = Session(config, engine=engine)
    old = use_session(session)
    yield session
    session.close()
    use_session(old)


@pytest.fixture(scope="module")
def shell(nb: amphibia.notebook.Session):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "amphibia")
    return ip


def test_importing_amphibia_stays_light() -> None:
    code = ("import sys, amphibia; "
            "assert not {'IPython', 'matplotlib', 'amphibia.notebook', 'amphibia.sandbox.runtime'} "
            "& set(sys.modules), sorted(sys.modules); assert callable(amphibia.load_ipython_extension); "
            "assert amphibia.load.__module__ == 'amphibia.notebook'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_get_post_and_errors_like_the_gateway(nb) -> None:
    chat = amphibia.load(EXAMPLES / "chat")
    assert chat.name == "chat" and chat.build.sha256 == chat.manifest["wasm_sha256"]
    res = chat.get("/")
    assert res.status == 200 and "messages" in res.json()["usage"]
    res = chat.post("/", json={"messages": FRANCE, "temperature": 0.0})
    assert res.ok and res.json()["reply"] == PARIS and res.engine == "local"
    assert res.json()["usage"]["generated_tokens"] == 7
    bad = chat.post("/", json={"messages": []})
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_input"

    misbehave = amphibia.load(TEST_APPS / "misbehave", limits={"timeout_s": 2})
    trap = misbehave.get("/trap")
    assert trap.status == 500 and trap.json()["error"]["type"] == "guest_trap"
    loop = misbehave.get("/loop")
    assert loop.status == 504 and loop.json()["error"]["type"] == "guest_timeout"
    printed = misbehave.get("/print")
    assert printed.text == "printed" and printed.output == ["[stdout] hello from the guest's stdout"]
    assert misbehave.get("/ok").text == "ok"  # a fresh instance after every failure


def test_stream_updates_one_display_as_pieces_arrive(nb, shell) -> None:
    from IPython.utils.capture import capture_output

    chat = amphibia.load(EXAMPLES / "chat")
    with capture_output() as captured:
        res = chat.stream("/stream", json={"messages": FRANCE, "temperature": 0.0}, widget=False)
    assert res.status == 200 and res.json() == {"reply": PARIS, "pieces": len(res.pieces)}
    assert len(res.pieces) > 3 and "".join(res.pieces) == PARIS
    shown = [o for o in captured.outputs if "text/html" in o.data]
    assert len(shown) >= 2 and shown[-1].update and all(o.update for o in shown[1:])
    final = shown[-1].data
    assert PARIS in final["text/plain"] and "200 in" in final["text/plain"] and "pieces" in final["text/plain"]
    assert "\u258c" not in final["text/html"]  # the cursor is gone once done


def test_token_view_with_ipywidgets(nb, shell) -> None:
    from IPython.utils.capture import capture_output

    from amphibia.notebook.streaming import TokenView

    with capture_output() as captured:
        view = TokenView("chat POST /stream", widget=True)
        for piece in ("The", " capital", " <b>"):
            view.add(piece)
        view.finish("200 in 0.1 s")
    assert "The capital &lt;b&gt;" in view._widget.value and "200 in 0.1 s" in view._widget.value
    first, last = captured.outputs[0], captured.outputs[-1]
    assert "application/vnd.jupyter.widget-view+json" in first.data  # live: the widget
    assert last.update and "The capital <b>" in last.data["text/plain"]  # done: plain output that outlives it
    assert "application/vnd.jupyter.widget-view+json" not in last.data


def echo_app() -> amphibia.notebook.NotebookApp:
    """The cell app of the magic's test, loaded as a folder (built by whichever test comes first)."""
    from amphibia.notebook.magics import write_app

    return amphibia.load(write_app(CELL_APPS / "echo-app", ECHO_APP).parent, name="echo-app")


def test_magic_builds_the_cell_binds_it_and_shows_guest_output(nb, shell, capsys) -> None:
    res = shell.run_cell(f"%%amphibia_app echo-app --dir {CELL_APPS}\n{ECHO_APP}")
    assert res.success, res.error_in_exec
    app = shell.user_ns["echo_app"]
    assert (CELL_APPS / "echo-app" / "app.py").read_text() == ECHO_APP
    out = app.post("/", data="Hello world")
    assert out.json() == {"count": 2, "text": "Hello world"}
    assert "tokens: 2" in capsys.readouterr().out
    again = shell.run_cell(f"%%amphibia_app echo-app --dir {CELL_APPS}\n{ECHO_APP}")  # unchanged: no rebuild
    assert again.success and shell.user_ns["echo_app"].build.rebuilt is False


def test_a_build_error_in_a_cell_reads_like_a_traceback(nb, shell, capsys) -> None:
    source = "from amphibia_guest import App, Response\napp = App()\n@app.get('/')\ndef index(req):\n" \
             "    return Response.text('hi'\n"
    res = shell.run_cell(f"%%amphibia_app broken-syntax --dir {CELL_APPS}\n{source}")
    assert isinstance(res.error_in_exec, BuildError)
    shown = capsys.readouterr().out
    app_py = CELL_APPS / "broken-syntax" / "app.py"
    assert "BuildError: app 'broken-syntax' did not build (line 6 of the cell)" in shown
    assert f'File "{app_py}", line 5' in shown and "SyntaxError: '(' was never closed" in shown
    assert "magics.py" not in shown and "build.py" not in shown  # no frames of ours

    res = shell.run_cell(f"%%amphibia_app broken-import --dir {CELL_APPS}\n"
                         "from amphibia_guest import App\napp = App()\nanswer = undefined_name + 1\n")
    assert isinstance(res.error_in_exec, BuildError)
    shown = capsys.readouterr().out
    assert "(line 4 of the cell)" in shown and f'File "{CELL_APPS / "broken-import" / "app.py"}", line 3' in shown
    assert shown.rstrip().endswith("NameError: name 'undefined_name' is not defined")


def _timeline_apps(pool: Pool, since: float) -> set[str]:
    return {e["app"] for e in httpx.get(f"{pool.url}/pool", params={"since": since}).json()["timeline"]}


def test_connect_runs_the_same_apps_on_a_remote_pool(nb, pool: Pool) -> None:
    chat = amphibia.load(EXAMPLES / "chat")
    tokens = amphibia.load(EXAMPLES / "tokens")
    search = amphibia.load(EXAMPLES / "embed-search")
    text = "Amphibians live in two worlds: water and land. " * 8
    local = [tokens.post("/", data=text).json(), search.get("/", params={"q": "capital of France"}).json()]
    try:
        started = time.time()
        remote = amphibia.connect(pool.url.replace("http://", "ws://"))
        assert amphibia.current_engine().startswith("pool at ws://127.0.0.1:")
        res = chat.post("/", json={"messages": FRANCE, "temperature": 0.0})
        assert res.status == 200 and res.json()["reply"] == PARIS and res.engine.startswith("pool at")
        streamed = chat.stream("/stream", json={"messages": FRANCE, "temperature": 0.0}, display=False)
        assert "".join(streamed.pieces) == PARIS and len(streamed.pieces) > 3
        # ~90 tokenize/detokenize calls: paced under the bridge's flood limit, not cut off by it.
        assert tokens.post("/", data=text).json() == local[0]
        found = search.get("/", params={"q": "capital of France"}).json()
        assert [r["document"] for r in found["results"]] == [r["document"] for r in local[1]["results"]]
        assert _timeline_apps(pool, started) == {"chat"}  # generations ran in the pool, as app "chat"
        assert remote.workers == 3 and "smollm2" in remote.models()  # wA, wB and wE (embeddings)

        # An app the remote gateway does not serve gets a clear answer, not a hang.
        refused = echo_app().post("/", data="hi")
        assert refused.status == 400 and "serves no app 'echo-app'" in refused.json()["error"]["message"]

        # With an explicit bridge token, every call acts as the token's app.
        token = httpx.get(f"{pool.url}/bridge/token", params={"app": "tokens"}).json()["token"]
        amphibia.connect(pool.url, token=token)
        started = time.time()
        res = chat.post("/", json={"messages": FRANCE, "temperature": 0.0, "max_tokens": 8})
        assert res.status == 200 and _timeline_apps(pool, started) == {"tokens"}
    finally:
        amphibia.connect()
    assert amphibia.current_engine() == "local"
    assert chat.post("/", json={"messages": FRANCE, "temperature": 0.0}).engine == "local"


def test_pool_view_draws_slots_queues_and_service_from_real_data(pool: Pool) -> None:
    from amphibia.notebook import PoolTrace, pool_stats, pool_view

    since = time.time()
    story = {"messages": [{"role": "user", "content": "Tell me a story about a frog."}], "max_tokens": 24}
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(httpx.post, f"{pool.url}/apps/chat/", json=story, timeout=300) for _ in range(4)]
        futures += [ex.submit(httpx.post, f"{pool.url}/apps/summarize/", content="Frogs jump. " * 10, timeout=300)
                    for _ in range(2)]
        fig = pool_view(pool.url, since=since, until=futures, interval=0.3)
    assert all(f.result().status_code == 200 for f in futures)
    workers, (queue_ax, service_ax) = fig.axes[:3], fig.axes[3:]
    assert len(fig.axes) == 5  # one per worker (wA, wB and wE, the embedding model's), queue depth, service
    assert {ax.get_ylabel() for ax in workers} == {"wA", "wB", "wE"}
    bars = [p.get_gid() for ax in workers for p in ax.patches]
    assert bars.count("chat") >= 4 and bars.count("summarize") >= 2  # every request held a slot (some twice)
    assert {line.get_label() for line in queue_ax.lines} == {"chat", "summarize"}
    assert {line.get_label() for line in service_ax.lines} == {"chat", "summarize"}

    trace = PoolTrace(pool.url, since)
    trace.poll()
    summary = trace.summary()
    assert summary["chat"]["jobs"] == 4 and summary["summarize"]["jobs"] == 2
    assert summary["chat"]["finished"] == 4 and all(s.how != "running" for s in trace.slots())
    stats = pool_stats(pool.url)
    assert stats["chat"]["requests"] >= 4 and stats["chat"]["tokens"] > 0


def test_background_gateway_serves_and_shows_the_app_and_stops(nb) -> None:
    from amphibia.notebook import page_url

    chat = amphibia.load(EXAMPLES / "chat")
    gateway = amphibia.serve(chat)
    workers = list(gateway.workers.values())
    try:
        assert amphibia.serve(chat) is gateway and list(gateway.workers) == ["notebook"]
        res = gateway.post("chat", "/", json={"messages": FRANCE, "temperature": 0.0})
        assert res.status_code == 200 and res.json()["reply"] == PARIS  # the same answer, from the pool
        frame = amphibia.show(chat)
        url = page_url(gateway, "chat")
        assert url.startswith(gateway.url) and f'src="{url}"' in frame._repr_html_()
        assert httpx.get(url).status_code == 200
    finally:
        gateway.stop()
    assert workers and all(proc.poll() is not None for proc in workers) and not gateway.workers
    with pytest.raises(httpx.TransportError):
        httpx.get(gateway.url + "/healthz", timeout=2)


# --- the notebooks, run by nbclient in a real kernel with the real model ----------------------------------
@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory):
    """A kernel spec "python3" that runs this interpreter (the project's venv), whatever else is installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (amphibia)", "language": "python",
        "env": {"AMPHIBIA_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"},
    }))
    return KernelSpecManager(kernel_dirs=[str(root)], ensure_native_kernel=False)


def run_notebook(name: str, kernel_specs, timeout_s: int = 300) -> tuple[object, str]:
    """Execute notebooks/NAME; returns the notebook and all its text outputs (errors raise)."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    km = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs, shutdown_wait_time=30)
    client = NotebookClient(nb, km=km, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.monotonic()
    try:
        client.execute()
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it was handed; a graceful stop runs its atexit hooks
            km.shutdown_kernel(now=False)
    assert time.monotonic() - started < 2 * timeout_s
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            texts.append(out.get("text", ""))
            texts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return nb, "\n".join(texts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_notebook_01_quickstart(kernel_specs) -> None:
    nb, text = run_notebook("01-quickstart.ipynb", kernel_specs)
    assert PARIS in text
    assert re.search(r"streamed \d+ pieces", text)
    assert re.search(r"quickstart POST /stream\n.+\n\[200 in [\d.]+ s, \d+ pieces, llm: local\]", text, re.S | re.I)
    assert "closer: True" in text


def test_notebook_02_time_slicing(kernel_specs) -> None:
    nb, text = run_notebook("02-time-slicing.ipynb", kernel_specs)
    assert _images(nb) >= 1
    assert "light waited less: True" in text
    assert re.search(r"capped: \d+ served, [1-9]\d* refused with 429", text)


def test_notebook_03_browser_and_server(kernel_specs) -> None:
    nb, text = run_notebook("03-browser-and-server.ipynb", kernel_specs)
    assert text.count("same answer: True") == 3
    match = re.search(r"background gateway: (http://127\.0\.0\.1:\d+)", text)
    assert match and "<iframe" in text
    # The kernel is gone, and its background gateway and worker went with it.
    with pytest.raises(httpx.TransportError):
        httpx.get(match.group(1) + "/healthz", timeout=2)
    import psutil

    port = match.group(1).rsplit(":", 1)[1]
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"127.0.0.1:{port}/pool" in " ".join(p.info["cmdline"] or [])]


def test_notebook_04_pre_and_post_processing(kernel_specs) -> None:
    nb, text = run_notebook("04-pre-and-post-processing.ipynb", kernel_specs)
    assert "answer: Paris" in text
    assert "best match: Paris is the capital of France." in text
