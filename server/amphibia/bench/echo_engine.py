"""An engine that answers instantly by echoing the input: registered only by benchmarks, to measure
the sandbox and host-call path without the model's time in it."""
from __future__ import annotations

from typing import Mapping

from ..config import AppSpec
from ..inference.engine import Cancel, CallSink, GenerationSink
from ..inference.types import Call, Generation, Usage

MODEL = "smollm2"  # answers to the default model name so example apps run unchanged


class EchoEngine:
    def models(self) -> Mapping[str, int]:
        return {MODEL: 2048}

    def generate(self, caller: AppSpec, generation: Generation, sink: GenerationSink) -> Cancel:
        text = generation.prompt or (generation.messages[-1]["content"] if generation.messages else "")
        sink.token(text)
        sink.done(Usage(len(text.split()), len(text.split())), "stop")
        return lambda: None

    def call(self, caller: AppSpec, call: Call, sink: CallSink) -> Cancel:
        if call.method == "embed":
            sink.result({"embeddings": [[float(len(t)), 1.0] for t in call.args["texts"]],
                         "prompt_tokens": len(call.args["texts"])})
        elif call.method == "tokenize":
            sink.result(list(call.args["text"].encode()))
        else:
            sink.result(bytes(t % 256 for t in call.args["tokens"]).decode(errors="replace"))
        return lambda: None

    def close(self) -> None:
        pass
