"""Host capabilities: each WIT interface an app imports is one unit here, added to the linker by the
runtime without the runtime knowing its insides (as Spin's host components are)."""
from __future__ import annotations

from typing import Protocol

from wasmtime.component import LinkerInstance


class HostCapability(Protocol):
    #: The WIT interface it implements, e.g. "amphibia:ai/llm@0.2.0" (`contract.interface("llm")`).
    interface: str

    def add_to_linker(self, root: LinkerInstance) -> None: ...
