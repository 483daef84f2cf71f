"""Amphibia, the host side: build apps into components, run them sandboxed, serve them and their models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The notebook API, loaded on first use so that `import amphibia` (every worker, every CLI
# command) never pays for IPython, matplotlib or the runtime.
_NOTEBOOK = ("load", "connect", "current_engine", "show", "serve", "start_gateway", "pool_view", "pool_stats",
             "page_url", "session")


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext amphibia` in IPython or Jupyter."""
    from .notebook import load_ipython_extension as load_extension

    load_extension(ipython)


def __getattr__(name: str) -> Any:
    if name in _NOTEBOOK:
        from . import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'amphibia' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_NOTEBOOK])
