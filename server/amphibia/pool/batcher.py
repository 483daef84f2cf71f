"""Continuous batching on one llama.cpp context, owned by one thread.

Each tick is one `llama_decode` that carries the next token of every generating sequence plus,
within a token budget, chunks of prompts being prefilled, so running sequences keep streaming
while new ones are admitted. A finished, cancelled or preempted sequence frees its KV cells at once
and a waiting one takes its slot in the same tick. Everything here runs on the batcher's thread;
other threads talk to it only through `submit` (a queue) and hear back through `emit`.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import llama_cpp as L

from .. import chat_template
from ..engine import SamplingParams, TextAssembler
from ..errors import AmphibiaError, InvalidInput, LLMError
from ..llama_model import LlamaModel
from . import wire

log = logging.getLogger("amphibia.batcher")
Emit = Callable[[wire.Message], None]


@dataclass
class Sequence:
    id: str
    slot: int
    tokens: list[int]  # prompt (plus resumed text) to prefill
    params: SamplingParams
    sampler: Any
    text: TextAssembler
    generated: int  # counts tokens generated before a resume too
    prompt_tokens: int
    prefilled: int = 0
    pending: int | None = None  # sampled token not yet decoded
    pos: int = 0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.tokens)


@dataclass
class Batcher:
    model: LlamaModel
    emit: Emit
    # Prompt tokens per tick while other sequences are generating: each costs every running sequence
    # ~3 ms of its tick on 2 CPU cores, so long prefills (and resumed sequences) go in small chunks.
    prefill_budget: int = 32
    _inbox: queue.Queue[Any] = field(default_factory=queue.Queue)  # wire messages, _DROP_ALL, None
    _waiting: deque[wire.Assign] = field(default_factory=deque)
    _active: dict[str, Sequence] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    # The ids this batcher holds, republished (one reference swap, atomic under the GIL) after every
    # round of messages, for heartbeats read on the network thread.
    held: tuple[str, ...] = ()

    @property
    def slots(self) -> int:
        return self.model.slots

    def start(self) -> "Batcher":
        """Run the loop in a thread of its own. (A worker process runs it on its main thread instead:
        llama.cpp's OpenMP decode is ~35% slower when called from any other thread.)"""
        self._thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self._thread.start()
        return self

    def submit(self, message: wire.Message | None) -> None:
        """Assign, Call, Cancel or Preempt; None stops the thread. Safe from any thread."""
        self._inbox.put(message)

    def load(self) -> tuple[int, int]:
        """(running, free slots) as of the last tick; read from other threads, a tick stale at most."""
        running = len(self._active)
        return running, max(0, self.slots - running - len(self._waiting))

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The loop; returns once `submit(None)` is received."""
        while True:
            idle = not self._active and not self._waiting
            try:
                message = self._inbox.get(block=idle)
                while True:
                    if message is None:
                        self._drop_all()
                        return
                    self._handle(message)
                    message = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._admit()
            self.held = (*self._active, *(a.id for a in self._waiting))
            if self._active:
                try:
                    self._tick()
                except Exception as exc:  # a broken decode fails its batch, not the worker
                    log.exception("decode failed")
                    for seq in list(self._active.values()):
                        self._finish(seq, error=LLMError(f"decode failed: {exc}"))

    def _handle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Assign):
            self._waiting.append(message)
        elif isinstance(message, wire.Call):
            self._call(message)
        elif message is _DROP_ALL:
            self._drop_all()
        elif isinstance(message, (wire.Cancel, wire.Preempt)):
            for i, waiting in enumerate(self._waiting):
                if waiting.id == message.id:
                    del self._waiting[i]
                    break
            seq = self._active.get(message.id)
            if seq is not None:
                self._release(seq)
            if isinstance(message, wire.Preempt):
                self.emit(wire.Preempted(message.id))

    def _call(self, call: wire.Call) -> None:
        try:
            if call.method == "embed":
                vectors, used = self.model.embed(call.args["texts"])
                value: Any = {"embeddings": vectors, "prompt_tokens": used}
            elif call.method == "tokenize":
                value = self.model.tokenize(call.args["text"], add_special=False, parse_special=False)
            elif call.method == "detokenize":
                value = self.model.detokenize(call.args["tokens"])
            else:
                raise InvalidInput(f"unknown call {call.method!r}")
            self.emit(wire.Result(call.id, value))
        except AmphibiaError as exc:
            self.emit(wire.Failed(call.id, exc.type, exc.message))
        except (KeyError, TypeError) as exc:
            self.emit(wire.Failed(call.id, "invalid_input", f"bad arguments for {call.method}: {exc}"))

    def _admit(self) -> None:
        free = [s for s in range(self.slots) if s not in {q.slot for q in self._active.values()}]
        while self._waiting and free:
            assign = self._waiting.popleft()
            try:
                seq = self._sequence(assign, free[0])
            except AmphibiaError as exc:
                self.emit(wire.Failed(assign.id, exc.type, exc.message))
                continue
            except Exception as exc:
                self.emit(wire.Failed(assign.id, "runtime_error", str(exc)))
                continue
            free.pop(0)
            self._active[seq.id] = seq
            self.emit(wire.Started(seq.id, seq.prompt_tokens))

    def _sequence(self, assign: wire.Assign, slot: int) -> Sequence:
        params = SamplingParams.from_dict(assign.params).validate(self.model.n_ctx)
        prompt = assign.prompt
        if assign.messages is not None:
            prompt = chat_template.render(self.model.chat_template, assign.messages, self.model.bos_token,
                                          self.model.eos_token)
        prompt_ids = self.model.prompt_tokens(prompt or "")
        tokens = prompt_ids
        if assign.resume_text:
            tokens = prompt_ids + self.model.tokenize(assign.resume_text, add_special=False, parse_special=False)
        if len(tokens) >= self.model.n_ctx:
            raise InvalidInput(f"prompt is {len(tokens)} tokens; the model's context holds {self.model.n_ctx}")
        # The slot may hold cells from an earlier user of this context (e.g. LlamaModel.generate).
        L.llama_memory_seq_rm(L.llama_get_memory(self.model.ctx), slot, -1, -1)
        sampler = self.model.sampler(params)
        for token in tokens[len(prompt_ids):]:  # the repeat penalty remembers resumed text
            L.llama_sampler_accept(sampler, token)
        return Sequence(assign.id, slot, tokens, params, sampler, TextAssembler(params.stop),
                        generated=assign.resume_tokens, prompt_tokens=len(prompt_ids))

    def _tick(self) -> None:
        batch = self.model.batch
        n = 0
        wants: list[tuple[Sequence, int]] = []  # sequences to sample after this decode, with batch index
        budget = self.model.n_batch
        for seq in self._active.values():  # generating sequences first: one token each
            if not seq.prefilling and seq.pending is not None:
                self._put(batch, n, seq.pending, seq.pos, seq.slot, True)
                wants.append((seq, n))
                seq.pos += 1
                seq.pending = None
                n += 1
        budget -= n
        if n:
            budget = min(budget, self.prefill_budget)
        # Shortest remaining prefill first: a new short request gets its first token within a tick or
        # two even while a long resumed sequence is being re-prefilled.
        for seq in sorted(self._active.values(), key=lambda q: len(q.tokens) - q.prefilled):
            if not seq.prefilling or budget <= 0:
                continue
            chunk = seq.tokens[seq.prefilled: seq.prefilled + budget]
            for i, token in enumerate(chunk):
                last = seq.prefilled + i == len(seq.tokens) - 1
                self._put(batch, n, token, seq.pos, seq.slot, last)
                if last:
                    wants.append((seq, n))
                seq.pos += 1
                n += 1
            seq.prefilled += len(chunk)
            budget -= len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        rc = L.llama_decode(self.model.ctx, batch)
        if rc != 0:
            raise LLMError(f"llama_decode returned {rc}")
        for seq, index in wants:  # sample each before the next decode overwrites the logits
            self._sample(seq, index)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _sample(self, seq: Sequence, index: int) -> None:
        token = L.llama_sampler_sample(seq.sampler, self.model.ctx, index)
        if L.llama_vocab_is_eog(self.model.vocab, token):
            return self._finish(seq, "stop")
        seq.generated += 1
        piece = seq.text.feed(self.model.piece(token))
        if piece:
            self.emit(wire.Token(seq.id, piece))
        if seq.text.stopped:
            return self._finish(seq, "stop")
        if seq.generated >= seq.params.max_tokens or seq.pos >= self.model.n_ctx:
            return self._finish(seq, "length")
        seq.pending = token

    def _finish(self, seq: Sequence, reason: str = "stop", error: AmphibiaError | None = None) -> None:
        if error is None:
            tail = seq.text.flush()
            if tail:
                self.emit(wire.Token(seq.id, tail))
            self.emit(wire.Done(seq.id, seq.prompt_tokens, seq.generated, reason))
        else:
            self.emit(wire.Failed(seq.id, error.type, error.message))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        L.llama_memory_seq_rm(L.llama_get_memory(self.model.ctx), seq.slot, -1, -1)
        L.llama_sampler_free(seq.sampler)
        self._active.pop(seq.id, None)

    def _drop_all(self) -> None:
        for seq in list(self._active.values()):
            self._release(seq)
        self._waiting.clear()

    def drop_all(self) -> None:
        """Forget every sequence (the gateway went away and will re-place them). Any thread."""
        self._inbox.put(_DROP_ALL)


_DROP_ALL = object()  # an inbox command of the worker's own, not a wire message
