"""The batcher's scheduling and text handling, driven turn by turn against a scripted model (no llama.cpp)."""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import pytest

from amphibia.errors import InvalidInput, LLMError
from amphibia.inference.pool import wire
from amphibia.inference.pool.batcher import Batcher, Feed
from amphibia.inference.types import SamplingParams

EOS = 0


class ScriptedModel:
    """A model whose answers are scripted: a prompt (one token per byte) is followed by its answer's
    pieces, then end of generation. It keeps each slot's tokens like a KV cache and checks that the
    batcher feeds only admitted slots, at the next position, within a batch."""

    def __init__(self, answers: Mapping[str, Sequence[bytes]], slots: int = 4, n_ctx: int = 256,
                 n_batch: int = 64) -> None:
        self.answers = {prompt.encode(): list(pieces) for prompt, pieces in answers.items()}
        self.slots, self.n_ctx, self.n_batch = slots, n_ctx, n_batch
        self.pieces: dict[int, bytes] = {EOS: b""}  # token ids >= 256 stand for an answer's pieces
        for pieces in self.answers.values():
            for piece in pieces:
                self.pieces.setdefault(256 + len(self.pieces), piece)
        self.ids = {piece: token for token, piece in self.pieces.items()}
        self.kv: dict[int, list[int]] = {}  # slot -> tokens decoded so far (kept after a release)
        self.busy: set[int] = set()  # admitted and not released
        self.reused: list[tuple[int, int | None, int]] = []  # (slot, source, keep) per admit
        self.admitted: list[tuple[int, SamplingParams, list[int]]] = []
        self.steps: list[list[Feed]] = []
        self.fail_next_step = False

    def _bytes(self, tokens: Sequence[int]) -> bytes:
        return b"".join(bytes([t]) if 0 < t < 256 else self.pieces[t] for t in tokens)

    # the batch API
    def prompt_tokens(self, prompt: str | None, messages: Sequence[Mapping[str, str]] | None = None,
                      resume_text: str = "") -> tuple[list[int], int]:
        if messages is not None:
            prompt = "".join(m["content"] for m in messages)
        tokens = list((prompt or "").encode())
        if not tokens:
            raise InvalidInput("prompt is empty")
        n_prompt = len(tokens)
        tokens += resume_text.encode()
        if len(tokens) >= self.n_ctx:
            raise InvalidInput(f"prompt is {len(tokens)} tokens; the model's context holds {self.n_ctx}")
        return tokens, n_prompt

    def admit(self, slot: int, params: SamplingParams, remembered: Sequence[int] = (), source: int | None = None,
              keep: int = 0) -> None:
        assert 0 <= slot < self.slots and slot not in self.busy
        held = self.kv.get(slot if source is None else source, [])
        assert keep <= len(held), "a slot can only keep what its source holds"
        self.kv[slot] = list(held[:keep])
        self.busy.add(slot)
        self.admitted.append((slot, params, list(remembered)))
        self.reused.append((slot, source, keep))

    def step(self, feeds: Sequence[Feed]) -> list[tuple[int, bytes, bool]]:
        assert 0 < len(feeds) <= self.n_batch
        self.steps.append(list(feeds))
        if self.fail_next_step:
            self.fail_next_step = False
            raise LLMError("llama_decode returned -3")
        picks = []
        for slot, token, pos, logits in feeds:
            assert slot in self.busy, "only admitted slots are fed"
            assert pos == len(self.kv[slot]), "tokens are fed in order"
            self.kv[slot].append(token)
            if logits:
                picks.append(self._next(self._bytes(self.kv[slot])))
        return picks

    def _next(self, text: bytes) -> tuple[int, bytes, bool]:
        prompt = max((p for p in self.answers if text.startswith(p)), key=len)
        said = b""
        for piece in self.answers[prompt]:
            if said == text[len(prompt):]:
                return self.ids[piece], piece, False
            said += piece
        return EOS, b"", True

    def release(self, slot: int) -> None:
        self.busy.discard(slot)  # its KV stays, for a later sequence with the same prefix

    def piece(self, token: int) -> bytes:
        return self._bytes([token])

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return [[1.0, 0.0] for _ in texts], sum(len(t) for t in texts)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode())

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._bytes(tokens).decode(errors="replace")


LONG = [b" tick"] * 40


def assign(id: str, prompt: str | None, **params: object) -> wire.Assign:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    return wire.Assign(id=id, model="m", params=dict(params), prompt=prompt)


def setup(answers: Mapping[str, Sequence[bytes]], **kw: int) -> tuple[ScriptedModel, Batcher, list[Any]]:
    budget = kw.pop("prefill_budget", 32)
    model = ScriptedModel(answers, **kw)
    out: list[Any] = []
    # A scripted model's ticks take microseconds at random: chunk sizes come from `prefill_budget`.
    return model, Batcher(model, out.append, prefill_budget=budget, adaptive=False), out


def until_idle(batcher: Batcher, turns: int = 1000) -> None:
    for _ in range(turns):
        batcher.turn()
        if batcher.idle:
            return
    raise AssertionError("the batcher did not finish")


def text_of(out: list[Any], id: str) -> str:
    return "".join(m.text for m in out if isinstance(m, wire.Token) and m.id == id)


def end_of(out: list[Any], id: str) -> Any:
    ends = [m for m in out if isinstance(m, (wire.Done, wire.Failed)) and m.id == id]
    assert len(ends) == 1, ends
    return ends[0]


def test_tokens_stream_and_done_counts_them() -> None:
    model, batcher, out = setup({"hi": [b"Hel", b"lo", b"!"]})
    batcher.submit(assign("a", "hi"))
    until_idle(batcher)
    hel, lo, bang = (model.ids[p] for p in (b"Hel", b"lo", b"!"))
    assert out == [wire.Started("a", 2, 2), wire.Token("a", "Hel", 1, [hel]), wire.Token("a", "lo", 1, [lo]),
                   wire.Token("a", "!", 1, [bang]), wire.Done("a", 2, 3, "stop")]


def test_a_generation_resumed_from_its_token_ids_goes_on_exactly() -> None:
    """Tokens whose bytes are held (half a UTF-8 character) travel with the next piece; a worker that
    resumes from the delivered ids rebuilds the same KV and the same held text, so nothing is lost,
    repeated or re-tokenized differently."""
    answer = {"q": [b"caf", b"\xc3", b"\xa9", b" ok"]}
    model, first, out = setup(answer)
    first.submit(assign("a", "q"))
    until_idle(first)
    tokens = [m for m in out if isinstance(m, wire.Token)]
    assert [(t.text, t.n) for t in tokens] == [("caf", 1), ("\u00e9", 2), (" ok", 1)]
    for delivered in (1, 2):  # the worker died after one piece, or after two
        _, second, again = setup(answer)
        ids = [i for t in tokens[:delivered] for i in t.ids]
        text = "".join(t.text for t in tokens[:delivered])
        second.submit(wire.Assign(id="a", model="m", params={"temperature": 0.0, "max_tokens": 16}, prompt="q",
                                  resume_text=text, resume_tokens=len(ids), resume_ids=ids))
        until_idle(second)
        assert text + text_of(again, "a") == "caf\u00e9 ok"
        assert end_of(again, "a") == wire.Done("a", 1, 4, "stop")


def test_max_tokens_ends_with_length() -> None:
    _, batcher, out = setup({"hi": [b"Hel", b"lo", b"!"]})
    batcher.submit(assign("a", "hi", max_tokens=2))
    until_idle(batcher)
    assert text_of(out, "a") == "Hello" and end_of(out, "a") == wire.Done("a", 2, 2, "length")


def test_the_context_length_ends_a_generation() -> None:
    _, batcher, out = setup({"hello": LONG}, n_ctx=8)
    batcher.submit(assign("a", "hello", max_tokens=8))
    until_idle(batcher)
    # 5 prompt tokens, then each generated token but the last takes a position: 8 positions in all
    assert end_of(out, "a") == wire.Done("a", 5, 4, "length")


@pytest.mark.parametrize("pieces, stop, shown, generated", [
    ([b"The answer", b" is 42.", b" More"], "42", "The answer is ", 2),
    ([b"The answer", b" is 4", b"2.", b" More"], "42", "The answer is ", 3),  # split across tokens
    ([b"a S", b"Tx", b" ok"], "STOP", "a STx ok", 3),  # held back, then released
])
def test_a_stop_string_cuts_the_text(pieces: list[bytes], stop: str, shown: str, generated: int) -> None:
    _, batcher, out = setup({"q": pieces})
    batcher.submit(assign("a", "q", stop=[stop]))
    until_idle(batcher)
    streamed = ""
    for m in out:
        if isinstance(m, wire.Token):
            streamed += m.text
            assert shown.startswith(streamed), "nothing past the stop string is ever sent"
    assert streamed == shown
    assert end_of(out, "a") == wire.Done("a", 1, generated, "stop")  # generation ends at the stop string


def test_multibyte_characters_split_across_tokens_come_out_whole() -> None:
    _, batcher, out = setup({"q": [b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x90", b"\xb8!"]})
    batcher.submit(assign("a", "q"))
    until_idle(batcher)
    tokens = [m.text for m in out if isinstance(m, wire.Token)]
    assert "".join(tokens) == "café 🐸!" and "\ufffd" not in "".join(tokens)
    assert all(tokens), "a token that completes no character sends nothing"
    assert end_of(out, "a") == wire.Done("a", 1, 5, "stop")


def test_generating_sequences_take_one_token_a_tick_while_a_long_prompt_prefills_in_chunks() -> None:
    model, batcher, out = setup({"a": LONG, "b" * 10: [b"B"]}, prefill_budget=4, n_batch=16)
    batcher.submit(assign("a", "a"))
    batcher.turn()  # a's prompt, and its first token picked
    batcher.submit(assign("b", "b" * 10))
    for _ in range(4):
        batcher.turn()
    slot_a, slot_b = model.admitted[0][0], model.admitted[1][0]
    for step, prefill in zip(model.steps[1:], (4, 4, 2, 0)):
        assert [f for f in step if f.slot == slot_a] == [step[0]] and step[0].logits  # a first, one token
        assert len([f for f in step if f.slot == slot_b]) == (prefill or 1)
    assert [f.logits for f in model.steps[3] if f.slot == slot_b] == [False, True]  # logits for the last only
    assert text_of(out, "b") == "B"


def test_a_lone_prompt_prefills_a_whole_batch_at_a_time() -> None:
    model, batcher, out = setup({"p" * 20: [b"ok"]}, prefill_budget=4, n_batch=16)
    batcher.submit(assign("a", "p" * 20))
    until_idle(batcher)
    assert [len(step) for step in model.steps] == [16, 4, 1]
    assert text_of(out, "a") == "ok"


def test_the_shortest_remaining_prefill_goes_first() -> None:
    model, batcher, _ = setup({"a": LONG, "b" * 12: [b"B"], "ccc": [b"C"]}, prefill_budget=4)
    batcher.submit(assign("a", "a"))
    batcher.turn()
    batcher.submit(assign("b", "b" * 12))
    batcher.submit(assign("c", "ccc"))
    batcher.turn()
    slots = {id: slot for id, (slot, _, _) in zip("abc", model.admitted)}
    assert [f.slot for f in model.steps[1]] == [slots["a"], slots["c"], slots["c"], slots["c"], slots["b"]]


def test_cancel_frees_the_slot_and_a_waiting_sequence_takes_it_in_the_same_tick() -> None:
    model, batcher, out = setup({"a": LONG, "b": [b"B"], "c": [b"C"]}, slots=1)
    batcher.submit(assign("a", "a"))
    batcher.submit(assign("b", "b"))
    batcher.submit(assign("c", "c"))
    batcher.turn()
    assert len(model.busy) == 1 and set(batcher.held) == {"a", "b", "c"}  # one slot, two waiting
    batcher.submit(wire.Cancel("a"))
    batcher.submit(wire.Cancel("c"))  # still waiting: it just goes
    batcher.turn()
    assert wire.Started("b", 1, 1) in out and out[-1].text == "B"
    # Each cancelled request ends with what it used, and nothing after.
    assert [m for m in out if m.id == "c"] == [wire.Done("c", 0, 0, "cancelled")]
    ended_a = [m for m in out if isinstance(m, (wire.Done, wire.Failed)) and m.id == "a"]
    assert len(ended_a) == 1 and ended_a[0].finish_reason == "cancelled"
    until_idle(batcher)
    assert end_of(out, "b") == wire.Done("b", 1, 1, "stop") and model.busy == set()


def test_preempt_frees_the_slot_and_says_so() -> None:
    model, batcher, out = setup({"a": LONG, "b": [b"B"]}, slots=1)
    batcher.submit(assign("a", "a"))
    batcher.submit(assign("b", "b"))
    batcher.turn()
    batcher.submit(wire.Preempt("a"))
    until_idle(batcher)
    assert wire.Preempted("a") in out and end_of(out, "b").finish_reason == "stop"
    assert not [m for m in out if isinstance(m, wire.Done) and m.id == "a"]


def test_a_resumed_sequence_goes_on_after_its_text_and_counts_its_tokens() -> None:
    model, batcher, out = setup({"q": [b"one", b" two", b" three", b" four"]})
    resumed = wire.Assign(id="a", model="m", params={"temperature": 0.0, "max_tokens": 3}, prompt="q",
                          resume_text="one two", resume_tokens=2)
    batcher.submit(resumed)
    until_idle(batcher)
    assert text_of(out, "a") == " three"
    assert end_of(out, "a") == wire.Done("a", 1, 3, "length")
    assert model.admitted[0][2] == list(b"one two")  # the sampler remembers the resumed text


def test_a_bad_assign_fails_only_itself() -> None:
    _, batcher, out = setup({"ok": [b"fine"]}, n_ctx=16)
    batcher.submit(assign("empty", ""))
    batcher.submit(assign("long", "x" * 40))
    batcher.submit(assign("params", "ok", top_p=5.0))
    batcher.submit(assign("good", "ok"))
    until_idle(batcher)
    assert end_of(out, "empty") == wire.Failed("empty", "invalid_input", "prompt is empty")
    assert end_of(out, "long") == wire.Failed("long", "invalid_input",
                                              "prompt is 40 tokens; the model's context holds 16")
    assert end_of(out, "params").error_type == "invalid_input"
    assert text_of(out, "good") == "fine" and end_of(out, "good").finish_reason == "stop"


def test_a_failed_decode_fails_its_batch_and_the_batcher_serves_on() -> None:
    model, batcher, out = setup({"a": LONG, "b": LONG, "c": [b"C"]})
    batcher.submit(assign("a", "a"))
    batcher.submit(assign("b", "b"))
    batcher.turn()
    model.fail_next_step = True
    batcher.turn()
    for id in "ab":
        failed = end_of(out, id)
        assert isinstance(failed, wire.Failed) and failed.error_type == "runtime_error"
        assert "decode failed" in failed.message
    assert batcher.idle and model.busy == set()
    batcher.submit(assign("c", "c"))
    until_idle(batcher)
    assert text_of(out, "c") == "C" and end_of(out, "c").finish_reason == "stop"


def test_calls_answer_with_a_result() -> None:
    _, batcher, out = setup({})
    batcher.submit(wire.Call("t", "m", "tokenize", {"text": "hi"}))
    batcher.submit(wire.Call("d", "m", "detokenize", {"tokens": [104, 105]}))
    batcher.submit(wire.Call("e", "m", "embed", {"texts": ["x"]}))
    batcher.submit(wire.Call("x", "m", "transmogrify", {}))
    batcher.submit(wire.Call("y", "m", "tokenize", {}))
    batcher.turn()
    assert out[:2] == [wire.Result("t", [104, 105]), wire.Result("d", "hi")]
    assert [(m.id, m.error_type) for m in out[2:4]] == [("x", "invalid_input"), ("y", "invalid_input")]
    assert out[4:] == [wire.Result("e", {"embeddings": [[1.0, 0.0]], "prompt_tokens": 1})]


def test_embeddings_interleave_with_decoding() -> None:
    """An embed call takes one text per turn, so running sequences wait at most one text's time."""
    model, batcher, out = setup({"a": LONG})
    batcher.submit(assign("a", "a", max_tokens=40))
    batcher.turn()  # prefill "a"
    batcher.submit(wire.Call("e", "m", "embed", {"texts": ["one", "two", "three"]}))
    for turn in range(3):
        before = len(model.steps)
        batcher.turn()
        assert len(model.steps) == before + 1  # a decode tick in every turn
        assert not [m for m in out if m.id == "e"] or turn == 2
    assert [m for m in out if m.id == "e"] == [
        wire.Result("e", {"embeddings": [[1.0, 0.0]] * 3, "prompt_tokens": 11})]


def test_anything_a_job_raises_fails_that_job_only() -> None:
    """Not only our own errors: whatever the model raises for one request (a lone surrogate's
    UnicodeEncodeError, say) is that request's failure, and the batcher goes on serving."""
    model, batcher, out = setup({"ok": [b"fine"]})

    def broken_tokenize(text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode())  # raises UnicodeEncodeError on a lone surrogate

    model.tokenize = broken_tokenize
    batcher.submit(wire.Call("t", "m", "tokenize", {"text": "\ud800"}))
    batcher.submit(assign("bad", "\udfff"))
    batcher.submit(assign("good", "ok"))
    until_idle(batcher)
    assert end_of(out, "t").error_type == "runtime_error"
    assert end_of(out, "bad").error_type == "runtime_error"
    assert text_of(out, "good") == "fine" and end_of(out, "good").finish_reason == "stop"


def test_drop_all_forgets_everything() -> None:
    model, batcher, out = setup({"a": LONG, "b": LONG}, slots=1)
    batcher.submit(assign("a", "a"))
    batcher.submit(assign("b", "b"))
    batcher.turn()
    batcher.drop_all()
    batcher.turn()
    assert batcher.idle and model.busy == set() and not [m for m in out if isinstance(m, (wire.Done, wire.Failed))]


def test_run_serves_from_its_own_thread_until_told_to_stop() -> None:
    model = ScriptedModel({"hi": [b"Hel", b"lo"]})
    out: list[wire.Message] = []
    done = threading.Event()

    def emit(message: wire.Message) -> None:
        out.append(message)
        if isinstance(message, wire.Done):
            done.set()

    batcher = Batcher(model, emit)
    thread = threading.Thread(target=batcher.run)
    thread.start()
    batcher.submit(assign("a", "hi"))
    assert done.wait(10)
    batcher.submit(None)
    thread.join(10)
    assert not thread.is_alive() and text_of(out, "a") == "Hello"


SYSTEM = "You are a helpful assistant. " * 4  # 116 tokens (bytes) shared by every user of an app


def prefilled(model: ScriptedModel, slot: int | None = None) -> int:
    """Prompt tokens decoded without logits so far (prefill), in `slot` or in all."""
    return sum(1 for step in model.steps for f in step if not f.logits and (slot is None or f.slot == slot))


def test_a_second_request_with_the_same_prefix_prefills_only_what_differs() -> None:
    model, batcher, out = setup({SYSTEM + "Q1": [b"one"], SYSTEM + "Q2": [b"two"]}, slots=2)
    batcher.submit(assign("a", SYSTEM + "Q1"))
    until_idle(batcher)
    before = prefilled(model)
    batcher.submit(assign("b", SYSTEM + "Q2"))
    until_idle(batcher)
    assert text_of(out, "a") == "one" and text_of(out, "b") == "two"
    assert prefilled(model) - before == 0  # only "2" is new, and it is decoded for its logits
    started = [m for m in out if isinstance(m, wire.Started)]
    assert started[1] == wire.Started("b", len(SYSTEM) + 2, 1)  # charged for what it prefilled
    assert model.reused[-1] == (0, 0, len(SYSTEM) + 1)  # its own slot's KV, kept after "a" ended


def test_a_prefix_a_running_sequence_holds_is_copied_into_a_free_slot() -> None:
    model, batcher, out = setup({SYSTEM + "Q1": LONG, SYSTEM + "Q2": [b"two"]}, slots=2)
    batcher.submit(assign("a", SYSTEM + "Q1", max_tokens=40))
    for _ in range(8):
        batcher.turn()
    assert "a" in batcher._active and not batcher._active["a"].prefilling
    batcher.submit(assign("b", SYSTEM + "Q2"))
    until_idle(batcher)
    assert text_of(out, "b") == "two" and text_of(out, "a") == " tick" * 40
    assert model.reused[-1] == (1, 0, len(SYSTEM) + 1)  # slot 1 started from slot 0's KV
    assert prefilled(model, slot=1) == 0


def test_users_arriving_together_prefill_their_shared_prompt_once() -> None:
    answers = {SYSTEM + f"Q{i}": [f"a{i}".encode()] for i in range(4)}
    model, batcher, out = setup(answers, slots=4)
    for i in range(4):
        batcher.submit(assign(f"u{i}", SYSTEM + f"Q{i}"))
    until_idle(batcher)
    assert [text_of(out, f"u{i}") for i in range(4)] == ["a0", "a1", "a2", "a3"]
    assert prefilled(model) == len(SYSTEM) + 1  # the shared part once; each user's last token has logits


def test_a_preempted_sequence_resumes_from_the_kv_its_slot_kept() -> None:
    model, batcher, out = setup({SYSTEM + "Q": LONG}, slots=1)
    batcher.submit(assign("a", SYSTEM + "Q", max_tokens=40))
    for _ in range(12):
        batcher.turn()
    batcher.submit(wire.Preempt("a"))
    batcher.turn()
    tokens = [m for m in out if isinstance(m, wire.Token)]
    ids = [i for t in tokens for i in t.ids]
    before = prefilled(model)
    batcher.submit(wire.Assign(id="a", model="m", params={"temperature": 0.0, "max_tokens": 40}, prompt=SYSTEM + "Q",
                               resume_text="".join(t.text for t in tokens), resume_tokens=len(ids), resume_ids=ids))
    until_idle(batcher)
    assert text_of(out, "a") == " tick" * 40
    assert prefilled(model) - before == 0  # nothing prefilled again: only its last token, for logits


def test_prompt_chunks_shrink_to_what_fits_in_part_of_a_decode_tick() -> None:
    """On a real model the allowance comes from measured costs: a tick may spend on prefill about
    PREFILL_SHARE of what its decodes take, so running sequences keep at least half their speed."""
    from amphibia.inference.pool.batcher import MIN_PREFILL, PREFILL_SHARE

    batcher = Batcher(ScriptedModel({}), lambda m: None, prefill_budget=64)
    assert batcher._prefill_allowance() == 64  # nothing measured yet
    batcher._learn(0.040, decodes=8, prefill=0)  # 8 decodes: 40 ms
    batcher._learn(0.040 + 32 * 0.004, decodes=8, prefill=32)  # 4 ms per prompt token on top
    assert batcher._prefill_allowance() == int(PREFILL_SHARE * 0.040 / 0.004)  # 8 tokens
    batcher._learn(0.001, decodes=1, prefill=0)
    for _ in range(30):
        batcher._learn(0.001, decodes=1, prefill=0)  # decodes got cheap: the allowance follows
    assert batcher._prefill_allowance() == MIN_PREFILL


def test_prompts_arriving_together_prefill_in_equal_chunks_that_share_a_decode() -> None:
    model, batcher, out = setup({"x" * 5: [b"X"], "y" * 9: [b"Y"], "z" * 7: [b"Z"]}, slots=3)
    for prompt in ("x" * 5, "y" * 9, "z" * 7):
        batcher.submit(assign(prompt[0], prompt))
    until_idle(batcher)
    first = model.steps[0]
    counts = {slot: sum(1 for f in first if f.slot == slot) for slot in {f.slot for f in first}}
    assert set(counts.values()) == {5}  # the shortest whole, the others as far: one decode of 3 x 5
    assert [text_of(out, k) for k in "xyz"] == ["X", "Y", "Z"]
