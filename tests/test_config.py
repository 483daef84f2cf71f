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
