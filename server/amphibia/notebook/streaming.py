"""Live text in the output cell: one display that is updated as pieces arrive.

With ipywidgets installed (and a kernel to talk to), an `HTML` widget while tokens arrive, replaced
by plain HTML when done; otherwise an IPython display handle updated in place (`display(...,
display_id=True)` then `.update`), which every frontend and nbclient understand. Outside IPython
nothing is drawn.
"""
from __future__ import annotations

import html
import time
from typing import Any

MIN_REDRAW_S = 0.08  # frontends choke on hundreds of updates a second; people cannot read them anyway


def shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def widgets_usable() -> bool:
    """ipywidgets need a kernel (comms) and a frontend; a terminal IPython has neither."""
    ip = shell()
    if ip is None or not hasattr(ip, "kernel"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class TokenView:
    def __init__(self, title: str, widget: bool | None = None) -> None:
        self.title, self.text, self.footer = title, "", "streaming ..."
        self.pieces = 0
        self._drawn_at = 0.0
        self._widget: Any = None
        self._handle: Any = None
        if shell() is None:
            return
        from IPython.display import display

        if widget if widget is not None else widgets_usable():
            import ipywidgets

            self._widget = ipywidgets.HTML(value=self.html())
            self._handle = display(self._widget, display_id=True)
        else:
            self._handle = display(self.bundle(), raw=True, display_id=True)

    def html(self, done: bool = False) -> str:
        cursor = "" if done else "\u258c"
        return (f"<div><b>{html.escape(self.title)}</b>"
                f"<pre style=\"white-space: pre-wrap; margin: 4px 0\">{html.escape(self.text)}{cursor}</pre>"
                f"<small>{html.escape(self.footer)}</small></div>")

    def bundle(self, done: bool = False) -> dict[str, str]:
        return {"text/plain": f"{self.title}\n{self.text}\n[{self.footer}]", "text/html": self.html(done)}

    def add(self, piece: str) -> None:
        self.text += piece
        self.pieces += 1
        self.footer = f"{self.pieces} pieces ..."
        if time.monotonic() - self._drawn_at >= MIN_REDRAW_S:
            self._draw()

    def finish(self, footer: str) -> None:
        self.footer = footer
        self._draw(done=True)
        if self._widget is not None and self._handle is not None:
            # The widget lives only as long as the kernel; the output keeps the final text as plain
            # HTML, so a saved or exported notebook shows what was streamed.
            self._handle.update(self.bundle(done=True), raw=True)
            self._widget.close()

    def _draw(self, done: bool = False) -> None:
        self._drawn_at = time.monotonic()
        if self._widget is not None:
            self._widget.value = self.html(done)
        elif self._handle is not None:
            self._handle.update(self.bundle(done), raw=True)
