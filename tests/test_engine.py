"""The in-process engine with the real model: greedy text, sampling, stop strings, cancel, embeddings."""
from __future__ import annotations

import pytest

from amphibia import chat_template
from amphibia.engine import GenerateRequest, SamplingParams, TextAssembler
from amphibia.errors import InvalidInput, ModelNotSupported
from amphibia.local_engine import LocalEngine

FRANCE = ({"role": "user", "content": "What is the capital of France? Answer in two sentences."},)


def generate(engine: LocalEngine, **kw) -> tuple[str, object]:
    params = kw.pop("params", SamplingParams(temperature=0.0, max_tokens=32))
    out = engine.generate(GenerateRequest(model="smollm2", params=params, **kw)).collect()
    return out.text, out


def test_greedy_chat_is_the_known_answer(engine: LocalEngine) -> None:
    text, out = generate(engine, messages=FRANCE)
    assert text == "The capital of France is Paris."
    assert out.usage.prompt_tokens == 42 and out.usage.generated_tokens == 7 and out.finish_reason == "stop"


def test_max_tokens_and_length_finish(engine: LocalEngine) -> None:
    _, out = generate(engine, prompt="Once upon a time", params=SamplingParams(temperature=0.0, max_tokens=5))
    assert out.usage.generated_tokens == 5 and out.finish_reason == "length"


def test_seed_makes_sampling_repeatable(engine: LocalEngine) -> None:
    params = SamplingParams(temperature=0.9, max_tokens=24, seed=1234)
    first, _ = generate(engine, prompt="My favourite animal is", params=params)
    second, _ = generate(engine, prompt="My favourite animal is", params=params)
    assert first == second and first


def test_stop_string_ends_generation(engine: LocalEngine) -> None:
    text, out = generate(engine, messages=FRANCE, params=SamplingParams(temperature=0.0, max_tokens=32, stop=("Paris",)))
    assert text == "The capital of France is " and out.finish_reason == "stop"


def test_cancel_stops_generation_early(engine: LocalEngine) -> None:
    stream = engine.generate(GenerateRequest(model="smollm2", prompt="Count from one to one hundred:",
                                             params=SamplingParams(temperature=0.0, max_tokens=300)))
    assert stream.next_piece() and stream.next_piece()
    stream.cancel()
    while stream.next_piece() is not None:
        pass
    assert stream.usage is not None and stream.usage.generated_tokens < 50


def test_prompt_longer_than_context_is_invalid(engine: LocalEngine) -> None:
    stream = engine.generate(GenerateRequest(model="smollm2", prompt="frog " * 3000))
    with pytest.raises(InvalidInput, match="context"):
        stream.collect()


def test_unknown_model_and_bad_params(engine: LocalEngine) -> None:
    with pytest.raises(ModelNotSupported):
        engine.generate(GenerateRequest(model="nope", prompt="hi"))
    with pytest.raises(InvalidInput, match="top_p"):
        engine.generate(GenerateRequest(model="smollm2", prompt="hi", params=SamplingParams(top_p=1.5)))
    with pytest.raises(InvalidInput, match="role"):
        engine.generate(GenerateRequest(model="smollm2", messages=({"role": "bot", "content": "x"},)))


def test_embeddings_are_normalised_and_meaningful(engine: LocalEngine) -> None:
    vectors, used = engine.embed("smollm2", ["The cat sat on the mat.", "A cat is sitting on a rug.",
                                             "Quarterly revenue grew by eight percent."])
    assert len(vectors) == 3 and len(vectors[0]) == 576 and used > 10
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert abs(dot(vectors[0], vectors[0]) - 1.0) < 1e-4
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_tokenize_detokenize(engine: LocalEngine) -> None:
    tokens = engine.tokenize("smollm2", "Hello world")
    assert tokens == [19556, 905]
    assert engine.detokenize("smollm2", tokens) == "Hello world"
    with pytest.raises(InvalidInput, match="vocabulary"):
        engine.detokenize("smollm2", [10**9])


@pytest.mark.parametrize("chunks, stop, expected", [
    ([b"Hello", b" wor", b"ld"], (), "Hello world"),
    ([b"Hello", b" ST", b"OP", b" more"], ("STOP",), "Hello "),
    ([b"a S", b"Tx"], ("STOP",), "a STx"),
    ([b"caf\xc3", b"\xa9!"], (), "caf\u00e9!"),
])
def test_text_assembler(chunks: list[bytes], stop: tuple[str, ...], expected: str) -> None:
    asm = TextAssembler(stop)
    out = "".join(asm.feed(c) for c in chunks) + asm.flush()
    assert out == expected


def test_chat_template_renders_chatml_like_llama_cpp() -> None:
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    prompt = chat_template.render(template, [{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidInput):
        chat_template.render("{{ raise_exception('no system messages') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(InvalidInput, match="empty"):
        chat_template.render(None, [])
