"""Two fixes to how wasmtime-py 50 converts WIT values, installed once by the runtime.

1. Results. wasmtime-py picks the `result` case by Python class when the ok and err types look distinct. For
`result<option<string>, error>` (token-stream.next) the ok case's classes include `object`, so an
error `Variant` is taken for an ok value and lowering fails with "value not valid for this variant".
We lower a `Variant` as the err case whenever the ok type cannot itself be a `Variant`.

2. Bytes. `list<u8>` (request and response bodies) is converted one Python call per byte: about a
second per megabyte, on every request. The C API stores it as an array of tagged 32-byte values, so
we write and read that array with slice assignment instead, at memcpy-like speed.
"""
from __future__ import annotations

import ctypes
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import Variant
from wasmtime.component._types import ListType, ResultType

_fixed = False
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
_KIND_OFFSET = ffi.wasmtime_component_val_t.kind.offset
_U8_OFFSET = ffi.wasmtime_component_val_t.of.offset  # the u8 is the union's first byte
_KIND_U8 = ffi.WASMTIME_COMPONENT_U8.value


def install() -> None:
    global _fixed
    if _fixed:
        return
    _fix_result_lowering()
    _fix_bytes()
    _fixed = True


def _fix_bytes() -> None:
    to_c, from_c = ListType.convert_to_c, ListType.convert_from_c

    def convert_to_c(self: ListType, store: Any, val: Any, ptr: Any) -> None:
        if not (self._is_bytes() and isinstance(val, (bytes, bytearray))):
            return to_c(self, store, val, ptr)
        n = len(val)
        raw = ffi.wasmtime_component_vallist_t()
        ffi.wasmtime_component_vallist_new_uninit(raw, n)
        if n:
            image = bytearray(n * _VAL_SIZE)
            image[_KIND_OFFSET::_VAL_SIZE] = bytes([_KIND_U8]) * n
            image[_U8_OFFSET::_VAL_SIZE] = val
            ctypes.memmove(raw.data, bytes(image), len(image))
        ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
        ptr.contents.of.list = raw

    def convert_from_c(self: ListType, c: Any) -> Any:
        if not self._is_bytes():
            return from_c(self, c)
        n = c.of.list.size
        image = ctypes.string_at(c.of.list.data, n * _VAL_SIZE) if n else b""
        # u8 elements own nothing, so the list needs no per-element cleanup before it is freed
        ffi.wasmtime_component_vallist_delete(ctypes.byref(c.of.list))
        return image[_U8_OFFSET::_VAL_SIZE]

    ListType.convert_to_c = convert_to_c  # type: ignore[method-assign]
    ListType.convert_from_c = convert_from_c  # type: ignore[method-assign]


def _fix_result_lowering() -> None:
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
