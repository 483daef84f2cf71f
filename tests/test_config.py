from __future__ import annotations

from pathlib import Path

import pytest

from amphibia.config import load_app, load_config
from amphibia.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write_app(folder: Path, toml: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "app.py").write_text("from amphibia_guest import App\napp = App()\n")
    if toml:
        (folder / "app.toml").write_text(toml)
    return folder


def test_defaults_with_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.apps == {} and "smollm2" in config.models
    assert config.server.port == 8000 and config.limits.memory_mb == 256 and config.limits.timeout_s == 30
    assert config.models["smollm2"].gguf_path().is_file()


def test_examples_folder_is_served_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert {"chat", "summarize", "embed-search", "tokens"} <= set(load_config().apps)


def test_app_toml_and_amphibia_toml(tmp_path: Path) -> None:
    write_app(tmp_path / "apps" / "hello", 'description = "hi"\n[limits]\nmemory_mb = 64\n')
    (tmp_path / "models").mkdir()
    (tmp_path / "amphibia.toml").write_text(
        '[server]\nport = 9000\n[limits]\ntimeout_s = 5\n'
        '[models.tiny]\npath = "models/tiny.gguf"\nn_ctx = 512\n[models.smollm2]\nn_ctx = 4096\n'
        '[apps.greeter]\npath = "apps/hello"\nallowed_models = ["tiny"]\n'
    )
    config = load_config(tmp_path)
    app = config.apps["greeter"]
    assert config.server.port == 9000 and config.server.cache_dir == tmp_path / ".amphibia/cache"
    assert app.description == "hi" and app.limits.memory_mb == 64 and app.limits.timeout_s == 5
    assert app.allows("tiny") and app.allows("smollm2") and not app.allows("other")
    assert config.models["tiny"].n_ctx == 512
    assert config.models["smollm2"].n_ctx == 4096 and config.models["smollm2"].gguf_path().is_file()
    with pytest.raises(ConfigError, match="no GGUF file"):
        config.models["tiny"].gguf_path()


@pytest.mark.parametrize("toml, message", [
    ("[server]\nprot = 1\n", "unknown key"),
    ("[nonsense]\n", "unknown section"),
    ("[apps.x]\nmodel = 'smollm2'\n", "needs a `path`"),
    ("[apps.x]\npath = 'apps/hello'\nmodel = 'gpt'\n", "no \\[models.gpt\\]"),
    ("[server\n", "amphibia.toml"),
    ("[apps.x]\npath = 'apps/hello'\nbrowser_engine = 'gpu'\n", "browser_engine must be one of auto, local, remote"),
])
def test_config_errors_are_clear(tmp_path: Path, toml: str, message: str) -> None:
    write_app(tmp_path / "apps" / "hello")
    (tmp_path / "amphibia.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "amphibia.toml")


def test_bad_app_names_and_folders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no app.py"):
        load_app(tmp_path)
    write_app(tmp_path / "Bad Name")
    with pytest.raises(ConfigError, match="lowercase"):
        load_app(tmp_path / "Bad Name")


@pytest.mark.parametrize("toml, message", [
    ("[server]\nallowed_origins = 'https://x'\n",
     r"amphibia.toml: \[server\] allowed_origins must be a list of strings, not a string"),
    ("[server]\nhosts = ['a', 1]\n", r"\[server\] hosts must be a list of strings, not a list holding an integer"),
    ("[server]\nport = '8000'\n", r"\[server\] port must be an integer, not a string"),
    ("[server]\nguest_threads = true\n", r"\[server\] guest_threads must be an integer, not a boolean"),
    ("[server]\ncache_dir = 1\n", r"\[server\] cache_dir must be a path \(a string\), not an integer"),
    ("server = 5\n", r"\[server\] must be a table, not an integer"),
    ("[limits]\ntimeout_s = 'long'\n", r"\[limits\] timeout_s must be a number, not a string"),
    ("[limits]\nmemory_mb = 1.5\n", r"\[limits\] memory_mb must be an integer, not a number"),
    ("[pool]\nlocal_worker = 'yes'\n", r"\[pool\] local_worker must be true or false, not a string"),
    ("[models.smollm2]\nn_ctx = '4k'\n", r"\[models.smollm2\] n_ctx must be an integer"),
    ("[models.tiny]\npath = 3\n", r"\[models.tiny\] path must be a path"),
    ("models = { tiny = 1 }\n", r"\[models.tiny\] must be a table"),
    ("[apps]\ndiscover = 3\n", r"\[apps\] discover must be a string"),
    ("[apps.x]\npath = 'apps/hello'\nallowed_models = 'smollm2'\n",
     r"\[apps.x\] allowed_models must be a list of strings"),
    ("[apps.x]\npath = 'apps/hello'\nlimits = { memory_mb = 'big' }\n",
     r"\[apps.x\] limits memory_mb must be an integer"),
    ("[apps.x]\npath = 'apps/hello'\nlimits = 5\n", r"\[apps.x\] limits must be a table"),
    ("[apps.x]\npath = 'apps/hello'\nweight = 'heavy'\n", r"\[apps.x\] weight must be a number, not a string"),
])
def test_config_values_are_type_checked(tmp_path: Path, toml: str, message: str) -> None:
    write_app(tmp_path / "apps" / "hello")
    (tmp_path / "amphibia.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "amphibia.toml")


def test_app_toml_values_are_type_checked(tmp_path: Path) -> None:
    app = write_app(tmp_path / "hello", "model = 1\n")
    with pytest.raises(ConfigError, match=r"hello/app.toml: model must be a string, not an integer"):
        load_app(app)
    (app / "app.toml").write_text("files = 'data'\n")
    with pytest.raises(ConfigError, match=r"app.toml: files must be a list of strings, not a string"):
        load_app(app)
    (app / "app.toml").write_text("[limits]\ntimeout_s = true\n")
    with pytest.raises(ConfigError, match=r"app.toml: limits timeout_s must be a number, not a boolean"):
        load_app(app)


def test_typed_values_are_converted(tmp_path: Path) -> None:
    """Integers where numbers are wanted, lists as tuples, paths under the file's folder."""
    write_app(tmp_path / "apps" / "hello", "weight = 2\nallowed_models = ['smollm2']\n")
    (tmp_path / "amphibia.toml").write_text(
        "[server]\nallowed_origins = ['https://x']\nhosts = ['amphibia.example']\nbrowser_max_model_mb = 100\n"
        "[limits]\ntimeout_s = 5\n[pool]\nheartbeat_s = 1\n[apps.hello]\npath = 'apps/hello'\n")
    config = load_config(tmp_path / "amphibia.toml")
    assert config.server.allowed_origins == ("https://x",) and config.server.hosts == ("amphibia.example",)
    assert config.server.browser_max_model_mb == 100.0 and isinstance(config.server.browser_max_model_mb, float)
    assert config.limits.timeout_s == 5.0 and isinstance(config.limits.timeout_s, float)
    assert config.pool.heartbeat_s == 1.0
    app = config.apps["hello"]
    assert app.weight == 2.0 and app.allowed_models == ("smollm2",) and app.path == (tmp_path / "apps/hello")


def test_trusted_hosts_default_to_loopback() -> None:
    from amphibia.config import ServerConfig

    assert {"localhost", "127.0.0.1", "::1"} <= set(ServerConfig().hosts)


def test_negative_budgets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "amphibia.toml").write_text("[server]\nmax_loaded_apps = -1\n")
    with pytest.raises(ConfigError, match="max_loaded_apps must be 0 or more"):
        load_config(tmp_path)
