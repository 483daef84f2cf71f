"""An `engine.Engine` that answers instantly by echoing the input: registered only by benchmarks, to
measure the sandbox and host-call path without the model's time in it."""
from __future__ import annotations

from typing import Sequence

from ..engine import GenerateRequest, TokenStream, Usage, no_such_model

MODEL = "smollm2"  # answers to the default model name so example apps run unchanged


class EchoEngine:
    def has_model(self, model: str) -> bool:
        return model == MODEL

    def context_size(self, model: str) -> int:
        return 2048

    def generate(self, request: GenerateRequest, timeout_s: float = 120.0) -> TokenStream:
        if request.model != MODEL:
            raise no_such_model(request.model, [MODEL])
        text = request.prompt or (request.messages[-1]["content"] if request.messages else "")
        stream = TokenStream(timeout_s)
        stream.put(text)
        stream.finish(Usage(len(text.split()), len(text.split())), "stop")
        return stream

    def embed(self, model: str, texts: Sequence[str], timeout_s: float = 120.0) -> tuple[list[list[float]], int]:
        return [[float(len(t)), 1.0] for t in texts], len(texts)

    def tokenize(self, model: str, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        return bytes(t % 256 for t in tokens).decode(errors="replace")

    def close(self) -> None:
        pass
