"""Render a conversation with the model's own chat template (GGUF `tokenizer.chat_template`).

Rendered with jinja2 the way llama.cpp and llama-cpp-python do (sandboxed, trim_blocks,
lstrip_blocks, `raise_exception`, `strftime_now`), so prompts match what those produce.
"""
from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")

# Used when a GGUF carries no template: ChatML, the most common one.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidInput(f"chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    return env.from_string(source)


def validate_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    if not messages:
        raise InvalidInput("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role not in ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render(template: str | None, messages: Sequence[Any], bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened."""
    try:
        return _compile(template or CHATML).render(
            messages=validate_messages(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=True,
        )
    except jinja2.TemplateError as exc:
        raise InvalidInput(f"chat template failed: {exc}") from None
