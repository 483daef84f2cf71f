"""Token bytes to the text a client may see: whole UTF-8 characters, nothing past a stop string."""
from __future__ import annotations

import codecs
from typing import Sequence


class TextAssembler:
    """Turns token bytes into text pieces: whole UTF-8 characters only, and nothing past a stop string.

    Text that could still become a stop string is held back until it cannot.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """The text that is safe to emit after `data`; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stop:
            out, self._held = self._held, ""
            return out
        cut = min((i for s in self._stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = 0 if final else max(
            (n for s in self._stop for n in range(1, len(s)) if self._held.endswith(s[:n])), default=0
        )
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        return out
