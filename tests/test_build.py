"""Real componentize-py builds: caching by source hash, and errors that point at file and line."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from amphibia.build import build, source_hash
from amphibia.errors import BuildError

ROOT = Path(__file__).resolve().parent.parent


def test_unchanged_app_is_not_rebuilt(tmp_path: Path) -> None:
    app = tmp_path / "tokens"
    shutil.copytree(ROOT / "examples" / "tokens", app, ignore=shutil.ignore_patterns(".amphibia"))
    first = build(app)
    assert first.rebuilt and first.wasm.stat().st_size > 1_000_000
    assert first.manifest["source_sha256"] == source_hash(app) and len(first.sha256) == 64
    second = build(app)
    assert not second.rebuilt and second.sha256 == first.sha256
    (app / "app.py").write_text((app / "app.py").read_text() + "\n# changed\n")
    assert source_hash(app) != first.manifest["source_sha256"]


def test_syntax_error_points_at_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("from amphibia_guest import App\napp = App()\n\ndef broken(:\n    pass\n")
    with pytest.raises(BuildError) as info:
        build(tmp_path)
    assert f"{tmp_path / 'app.py'}:4:" in info.value.message and "SyntaxError" in info.value.message
    assert info.value.extra["line"] == 4


def test_import_that_cannot_work_in_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("from amphibia_guest import App\nimport helper\napp = App()\n")
    (tmp_path / "helper.py").write_text("x = 1\nimport no_such_module_anywhere\n")
    with pytest.raises(BuildError) as info:
        build(tmp_path)
    message = info.value.message
    assert message.startswith(f"{tmp_path / 'helper.py'}:2: ModuleNotFoundError"), message
    assert "sandbox" in message


def test_missing_app_py(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no app.py"):
        build(tmp_path)


def test_import_time_code_changes_nothing_outside_the_build(tmp_path: Path) -> None:
    """componentize-py runs an app's imports at build time; they see copies of the app and the SDK."""
    import amphibia_guest

    sdk = Path(amphibia_guest.__file__).parent
    (tmp_path / "app.py").write_text(
        "import os\nimport amphibia_guest\nfrom amphibia_guest import App\napp = App()\n"
        "open(os.path.join(os.path.dirname(__file__), 'written-at-build.txt'), 'w').write('x')\n"
        "open(os.path.join(os.path.dirname(amphibia_guest.__file__), 'written-at-build.txt'), 'w').write('x')\n")
    assert build(tmp_path).rebuilt
    assert not (tmp_path / "written-at-build.txt").exists()
    assert not (sdk / "written-at-build.txt").exists()
