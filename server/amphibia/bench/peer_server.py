"""The pool benchmark's peer: llama-cpp-python's own OpenAI server, run with the llama.cpp model
settings our workers use (`llama_model.USE_EXTRA_BUFFERS`: without it the peer crashes on AMX CPUs),
so both sides run the same kernels. Arguments are llama_cpp.server's."""
from __future__ import annotations

import runpy

import llama_cpp.llama_cpp as capi

from ..inference.llama_model import USE_EXTRA_BUFFERS

_default_params = capi.llama_model_default_params


def _model_params() -> capi.llama_model_params:
    params = _default_params()
    params.use_extra_bufts = USE_EXTRA_BUFFERS
    return params


capi.llama_model_default_params = _model_params

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
