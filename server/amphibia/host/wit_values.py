"""A fix for how wasmtime-py 50 turns a host function's Python return value into a WIT `result`.

wasmtime-py picks the `result` case by Python class when the ok and err types look distinct. For
`result<option<string>, error>` (token-stream.next) the ok case's classes include `object`, so an
error `Variant` is taken for an ok value and lowering fails with "value not valid for this variant".
We lower a `Variant` as the err case whenever the ok type cannot itself be a `Variant`.
"""
from __future__ import annotations

import ctypes
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import Variant
from wasmtime.component._types import ResultType

_fixed = False


def fix_result_lowering() -> None:
    global _fixed
    if _fixed:
        return
    original = ResultType._lower

    def _lower(self: ResultType, store: Any, val: Any) -> Any:
        if isinstance(val, Variant) and self.err is not None and not self._tagged():
            ok_classes: set[type] = set()
            if self.ok is not None:
                self.ok.add_classes(ok_classes)
            if Variant not in ok_classes:
                raw = ffi.wasmtime_component_val_t()
                self.err.convert_to_c(store, val, ctypes.pointer(raw))
                return ("err", ffi.wasmtime_component_val_new(ctypes.byref(raw)))
        return original(self, store, val)

    ResultType._lower = _lower  # type: ignore[method-assign]
    _fixed = True
