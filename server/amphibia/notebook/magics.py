"""`%%amphibia_app NAME`: the cell is an app's `app.py`; build it with the normal build and load it.

The source goes to `DIR/NAME/app.py` (default DIR: `.amphibia/notebook-apps` under the kernel's
working folder), so builds are cached by source hash like any app's, and a build error points
at that file and at the cell's own line.
"""
from __future__ import annotations

import keyword
from pathlib import Path

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..config import APP_NAME
from ..errors import ConfigError
from .apps import load
from .session import session

DEFAULT_DIR = ".amphibia/notebook-apps"


def write_app(folder: Path, source: str) -> Path:
    """Write the cell as `app.py`, leaving the file alone when nothing changed."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "app.py"
    if not target.is_file() or target.read_text() != source:
        target.write_text(source)
    return target


def variable_for(name: str) -> str:
    var = name.replace("-", "_")
    return var + "_" if keyword.iskeyword(var) else var


@magics_class
class AmphibiaMagics(Magics):
    @magic_arguments()
    @argument("name", help="the app's name (lowercase letters, digits, '-' or '_'); also the variable it is bound to")
    @argument("--dir", default=DEFAULT_DIR, help=f"where the app's folder goes (default: {DEFAULT_DIR})")
    @argument("--model", default=None, help="the app's default model (default: smollm2)")
    @argument("--var", default=None, help="bind the app to this variable instead of NAME")
    @cell_magic
    def amphibia_app(self, line: str, cell: str) -> None:
        """Compile this cell (an app.py) into a component, load it, and bind it to NAME."""
        args = parse_argstring(self.amphibia_app, line)
        if not APP_NAME.match(args.name):
            raise ConfigError(f"app name {args.name!r} must be lowercase letters, digits, '-' or '_'")
        folder = Path(args.dir).expanduser() / args.name
        write_app(folder, cell)
        # The magic's own line is line 1 of the cell: app.py line N is cell line N + 1.
        app = load(session(), folder, name=args.name, model=args.model, cell_offset=1)
        var = args.var or variable_for(args.name)
        self.shell.user_ns[var] = app
        print(f"{args.name}: component {app.build.sha256[:12]} loaded; call it as `{var}.get(...)`, "
              f"`{var}.post(...)` or `{var}.stream(...)`")
