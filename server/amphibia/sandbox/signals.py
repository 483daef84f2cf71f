"""Keeping wasmtime's signal handlers in place.

wasmtime turns a guest's trap (a wasm `unreachable`, an out-of-bounds access, a stack overflow)
into an error for that one request with its own handlers for SIGILL, SIGSEGV, SIGBUS and SIGFPE.
A library that installs handlers of its own after the engine exists takes those faults for
crashes: Ray's `init` turns on Python's faulthandler, and Ray's `shutdown` resets the handlers to
the default, and either way the next guest trap killed the whole process (measured, exit 132).
Code that calls such a library wraps the call in `kept_signal_handlers()`.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
from typing import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGTRAP")
                if hasattr(signal, name))
# Opaque copies of `struct sigaction` (152 bytes on x86_64 glibc, less elsewhere): read and written
# back whole, so its layout does not matter here.
SIGACTION_BYTES = 512

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Run the body, then put back the process's handlers for the fault signals as they were."""
    saved = {}
    for sig in SIGNALS:
        action = ctypes.create_string_buffer(SIGACTION_BYTES)
        if _libc.sigaction(int(sig), None, action) == 0:
            saved[sig] = action
    try:
        yield
    finally:
        for sig, action in saved.items():
            _libc.sigaction(int(sig), action, None)
