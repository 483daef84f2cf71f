"""Continuous batching: which tokens of which sequences go into each decode of one model.

Each tick is one `model.step` that carries the next token of every generating sequence plus, within
a token budget, chunks of prompts being prefilled, so running sequences keep streaming while new
ones are admitted. A finished, cancelled or preempted sequence frees its slot at once and a waiting
one takes it in the same tick. Token bytes become text here (whole UTF-8 characters, nothing past a
stop string), and here a sequence ends at `max_tokens` or the context's length.

Everything runs on the thread that calls `run` (the one that owns the model); other threads talk to
it only through `submit` (a queue) and hear back through `emit`, in wire messages.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol
from typing import Sequence as Seq

from ...errors import AmphibiaError, InvalidInput, LLMError
from ..text import TextAssembler
from ..types import SamplingParams
from . import jobs, wire

log = logging.getLogger("amphibia.batcher")
Emit = Callable[[wire.Message], object]  # called on the batcher's thread


class Feed(NamedTuple):
    """One token of one slot's sequence in a decode; `logits` asks for the next token after it."""

    slot: int
    token: int
    pos: int
    logits: bool


class BatchModel(Protocol):
    """What the batcher needs of a model (`llama_model.LlamaModel`, or a scripted fake in tests)."""

    n_ctx: int  # tokens per sequence
    n_batch: int  # tokens per step
    slots: int

    def prompt_tokens(self, prompt: str | None, messages: Seq[Mapping[str, str]] | None = None,
                      resume_text: str = "") -> tuple[list[int], int]: ...
    def admit(self, slot: int, params: SamplingParams, remembered: Seq[int] = (), source: int | None = None,
              keep: int = 0) -> None: ...
    def step(self, feeds: Seq[Feed]) -> Seq[tuple[int, bytes, bool]]: ...
    def release(self, slot: int) -> None: ...
    def piece(self, token: int) -> bytes: ...
    def embed(self, texts: Seq[str]) -> tuple[list[list[float]], int]: ...
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def detokenize(self, tokens: Seq[int]) -> str: ...


@dataclass
class Sequence:
    """A generation that holds a slot: prefilling its tokens, then generating one token a tick."""

    id: str
    slot: int
    tokens: list[int]  # prompt (plus resumed text) to prefill
    params: SamplingParams
    text: TextAssembler
    generated: int  # counts tokens generated before a resume too
    prompt_tokens: int
    prefilled: int = 0
    pending: int | None = None  # sampled token not yet decoded
    pos: int = 0
    unsent: list[int] = field(default_factory=list)  # sampled tokens not yet reported in a Token

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.tokens)


@dataclass
class Embedding:
    """An embed call in progress: one text is embedded per turn, between decode ticks."""

    call: wire.Call
    texts: list[str]
    vectors: list[list[float]] = field(default_factory=list)
    used: int = 0


@dataclass
class Batcher:
    model: BatchModel
    emit: Emit
    # Prompt tokens per tick, at most, while other sequences are generating (each costs every running
    # sequence ~3.5 ms of its tick on 2 CPU cores). Within it, the measured costs decide: a tick may
    # spend on prefill about as long as its decodes take (`PREFILL_SHARE`), so a long prompt being
    # admitted slows the running sequences' tokens to about half their speed, not to a crawl.
    prefill_budget: int = 32
    adaptive: bool = True  # size prompt chunks from measured tick costs (off: always `prefill_budget`)
    # Wire messages, _DROP_ALL or None for the loop; given by an owner that queues work before the
    # model is loaded (the in-process engine).
    inbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    # One `tokens` message per tick for all its pieces, emitted as the tick ends (the pool's worker:
    # one frame a step instead of one per sequence); else a `token` message per piece.
    coalesce: bool = False
    _waiting: deque[wire.Assign] = field(default_factory=deque, init=False)
    _active: dict[str, Sequence] = field(default_factory=dict, init=False)
    _embeds: deque[Embedding] = field(default_factory=deque, init=False)
    # The ids this batcher holds, republished (one reference swap, atomic under the GIL) after every
    # round of messages, for heartbeats read on the network thread.
    held: tuple[str, ...] = field(default=(), init=False)
    # Per slot, the tokens its KV holds at positions 0, 1, ... (kept after its sequence ends): a new
    # sequence starts from the longest prefix any slot holds instead of prefilling it again.
    _kv: dict[int, list[int]] = field(default_factory=dict, init=False)
    _freed: dict[int, int] = field(default_factory=dict, init=False)  # slot -> when it was freed (a counter)
    _clock: int = field(default=0, init=False)
    reused_tokens: int = field(default=0, init=False)  # prompt tokens not prefilled thanks to reuse (stats)
    # Moving averages of what ticks cost here: seconds per decode-only tick, per prefilled token.
    _decode_s: float = field(default=0.0, init=False)
    _prefill_s_per_token: float = field(default=0.0, init=False)
    _held: list[wire.Message] | None = field(default=None, init=False)  # a coalescing tick's messages

    @property
    def slots(self) -> int:
        return self.model.slots

    def submit(self, message: wire.Message | None) -> None:
        """Assign, Call, Cancel or Preempt; None stops `run`. Safe from any thread."""
        self.inbox.put(message)

    def drop_all(self) -> None:
        """Forget every sequence (the gateway went away and will re-place them). Any thread."""
        self.inbox.put(_DROP_ALL)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or being embedded (as of the last turn)."""
        return not self._active and not self._waiting and not self._embeds

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The loop; returns once `submit(None)` is received."""
        while self.turn(block=True):
            pass

    def turn(self, block: bool = False) -> bool:
        """Handle every message that has arrived (waiting for one if idle and `block`), admit waiting
        sequences into free slots, then decode one tick. False once `submit(None)` was received."""
        try:
            message = self.inbox.get(block=block and self.idle)
            while True:
                if message is None:
                    self._drop_all()
                    return False
                self._handle(message)
                message = self.inbox.get_nowait()
        except queue.Empty:
            pass
        self._admit()
        self.held = (*self._active, *(a.id for a in self._waiting))
        if self._active:
            try:
                self._tick()
            except Exception as exc:  # a broken decode fails its batch, not the worker
                log.exception("decode failed")
                self._kv.clear()  # what the KV holds is unknown now: reuse nothing
                for seq in list(self._active.values()):
                    self._finish(seq, error=LLMError(f"decode failed: {exc}"))
        if self._embeds:
            self._embed_one()
        return True

    def _handle(self, message: Any) -> None:
        if isinstance(message, wire.Assign):
            self._waiting.append(message)
        elif isinstance(message, wire.Call) and message.method == "embed":
            texts = message.args.get("texts")
            if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
                self._embeds.append(Embedding(message, texts))
            else:
                self.emit(jobs.failed_message(message.id, InvalidInput("embed takes a non-empty list of texts")))
        elif isinstance(message, wire.Call):
            self._call(message)
        elif message is _DROP_ALL:
            self._drop_all()
        elif isinstance(message, (wire.Cancel, wire.Preempt)):
            # A cancelled generation ends with what it used ("cancelled"); a preempted one is resumed
            # later by the broker, which only needs to hear that its slot is free.
            cancel = isinstance(message, wire.Cancel)
            self._embeds = deque(e for e in self._embeds if e.call.id != message.id)
            for i, waiting in enumerate(self._waiting):
                if waiting.id == message.id:
                    del self._waiting[i]
                    if cancel:
                        self.emit(wire.Done(waiting.id, 0, waiting.resume_tokens, "cancelled"))
                    break
            seq = self._active.get(message.id)
            if seq is not None:
                if cancel:
                    self.emit(wire.Done(seq.id, seq.prompt_tokens, seq.generated, "cancelled"))
                self._release(seq)
            if not cancel:
                self.emit(wire.Preempted(message.id))

    def _call(self, call: wire.Call) -> None:
        try:
            if call.method == "tokenize":
                value: Any = self.model.tokenize(call.args["text"], add_special=False, parse_special=False)
            elif call.method == "detokenize":
                value = self.model.detokenize(call.args["tokens"])
            else:
                raise InvalidInput(f"unknown call {call.method!r}")
        except AmphibiaError as exc:
            error = exc
        except (KeyError, TypeError) as exc:
            error = InvalidInput(f"bad arguments for {call.method}: {exc}")
        except Exception as exc:
            log.exception("call %s failed", call.method)
            error = LLMError(f"{call.method} failed: {exc}")
        else:
            self.emit(wire.Result(call.id, value))
            return
        self.emit(jobs.failed_message(call.id, error))

    def _embed_one(self) -> None:
        """One text of the oldest embed call: a running sequence waits at most one text's time."""
        embedding = self._embeds[0]
        try:
            vectors, used = self.model.embed([embedding.texts[len(embedding.vectors)]])
        except Exception as exc:
            self._embeds.popleft()
            if not isinstance(exc, AmphibiaError):
                log.exception("embed failed")
            error = exc if isinstance(exc, AmphibiaError) else LLMError(f"embed failed: {exc}")
            self.emit(jobs.failed_message(embedding.call.id, error))
            return
        embedding.vectors += vectors
        embedding.used += used
        if len(embedding.vectors) == len(embedding.texts):
            self._embeds.popleft()
            self.emit(wire.Result(embedding.call.id, {"embeddings": embedding.vectors, "prompt_tokens": embedding.used}))

    def _admit(self) -> None:
        taken = {seq.slot for seq in self._active.values()}
        free = [slot for slot in range(self.slots) if slot not in taken]
        later: list[wire.Assign] = []  # waiting for a running sequence to prefill the prefix they share
        while self._waiting and free:
            assign = self._waiting.popleft()
            try:
                seq = self._sequence(assign, free)
                if seq is None:
                    later.append(assign)
                    continue
            except AmphibiaError as exc:
                self.emit(jobs.failed_message(assign.id, exc))
                continue
            except Exception as exc:
                log.exception("admitting %s failed", assign.id)
                self.emit(jobs.failed_message(assign.id, LLMError(str(exc))))
                continue
            free.remove(seq.slot)
            self._active[seq.id] = seq
            # What it prefills, not what it reused: that is what the broker charges its app for.
            self.emit(wire.Started(seq.id, seq.prompt_tokens, len(seq.tokens) - seq.prefilled))
        self._waiting.extendleft(reversed(later))

    def _place(self, tokens: list[int], free: list[int]) -> tuple[int, int | None, int]:
        """Where a sequence of `tokens` starts: (free slot, the slot whose KV it starts from, how many
        leading positions it keeps). Its own cache if that is as good; else a copy of the longest
        prefix any slot holds (a running one too), into the free slot whose cache is coldest. At
        least the last token is always prefilled: its logits pick the first new token."""
        def shared(slot: int) -> int:
            return _common(self._kv.get(slot, ()), tokens)

        own = {slot: shared(slot) for slot in free}
        best_free = max(free, key=lambda slot: (own[slot], self._freed.get(slot, -1)))
        source = max(self._kv, key=shared, default=None)
        copied = shared(source) if source is not None else 0
        if source is None or copied < own[best_free] + MIN_COPY:
            return best_free, best_free, own[best_free]
        coldest = min(free, key=lambda slot: (own[slot] > 0, self._freed.get(slot, -1)))
        return coldest, source, copied

    def _worth_waiting(self, tokens: list[int], free: list[int]) -> bool:
        """Whether a running sequence is still prefilling a prefix that `tokens` share (MIN_COPY more
        than any slot holds now): then starting after it and copying costs a copy, not a prefill.
        Sixteen users of one system prompt arriving at once prefill it once, not sixteen times."""
        held = max((_common(self._kv.get(slot, ()), tokens) for slot in (*free, *self._kv)), default=0)
        return any(seq.prefilled < _common(seq.tokens, tokens) >= held + MIN_COPY
                   for seq in self._active.values())

    def _sequence(self, assign: wire.Assign, free: list[int]) -> Sequence | None:
        """The sequence `assign` starts, in one of the `free` slots; None if it should start later."""
        params = SamplingParams.from_dict(assign.params).validate(self.model.n_ctx)
        text = TextAssembler(params.stop)
        if assign.resume_ids:  # resumed from its own tokens: the same KV, and the same text state
            tokens, n_prompt = self.model.prompt_tokens(assign.prompt, assign.messages)
            tokens = tokens + assign.resume_ids
            if len(tokens) >= self.model.n_ctx:
                raise InvalidInput(f"prompt is {len(tokens)} tokens; the model's context holds {self.model.n_ctx}")
            for token in assign.resume_ids:  # delivered already: only the assembler's state is wanted
                text.feed(self.model.piece(token))
        else:
            tokens, n_prompt = self.model.prompt_tokens(assign.prompt, assign.messages, assign.resume_text)
        if self._worth_waiting(tokens, free):
            return None
        slot, source, keep = self._place(tokens, free)
        self.model.admit(slot, params, tokens[n_prompt:], source, keep)  # the repeat penalty remembers resumed text
        self._kv[slot] = tokens[:keep]
        self.reused_tokens += keep
        return Sequence(assign.id, slot, tokens, params, text, generated=assign.resume_tokens,
                        prompt_tokens=n_prompt, prefilled=keep, pos=keep)

    def _tick(self) -> None:
        feeds: list[Feed] = []
        sampling: list[Sequence] = []  # whose next token this step picks, in the order of their feeds
        for seq in self._active.values():  # generating sequences first: one token each
            if not seq.prefilling and seq.pending is not None:
                feeds.append(Feed(seq.slot, seq.pending, seq.pos, True))
                sampling.append(seq)
                seq.pos += 1
                seq.pending = None
        budget = self.model.n_batch - len(feeds)
        if feeds:
            budget = min(budget, self._prefill_allowance())
        # Shortest remaining prefill first: a new short request gets its first token within a tick or
        # two even while a long resumed sequence is being re-prefilled.
        decoding = len(feeds)
        first = True
        prefilling = [q for q in self._active.values() if q.prefilling]
        # Several prompts and nothing generating yet (a burst of arrivals): equal chunks, so that they
        # share one decode (see `step`). With sequences generating, the shortest prompt goes first.
        share = min(min(len(q.tokens) - q.prefilled for q in prefilling), budget // len(prefilling)) \
            if len(prefilling) > 1 and decoding == 0 else 0
        for seq in sorted(prefilling, key=lambda q: len(q.tokens) - q.prefilled):
            if budget <= 0:
                continue
            take = share or budget
            if first and not share and len(seq.tokens) - seq.prefilled <= self.prefill_budget:
                # A short prompt goes whole: its first token (what its user waits for) comes a tick
                # sooner, for at most `prefill_budget` tokens of one tick.
                take = min(max(budget, len(seq.tokens) - seq.prefilled), self.model.n_batch - len(feeds))
            first = False
            chunk = seq.tokens[seq.prefilled: seq.prefilled + take]
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            for token in chunk:
                feeds.append(Feed(seq.slot, token, seq.pos, False))
                seq.pos += 1
            if not seq.prefilling:
                feeds[-1] = feeds[-1]._replace(logits=True)
                sampling.append(seq)
        if not feeds:
            return
        prefill = len(feeds) - decoding
        for feed in feeds:  # in the slots' KV once decoded (a failed decode forgets them: `turn`)
            self._kv[feed.slot].append(feed.token)
        started = time.perf_counter()
        picks = self.model.step(feeds)
        self._learn(time.perf_counter() - started, decodes=len(feeds) - prefill, prefill=prefill)
        if len(picks) != len(sampling):
            raise LLMError(f"the model picked {len(picks)} tokens for {len(sampling)} sequences")
        self._held = [] if self.coalesce else None
        try:
            for seq, (token, piece, end) in zip(sampling, picks):
                self._sample(seq, token, piece, end)
        finally:
            self._release_held()

    def _emit(self, message: wire.Message) -> None:
        """Emit now, or at the end of a coalescing tick."""
        if self._held is not None:
            self._held.append(message)
        else:
            self.emit(message)

    def _release_held(self) -> None:
        """A coalescing tick's pieces in one `tokens` message, then the rest (Done, Failed) in order: a
        sequence's pieces still come before its end."""
        held, self._held = self._held, None
        if not held:
            return
        pieces = [m for m in held if isinstance(m, wire.Token)]
        if len(pieces) > 1:
            self.emit(wire.Tokens.of(pieces))
        elif pieces:
            self.emit(pieces[0])
        for message in held:
            if not isinstance(message, wire.Token):
                self.emit(message)

    def _prefill_allowance(self) -> int:
        """Prompt tokens this tick may carry besides its decodes: what fits in PREFILL_SHARE of a
        decode tick at the measured cost per token, within `prefill_budget`, at least MIN_PREFILL."""
        if not self.adaptive or self._decode_s <= 0 or self._prefill_s_per_token <= 0:
            return self.prefill_budget
        fits = int(PREFILL_SHARE * self._decode_s / self._prefill_s_per_token)
        return max(MIN_PREFILL, min(self.prefill_budget, fits))

    def _learn(self, seconds: float, decodes: int, prefill: int) -> None:
        if prefill == 0:
            self._decode_s = seconds if self._decode_s <= 0 else 0.8 * self._decode_s + 0.2 * seconds
        elif decodes == 0 or self._decode_s > 0:
            per_token = max(0.0, seconds - (self._decode_s if decodes else 0.0)) / prefill
            self._prefill_s_per_token = (per_token if self._prefill_s_per_token <= 0
                                         else 0.8 * self._prefill_s_per_token + 0.2 * per_token)

    def _sample(self, seq: Sequence, token: int, piece: bytes, end: bool) -> None:
        if token < 0:  # DEAD_END: its grammar allows no token at all here (a grammar no text can finish)
            return self._finish(seq, error=InvalidInput(
                f"the grammar allows no token after {seq.generated} generated token(s): it cannot be completed"))
        if end:
            return self._finish(seq, "stop")
        seq.generated += 1
        seq.unsent.append(token)
        text = seq.text.feed(piece)
        if text:
            self._send(seq, text)
        if seq.text.stopped:
            return self._finish(seq, "stop")
        if seq.generated >= seq.params.max_tokens or seq.pos >= self.model.n_ctx:
            return self._finish(seq, "length")
        seq.pending = token

    def _finish(self, seq: Sequence, reason: str = "stop", error: AmphibiaError | None = None) -> None:
        if error is None:
            tail = seq.text.flush()
            if tail:
                self._send(seq, tail)
            self._emit(wire.Done(seq.id, seq.prompt_tokens, seq.generated, reason))
        else:
            self._emit(jobs.failed_message(seq.id, error))
        self._release(seq)

    def _send(self, seq: Sequence, text: str) -> None:
        self._emit(wire.Token(seq.id, text, len(seq.unsent), seq.unsent))
        seq.unsent = []

    def _release(self, seq: Sequence) -> None:
        self._active.pop(seq.id, None)
        self.model.release(seq.slot)
        self._clock += 1
        self._freed[seq.slot] = self._clock

    def _drop_all(self) -> None:
        for seq in list(self._active.values()):
            self._release(seq)
        self._waiting.clear()
        self._embeds.clear()


def _common(held: Seq[int], tokens: Seq[int]) -> int:
    """How many leading tokens of `tokens` `held` has at the same positions, short of the last token
    (whose logits a new sequence needs, so it is always decoded again)."""
    n = 0
    for a, b in zip(held, tokens[:len(tokens) - 1]):
        if a != b:
            break
        n += 1
    return n


PREFILL_SHARE = 0.8  # of a decode tick's time that prompt chunks may add to it
MIN_PREFILL = 4  # prompt tokens per tick at least, so a prompt always gets in
MIN_COPY = 16  # a shared prefix this much longer than a slot's own is worth copying another slot's KV for
_DROP_ALL = object()  # an inbox command of the worker's own, not a wire message
