"""One GGUF model and its llama.cpp contexts, driven through llama-cpp-python's low-level API.

Not thread-safe, by design: exactly one thread owns a `LlamaModel` (see `local_engine`). The
low-level API is used instead of `llama_cpp.Llama` because the high-level class cannot take a
per-request repeat window or seed, and it is the base the batching worker of the pool grows from.
"""
from __future__ import annotations

import ctypes
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import llama_cpp as L

from .engine import SamplingParams, TextAssembler
from .errors import InvalidInput, LLMError

_backend_ready = False


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: int) -> None:
    # llama.cpp logs every tensor at load; keep a module-level reference (ctypes needs it alive).
    if os.environ.get("AMPHIBIA_LLAMA_LOG"):
        print(text.decode(errors="replace"), end="")


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "stop" or "length"


class LlamaModel:
    def __init__(self, path: Path, n_ctx: int = 2048, gpu_layers: int = 0, threads: int = 2, slots: int = 1) -> None:
        """`n_ctx` is per sequence; `slots` sequences share one context (the pool's batching)."""
        _init_backend()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LLMError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_ctx = n_ctx
        self.threads = threads
        self.slots = slots
        self.ctx = self._context(embeddings=False)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._embed_ctx = None
        template = L.llama_model_chat_template(self.model, None)
        self.chat_template: str | None = template.decode() if template else None
        self.bos_token = self._token_text(L.llama_vocab_bos(self.vocab))
        self.eos_token = self._token_text(L.llama_vocab_eos(self.vocab))

    def _context(self, embeddings: bool) -> L.llama_context_p:
        cparams = L.llama_context_default_params()
        seqs = 1 if embeddings else self.slots
        cparams.n_ctx = self.n_ctx * seqs
        cparams.n_batch = min(512, self.n_ctx)
        cparams.n_ubatch = min(512, self.n_ctx)
        cparams.n_seq_max = seqs
        # One KV stream per sequence: a sequence's numbers do not depend on its neighbours, so batched
        # greedy output equals single-sequence output exactly (measured in the field notes).
        cparams.kv_unified = False
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        if embeddings:
            cparams.embeddings = True
            cparams.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
        ctx = L.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise LLMError("llama.cpp could not create a context")
        return ctx

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode(errors="replace") if token >= 0 else ""

    # --- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode()
        n_max = len(data) + 8
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    @property
    def n_vocab(self) -> int:
        return L.llama_vocab_n_tokens(self.vocab)

    def detokenize(self, tokens: Sequence[int]) -> str:
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        return b"".join(self.piece(t, special=True) for t in tokens).decode(errors="replace")

    # --- generation ----------------------------------------------------------------------------------
    def _decode(self, ctx: L.llama_context_p, tokens: Sequence[int], start: int, want_all: bool = False) -> None:
        """Feed `tokens` at positions start.. in chunks of n_batch; logits for the last (or every) token."""
        batch = self.batch
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset: offset + self.n_batch]
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want_all or offset + i == len(tokens) - 1
            batch.n_tokens = len(chunk)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise LLMError(f"llama_decode failed with code {rc}")

    def sampler(self, params: SamplingParams) -> L.llama_sampler_p:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
            # First argument: older bindings declare an n_vocab parameter the C function no longer has;
            # passing last_n there too is right for both signatures.
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                params.repeat_last_n, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def prompt_tokens(self, prompt: str) -> list[int]:
        tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        if not tokens:
            raise InvalidInput("prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise InvalidInput(f"prompt is {len(tokens)} tokens; the model's context holds {self.n_ctx}")
        return tokens

    def generate(self, prompt: str, params: SamplingParams, emit: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> GenerationResult:
        """Run one generation to its end, calling `emit` with each safe-to-show piece of text."""
        tokens = self.prompt_tokens(prompt)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        sampler = self.sampler(params)
        text = TextAssembler(params.stop)
        generated, finish = 0, "length"
        try:
            self._decode(self.ctx, tokens, 0)
            pos = len(tokens)
            while generated < params.max_tokens and pos < self.n_ctx and not cancelled():
                token = L.llama_sampler_sample(sampler, self.ctx, -1)
                if L.llama_vocab_is_eog(self.vocab, token):
                    finish = "stop"
                    break
                generated += 1
                emit(text.feed(self.piece(token)))
                if text.stopped:
                    finish = "stop"
                    break
                self._decode(self.ctx, [token], pos)
                pos += 1
            emit(text.flush())
        finally:
            L.llama_sampler_free(sampler)
        return GenerationResult(len(tokens), generated, finish)

    # --- embeddings -------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised vectors (cosine similarity is then a dot product)."""
        if self._embed_ctx is None:
            self._embed_ctx = self._context(embeddings=True)
        n_embd = L.llama_model_n_embd(self.model)
        vectors, used = [], 0
        for text in texts:
            tokens = self.tokenize(text, add_special=True, parse_special=False) or [L.llama_vocab_bos(self.vocab)]
            if len(tokens) > self.n_batch:
                raise InvalidInput(f"text of {len(tokens)} tokens is longer than the {self.n_batch} an embedding takes")
            L.llama_memory_clear(L.llama_get_memory(self._embed_ctx), True)
            self._decode(self._embed_ctx, tokens, 0, want_all=True)
            ptr = L.llama_get_embeddings_seq(self._embed_ctx, 0)
            if not ptr:
                raise LLMError("llama.cpp returned no embedding")
            vec = [float(ptr[i]) for i in range(n_embd)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vectors.append([v / norm for v in vec])
            used += len(tokens)
        return vectors, used

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        if self._embed_ctx is not None:
            L.llama_free(self._embed_ctx)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
