"""amphibia_guest: everything an Amphibia app imports.

An app is plain Python compiled to a WebAssembly component; the same component runs on the server
(wasmtime) and in the browser (jco). The generated WIT bindings stay hidden behind this package.
"""
from . import llm
from .errors import (
    InferenceTimeout,
    InvalidInput,
    InvalidOutput,
    LLMError,
    ModelNotSupported,
    Overloaded,
    RuntimeFailure,
)
from .http import App, HTTPError, Request, Response

__all__ = [
    "App",
    "HTTPError",
    "InferenceTimeout",
    "InvalidInput",
    "InvalidOutput",
    "LLMError",
    "ModelNotSupported",
    "Overloaded",
    "Request",
    "Response",
    "RuntimeFailure",
    "llm",
]
