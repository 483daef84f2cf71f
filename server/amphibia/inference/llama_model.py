"""One GGUF model and its llama.cpp context: the only module that calls llama.cpp.

Not thread-safe, by design: exactly one thread owns a `LlamaModel` (a pool worker's main thread, or
an in-process engine's thread per model). Generation is a batch API that the batcher drives: `admit`
a sequence into a slot, `step` one decode over every slot's next tokens, `release` the slot. The
scheduling, text assembly, stop strings and length checks are the batcher's. The low-level API is
used instead of `llama_cpp.Llama` because that class cannot batch sequences or take a per-request
repeat window or seed.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

import llama_cpp as L
import numpy as np

from ..errors import InvalidInput, LLMError
from . import chat_template
from .types import SamplingParams

log = logging.getLogger("amphibia.model")

_backend_ready = False


_recent_log: deque[str] = deque(maxlen=8)  # llama.cpp's last lines: a grammar's parse error is said there
DEAD_END = -1  # `step`'s token where a sequence's grammar allows no token at all
TOP_FIRST = 256  # constrained sampling tries the grammar on this many most likely tokens first


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: int) -> None:
    # llama.cpp logs every tensor at load; keep a module-level reference (ctypes needs it alive).
    line = text.decode(errors="replace")
    _recent_log.append(line)
    if os.environ.get("AMPHIBIA_LLAMA_LOG"):
        print(line, end="")


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


# llama.cpp's AMX weight repacking (an "extra buffer type") crashes in ggml_backend_amx_mul_mat on the
# first decode with llama-cpp-python 0.3.36 built natively on an AMX CPU (measured: SIGSEGV on this
# project's machines). Without the extra buffers the same build decodes with its AVX-512 kernels.
# Elsewhere the extra buffers (e.g. CPU repacking) stay on.
USE_EXTRA_BUFFERS = not _cpu_has_amx()


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True


class _LoadProgress:
    """Logs a model load every quarter, so a multi-GB first load is not minutes of silence."""

    def __init__(self, path: Path) -> None:
        self.path, self.started, self.next = path, time.monotonic(), 0.25
        size = path.stat().st_size / 2**20 if path.is_file() else 0
        log.info("loading %s (%.0f MB)", path.name, size)
        self.callback = L.llama_progress_callback(self._progress)

    def _progress(self, fraction: float, _user: Any) -> bool:
        if fraction >= self.next and fraction < 1.0:
            log.info("loading %s: %d%% (%.1f s)", self.path.name, int(fraction * 100), time.monotonic() - self.started)
            while self.next <= fraction:
                self.next += 0.25
        return True  # go on

    def done(self) -> None:
        log.info("loaded %s in %.1f s", self.path.name, time.monotonic() - self.started)


class LlamaModel:
    def __init__(self, path: Path, n_ctx: int = 2048, gpu_layers: int = 0, threads: int = 2, slots: int = 1,
                 flash_attn: bool | None = None, embeddings_only: bool = False) -> None:
        """`n_ctx` is per sequence; `slots` sequences share one context, each in its own KV stream.
        `embeddings_only` (an embedding model): one embedding context with the model's own pooling,
        and no generation context (nor its KV memory)."""
        _init_backend()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        mparams.use_extra_bufts = USE_EXTRA_BUFFERS
        progress = _LoadProgress(path)
        mparams.progress_callback = progress.callback  # kept alive by `progress` until the load returns
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        progress.done()
        if not self.model:
            raise LLMError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_ctx = n_ctx
        self.gpu_layers = gpu_layers
        self.flash_attn = flash_attn
        self.threads = threads
        self.slots = slots
        self.embeddings_only = embeddings_only
        self.ctx = self._context(embeddings=embeddings_only)
        self.n_batch: int = L.llama_n_batch(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._samplers: dict[int, Any] = {}  # slot -> its sequence's sampler chain
        self._grammars: dict[int, Any] = {}  # slot -> its sequence's grammar sampler (constrained output)
        self._candidates: Any = None  # the token-data array constrained sampling fills (made on first use)
        self._one: Any = None  # and the one-token array that checks a sampled token against a grammar
        # An embedding model's one context; a generation model's is made on its first embed.
        self._embed_ctx: L.llama_context_p | None = self.ctx if embeddings_only else None
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
        # Flash attention: llama.cpp's choice unless the model says. On CPUs it makes small prompt
        # chunks cost more the longer the context: a 32-token chunk at position 1,000 took 412 ms with
        # it, 125 ms without; 16 sequences decoding at position 200 took 93 ms with it, 74 ms without
        # (measured here, SmolLM2-135M, 2 threads). Its numbers differ, so greedy texts differ too.
        if self.flash_attn is not None:
            cparams.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                       else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if embeddings:
            cparams.embeddings = True
            # An embedding model pools as its GGUF says (mean for all-MiniLM-L6-v2); any other: mean.
            cparams.pooling_type = (L.LLAMA_POOLING_TYPE_UNSPECIFIED if self.embeddings_only
                                    else L.LLAMA_POOLING_TYPE_MEAN)
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

    def prompt_tokens(self, prompt: str | None, messages: Sequence[Mapping[str, str]] | None = None,
                      resume_text: str = "") -> tuple[list[int], int]:
        """The tokens to prefill (the prompt, or `messages` in the model's chat template, then
        `resume_text`) and how many of them are the prompt's; InvalidInput if they do not fit."""
        if messages is not None:
            prompt = chat_template.render(self.chat_template, messages, self.bos_token, self.eos_token)
        tokens = self.tokenize(prompt or "", add_special=True, parse_special=True)
        if not tokens:
            raise InvalidInput("prompt is empty")
        n_prompt = len(tokens)
        if resume_text:
            tokens += self.tokenize(resume_text, add_special=False, parse_special=False)
        if len(tokens) >= self.n_ctx:
            raise InvalidInput(f"prompt is {len(tokens)} tokens; the model's context holds {self.n_ctx}")
        return tokens, n_prompt

    # --- generation: the batch API ------------------------------------------------------------------
    def admit(self, slot: int, params: SamplingParams, remembered: Sequence[int] = (), source: int | None = None,
              keep: int = 0) -> None:
        """Make `slot` ready for a new sequence: its KV holds the first `keep` positions of what
        `source` (default: `slot` itself) holds, nothing after, and a fresh sampler has already seen
        `remembered` (resumed text, so the repeat penalty counts it). Copying from another slot
        costs one copy of that slot's KV buffer (milliseconds), far less than prefilling again."""
        self.release(slot)
        memory = L.llama_get_memory(self.ctx)
        if keep > 0 and source is not None and source != slot:
            # Each slot is its own KV stream: llama.cpp copies a whole stream, then the tail goes.
            L.llama_memory_seq_rm(memory, slot, -1, -1)
            L.llama_memory_seq_cp(memory, source, slot, -1, -1)
        L.llama_memory_seq_rm(memory, slot, keep, -1)
        grammar = self._grammar(params.grammar) if params.grammar else None
        if grammar is not None:
            for token in remembered:  # resumed: the grammar goes on from the text already delivered
                if not self._allows(grammar, token):
                    L.llama_sampler_free(grammar)
                    raise InvalidInput("the text already delivered does not fit the grammar")
                L.llama_sampler_accept(grammar, token)
            self._grammars[slot] = grammar
        sampler = self._sampler(params)
        for token in remembered:
            L.llama_sampler_accept(sampler, token)
        self._samplers[slot] = sampler

    def step(self, feeds: Sequence[tuple[int, int, int, bool]]) -> list[tuple[int, bytes, bool]]:
        """One decode of `feeds`, each (slot, token, position, wants_logits), at most `n_batch` of them.
        Returns, for each feed that wanted logits and in their order, the token its slot's sampler
        picks next: (token, its bytes, whether it ends the generation).

        The feeds go to llama.cpp in groups, one decode per number of tokens a sequence takes (all
        single-token decodes together, equal prompt chunks together). With a KV stream per sequence,
        llama.cpp splits a mixed batch into micro-batches that take the same number of tokens from
        each sequence, so 8 decodes plus a 32-token chunk ran as 32 graph evaluations."""
        per_slot: dict[int, list[int]] = {}
        for i, feed in enumerate(feeds):
            per_slot.setdefault(feed[0], []).append(i)
        by_count: dict[int, list[int]] = {}  # sequences taking the same number of tokens decode together
        for idx in per_slot.values():
            by_count.setdefault(len(idx), []).extend(idx)
        # Within a group, sequences in slot order: given them in another order (the batcher's order is
        # admission order), llama.cpp's split of a batch over KV streams ran 16 single-token decodes
        # at 180 ms instead of 75 ms (measured: every second burst of 16 arrivals ran at half speed).
        groups = [sorted(idx, key=lambda i: (feeds[i][0], feeds[i][2])) for _, idx in sorted(by_count.items())]
        picked: dict[int, tuple[int, bytes, bool]] = {}
        for group in groups:
            self._decode(self.ctx, [feeds[i] for i in group])
            for j, i in enumerate(group):
                slot, _token, _pos, logits = feeds[i]
                if logits:
                    if slot in self._grammars:
                        token = self._sample_constrained(slot, j)
                        if token == DEAD_END:
                            picked[i] = (DEAD_END, b"", True)
                            continue
                    else:
                        token = L.llama_sampler_sample(self._samplers[slot], self.ctx, j)
                    picked[i] = (token, self.piece(token), bool(L.llama_vocab_is_eog(self.vocab, token)))
        return [picked[i] for i in sorted(picked)]

    def release(self, slot: int) -> None:
        """Free `slot`'s sampler. Its KV stays: a later sequence with the same prefix (the app's
        system prompt, a preempted sequence resuming) starts from it (see `admit`)."""
        sampler = self._samplers.pop(slot, None)
        if sampler is not None:
            L.llama_sampler_free(sampler)
        grammar = self._grammars.pop(slot, None)
        if grammar is not None:
            L.llama_sampler_free(grammar)

    def _decode(self, ctx: L.llama_context_p, feeds: Sequence[tuple[int, int, int, bool]]) -> None:
        if len(feeds) > self.n_batch:
            raise LLMError(f"{len(feeds)} tokens do not fit a batch of {self.n_batch}")
        batch = self.batch
        for i, (slot, token, pos, logits) in enumerate(feeds):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        batch.n_tokens = len(feeds)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise LLMError(f"llama_decode returned {rc}")

    def _sampler(self, params: SamplingParams) -> L.llama_sampler_p:
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

    # --- constrained output --------------------------------------------------------------------------
    def _grammar(self, gbnf: str) -> Any:
        """llama.cpp's grammar sampler for `gbnf`, or InvalidInput with its parser's complaint."""
        _recent_log.clear()
        grammar = L.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if not grammar:
            said = " ".join(line.strip() for line in _recent_log if line.strip())[:300]
            raise InvalidInput(f"the grammar does not parse{': ' + said if said else ''}")
        return grammar

    def _fill(self, logits: Any) -> Any:
        """The candidates array (every token with its logit) for one sampling, refilled each time:
        samplers sort and cut it in place."""
        n = self.n_vocab
        if self._candidates is None:
            self._candidates = (L.llama_token_data * n)()
            self._view = np.frombuffer(self._candidates, dtype=np.dtype(
                [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(n, dtype=np.int32)
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(logits, shape=(n,))
        self._view["p"] = 0.0
        return L.llama_token_data_array(data=ctypes.cast(self._candidates, L.llama_token_data_p), size=n,
                                        selected=-1, sorted=False)

    def _allows(self, grammar: Any, token: int) -> bool:
        """Whether `grammar` allows `token` next: one candidate, checked on every constrained token, so
        its array is made once."""
        if self._one is None:
            self._one = (L.llama_token_data * 1)()
            self._one_arr = L.llama_token_data_array(data=ctypes.cast(self._one, L.llama_token_data_p), size=1,
                                                     selected=-1, sorted=False)
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        L.llama_sampler_apply(grammar, ctypes.byref(self._one_arr))
        return math.isfinite(self._one[0].logit)

    def _sample_constrained(self, slot: int, j: int) -> int:
        """llama.cpp's common sampler, grammar second: sample as usual and keep the token if the
        grammar allows it (the common case: one check instead of the whole vocabulary); otherwise
        mask the vocabulary with the grammar and sample again. A token the grammar rejects is never
        accepted into it (llama.cpp aborts the process on that), and a grammar that allows no token
        at all ends the sequence (DEAD_END) instead of sampling from nothing."""
        chain, grammar = self._samplers[slot], self._grammars[slot]
        logits = L.llama_get_logits_ith(self.ctx, j)
        arr = self._fill(logits)
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        token = self._candidates[arr.selected].id
        if not self._allows(grammar, token):
            token = self._resample(chain, grammar, logits)
            if token == DEAD_END:
                return DEAD_END
        L.llama_sampler_accept(chain, token)
        if not L.llama_vocab_is_eog(self.vocab, token):  # the end is allowed, not accepted: it ends
            L.llama_sampler_accept(grammar, token)
        return token

    def _resample(self, chain: Any, grammar: Any, logits: Any) -> int:
        """The chain's pick among the tokens the grammar allows. The grammar is tried on the
        TOP_FIRST most likely tokens first (masking the whole vocabulary costs about 6 ms per
        sequence here, the top 256 a few tens of microseconds); only if it allows none of them is it
        applied to every token. For greedy decoding this is exactly the most likely allowed token;
        sampling then draws from the allowed tokens among the top ones, whose probability mass is
        all but the whole of what the full vocabulary would give."""
        values = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        top = np.argpartition(values, -TOP_FIRST)[-TOP_FIRST:] if self.n_vocab > TOP_FIRST else np.arange(self.n_vocab)
        few = (L.llama_token_data * len(top))()
        view = np.frombuffer(few, dtype=self._view.dtype)
        view["id"], view["logit"], view["p"] = top, values[top], 0.0
        arr = L.llama_token_data_array(data=ctypes.cast(few, L.llama_token_data_p), size=len(top), selected=-1,
                                       sorted=False)
        L.llama_sampler_apply(grammar, ctypes.byref(arr))
        if np.isfinite(view["logit"][:arr.size]).any():
            L.llama_sampler_apply(chain, ctypes.byref(arr))
            return few[arr.selected].id
        arr = self._fill(logits)
        L.llama_sampler_apply(grammar, ctypes.byref(arr))
        if not np.isfinite(self._view["logit"]).any():
            return DEAD_END
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        return self._candidates[arr.selected].id

    # --- embeddings -------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Pooled (see `_context`), L2-normalised vectors (cosine similarity is then a dot product), and the
        number of tokens they took."""
        if self._embed_ctx is None:
            self._embed_ctx = self._context(embeddings=True)
        ctx = self._embed_ctx
        n_embd = L.llama_model_n_embd(self.model)
        vectors, used = [], 0
        for text in texts:
            tokens = self.tokenize(text, add_special=True, parse_special=False) or [L.llama_vocab_bos(self.vocab)]
            if len(tokens) > self.n_batch:
                raise InvalidInput(f"text of {len(tokens)} tokens is longer than the {self.n_batch} an embedding takes")
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            self._decode(ctx, [(0, token, i, True) for i, token in enumerate(tokens)])
            ptr = L.llama_get_embeddings_seq(ctx, 0)
            if not ptr:
                raise LLMError("llama.cpp returned no embedding")
            vec = [float(ptr[i]) for i in range(n_embd)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vectors.append([v / norm for v in vec])
            used += len(tokens)
        return vectors, used

    def close(self) -> None:
        for slot in list(self._samplers):
            L.llama_sampler_free(self._samplers.pop(slot))
        L.llama_batch_free(self.batch)
        if self._embed_ctx is not None and self._embed_ctx is not self.ctx:
            L.llama_free(self._embed_ctx)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
