"""The inference service over the in-process engine with the real model: greedy text, sampling, stop
strings, cancel, embeddings, and the checks every entrance relies on."""
from __future__ import annotations

from pathlib import Path

import pytest

from amphibia.config import AppSpec
from amphibia.errors import InvalidInput, ModelNotAllowed, ModelNotSupported
from amphibia.inference import chat_template
from amphibia.inference.service import InferenceService
from amphibia.inference.text import TextAssembler
from amphibia.inference.types import SamplingParams

FRANCE = ({"role": "user", "content": "What is the capital of France? Answer in two sentences."},)


def generate(service: InferenceService, caller: AppSpec, **kw) -> tuple[str, object]:
    params = kw.pop("params", SamplingParams(temperature=0.0, max_tokens=32))
    out = service.stream(caller, service.generation(caller, model="smollm2", params=params, **kw)).collect()
    return out.text, out


def test_greedy_chat_is_the_known_answer(service: InferenceService, caller: AppSpec) -> None:
    text, out = generate(service, caller, messages=FRANCE)
    assert text == "The capital of France is Paris."
    assert out.usage.prompt_tokens == 42 and out.usage.generated_tokens == 7 and out.finish_reason == "stop"


def test_max_tokens_and_length_finish(service: InferenceService, caller: AppSpec) -> None:
    _, out = generate(service, caller, prompt="Once upon a time", params=SamplingParams(temperature=0.0, max_tokens=5))
    assert out.usage.generated_tokens == 5 and out.finish_reason == "length"


def test_seed_makes_sampling_repeatable(service: InferenceService, caller: AppSpec) -> None:
    params = SamplingParams(temperature=0.9, max_tokens=24, seed=1234)
    first, _ = generate(service, caller, prompt="My favourite animal is", params=params)
    second, _ = generate(service, caller, prompt="My favourite animal is", params=params)
    assert first == second and first


def test_stop_string_ends_generation(service: InferenceService, caller: AppSpec) -> None:
    text, out = generate(service, caller, messages=FRANCE, params=SamplingParams(temperature=0.0, max_tokens=32, stop=("Paris",)))
    assert text == "The capital of France is " and out.finish_reason == "stop"


def test_cancel_stops_generation_early(service: InferenceService, caller: AppSpec) -> None:
    stream = service.stream(caller, service.generation(caller, model="smollm2", prompt="Count from one to one hundred:",
                                                       params=SamplingParams(temperature=0.0, max_tokens=300)))
    assert stream.next_piece() and stream.next_piece()
    stream.cancel()
    while stream.next_piece() is not None:
        pass
    assert stream.usage is not None and stream.usage.generated_tokens < 50


def test_prompt_longer_than_context_is_invalid(service: InferenceService, caller: AppSpec) -> None:
    stream = service.stream(caller, service.generation(caller, model="smollm2", prompt="frog " * 3000))
    with pytest.raises(InvalidInput, match="context"):
        stream.collect()


def test_unknown_model_and_bad_params(service: InferenceService, caller: AppSpec) -> None:
    with pytest.raises(ModelNotSupported):
        service.generation(caller, model="nope", prompt="hi")
    with pytest.raises(InvalidInput, match="top_p"):
        service.generation(caller, model="smollm2", prompt="hi", params=SamplingParams(top_p=1.5))
    with pytest.raises(InvalidInput, match="role"):
        service.generation(caller, model="smollm2", messages=({"role": "bot", "content": "x"},))


def test_one_model_rule_and_utf8_checks(service: InferenceService, caller: AppSpec) -> None:
    """What every entrance relies on: the caller's default model for "", one error for a served model
    the caller may not use, and text that is not valid UTF-8 refused before any engine sees it."""
    plain = AppSpec(name="plain", path=Path("."))  # only its default model
    assert service.resolve_model(plain, "") == plain.model == "smollm2"
    with pytest.raises(ModelNotAllowed, match="allowed_models"):
        service.resolve_model(plain, "other")
    for bad in [{"prompt": "\ud800"}, {"messages": [{"role": "user", "content": "a\udfffb"}]},
                {"prompt": "hi", "params": {"stop": ["\ud800"]}}, {"prompt": "hi", "resume_text": "\udc00"}]:
        with pytest.raises(InvalidInput, match="UTF-8"):
            service.generation(caller, model="smollm2", **bad)
    with pytest.raises(InvalidInput, match="UTF-8"):
        service.call_request(caller, "minilm", "embed", {"texts": ["ok", "\ud800"]})
    with pytest.raises(InvalidInput, match="integer"):
        service.generation(caller, model="smollm2", prompt="hi", params={"max_tokens": "ten"})


def test_embeddings_are_normalised_and_meaningful(service: InferenceService, caller: AppSpec) -> None:
    vectors, used = service.embed(caller, "minilm", ["The cat sat on the mat.", "A cat is sitting on a rug.",
                                            "Quarterly revenue grew by eight percent."])
    assert len(vectors) == 3 and len(vectors[0]) == 384 and used > 10
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert abs(dot(vectors[0], vectors[0]) - 1.0) < 1e-4
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_tokenize_detokenize(service: InferenceService, caller: AppSpec) -> None:
    tokens = service.tokenize(caller, "smollm2", "Hello world")
    assert tokens == [19556, 905]
    assert service.detokenize(caller, "smollm2", tokens) == "Hello world"
    with pytest.raises(InvalidInput, match="vocabulary"):
        service.detokenize(caller, "smollm2", [10**9])


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
