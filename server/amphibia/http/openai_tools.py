"""OpenAI's `response_format` and `tools` on /v1/chat/completions, in terms the inference service has:
a JSON schema or a grammar, and messages.

Tool calls work the way llama.cpp's server and llama-cpp-python do it for models without a native
tool format: the tools are described in a system message, and the output is constrained to a call,
`{"name": ..., "arguments": {...}}` with the arguments to that tool's `parameters` schema, so the
arguments always parse and fit. With `tool_choice` "auto" the model may instead answer in text (the
grammar allows text that does not start with `{`), "required" makes it call one of the tools, a named
function makes it call that one, "none" leaves the tools out.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from ..inference import grammar

MAX_TOOLS = 64
TOOL_PROMPT = (
    "You can call these tools (functions). To call one, answer with only a JSON object "
    '{{"name": "<tool name>", "arguments": {{...}}}} whose arguments follow the tool\'s parameters.{choice}\n\n'
    "Tools:\n{tools}"
)


@dataclass
class Plan:
    """What a chat completion request asks of the model beyond plain text."""

    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)  # json_schema or grammar, to merge into the params
    tools: dict[str, dict] = field(default_factory=dict)  # name -> its `function` object
    calls: str = "none"  # "none", "auto" or "required" (a named choice is "required" with one tool)


def plan(data: dict, messages: list[dict[str, Any]]) -> Plan:
    """The messages and constraints for `data` (an OpenAI chat completion request)."""
    out = Plan(messages=_history(messages))
    response_format = data.get("response_format")
    tools = data.get("tools") or []
    choice = data.get("tool_choice", "auto" if tools else "none")
    if tools and choice != "none":
        out.tools, named = _tools(tools, choice)
        out.calls = "required" if (choice == "required" or named) else "auto"
        chosen = {named: out.tools[named]} if named else out.tools
        note = (f" Call the tool {named!r}." if named else " You must call one of them." if choice == "required"
                else " If no tool is needed, answer in plain text instead.")
        out.messages = _with_system(out.messages, TOOL_PROMPT.format(
            choice=note, tools="\n".join(json.dumps(f) for f in out.tools.values())))
        calls = {"anyOf": [_call_schema(name, f) for name, f in chosen.items()]}
        if out.calls == "required":
            out.params["json_schema"] = calls
        else:  # a call, or text that does not start like one
            gbnf = re.sub(r"^root ::=", "tool-call-root ::=", grammar.schema_to_grammar(calls), count=1, flags=re.M)
            out.params["grammar"] = gbnf + '\nroot ::= tool-call-root | free-text-answer\nfree-text-answer ::= [^{ \\t\\n] [^\\x00]*\n'
        if response_format not in (None, {"type": "text"}):
            raise InvalidInput("response_format cannot be combined with tools here")
        return out
    if response_format is None:
        return out
    if not isinstance(response_format, dict):
        raise InvalidInput("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return out
    if kind == "json_object":
        out.params["json_schema"] = {"type": "object"}
        return out
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidInput("response_format.json_schema must be an object with a `schema`")
        out.params["json_schema"] = spec.get("schema") or {"type": "object"}
        return out
    raise InvalidInput(f"response_format.type must be text, json_object or json_schema, not {kind!r}")


def _tools(tools: Any, choice: Any) -> tuple[dict[str, dict], str | None]:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidInput(f"tools must be a list of at most {MAX_TOOLS} tools")
    found: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInput(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidInput(f"tools[{i}].function.parameters must be a JSON schema object")
        found[fn["name"]] = {"name": fn["name"], "description": str(fn.get("description", "")), "parameters": params}
    named = None
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        if named not in found:
            raise InvalidInput(f"tool_choice names {named!r}, which is not among the tools")
    elif choice not in ("auto", "required", "none"):
        raise InvalidInput("tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}")
    return found, named


def _call_schema(name: str, fn: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool turns as plain chat turns the model's template knows: an assistant's calls as the
    JSON it would have written, a tool's result as a user turn that says what it is."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": (c.get("function") or {}).get("name"),
                      "arguments": _arguments((c.get("function") or {}).get("arguments"))}
                     for c in m["tool_calls"] if isinstance(c, dict)]
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        elif role == "tool":
            out.append({"role": "user", "content": f"Tool result ({m.get('name') or m.get('tool_call_id') or 'tool'}): "
                                                   f"{m.get('content')}"})
        elif role == "developer":
            out.append({**m, "role": "system"})
        else:
            out.append(m)
    return out


def _arguments(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_call(plan: Plan, text: str) -> dict | None:
    """The OpenAI `tool_calls` entry for `text` if it is a call to one of the plan's tools, else None."""
    if plan.calls == "none" or not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in plan.tools or not isinstance(call.get("arguments"), dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
