"""Constrained output: a JSON schema becomes a GBNF grammar, and both are checked before any engine
sees them.

The conversion is llama.cpp's own converter as llama-cpp-python ships it (`llama_cpp.llama_grammar`),
extended here with what llama.cpp's C++ converter has and that Python port lacks: integer ranges
(`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), ported from
`common/json-schema-to-grammar.cpp` (`build_min_max_int`). Number (float) ranges are not enforced by
either converter; README says so.

Limits keep a hostile schema or grammar from costing the gateway or a worker more than a refusal:
sizes, nesting (llama.cpp's grammar parser and the converter both recurse), and a converter that
raises is an `invalid_input` naming the problem. Whether llama.cpp can compile the grammar is
checked where the model is (`LlamaModel`), with its parser's message.
"""
from __future__ import annotations

import json
from typing import Any

from llama_cpp import llama_grammar

from ..errors import InvalidInput

MAX_SCHEMA_BYTES = 32 * 1024
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_DEPTH = 64  # nesting of a schema's objects and arrays, and of a grammar's parentheses
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def schema_to_grammar(schema: Any) -> str:
    """The GBNF grammar for `schema` (a JSON schema as a dict or as JSON text)."""
    if isinstance(schema, str):
        if len(schema.encode("utf-8", "replace")) > MAX_SCHEMA_BYTES:
            raise InvalidInput(f"json_schema is over {MAX_SCHEMA_BYTES} bytes")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidInput(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidInput("json_schema must be a JSON object (a schema)")
    text = json.dumps(schema)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidInput(f"json_schema is over {MAX_SCHEMA_BYTES} bytes")
    if _depth(schema) > MAX_DEPTH:
        raise InvalidInput(f"json_schema nests deeper than {MAX_DEPTH} levels")
    try:
        converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        schema = converter.resolve_refs(schema, "")
        converter.visit(schema, "")
        grammar = converter.format_grammar()
    except InvalidInput:
        raise
    except (AssertionError, KeyError, TypeError, ValueError, IndexError, RecursionError, AttributeError) as exc:
        raise InvalidInput(f"json_schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") from None
    return check_grammar(grammar)


def check_grammar(grammar: Any) -> str:
    """`grammar` if it is GBNF text within the limits (llama.cpp parses it where the model is)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise InvalidInput("grammar must be non-empty GBNF text")
    try:
        size = len(grammar.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("grammar is not valid UTF-8 text") from None
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidInput(f"grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are taken")
    if "\x00" in grammar:
        raise InvalidInput("grammar contains a NUL character")
    if not any(line.split("::=")[0].strip() == "root" for line in grammar.splitlines() if "::=" in line):
        raise InvalidInput("grammar has no `root ::= ...` rule")
    if _paren_depth(grammar) > MAX_DEPTH:
        raise InvalidInput(f"grammar nests parentheses deeper than {MAX_DEPTH}")
    return grammar


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _paren_depth(grammar: str) -> int:
    """The deepest nesting of ( ) outside string literals and character classes."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


class _Converter(llama_grammar.SchemaConverter):
    """llama-cpp-python's converter plus integer ranges."""

    def visit(self, schema: Any, name: str) -> str:
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(
                k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            low, high = _int_bounds(schema)
            if low > high:
                raise InvalidInput(f"json_schema: no integer lies in [{low}, {high}]")
            rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
            out: list[str] = []
            _min_max_int(low, high, out)
            return self._add_rule(rule_name, "(" + "".join(out) + ") space")
        return super().visit(schema, name)


def _int_bounds(schema: dict) -> tuple[int, int]:
    def number(key: str) -> float | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, (int, float)):
            raise InvalidInput(f"json_schema: {key} must be a number")
        return value

    import math

    low, high = INT64_MIN, INT64_MAX
    if (v := number("minimum")) is not None:
        low = max(low, math.ceil(v))
    if (v := number("exclusiveMinimum")) is not None:
        low = max(low, math.floor(v) + 1)
    if (v := number("maximum")) is not None:
        high = min(high, math.floor(v))
    if (v := number("exclusiveMaximum")) is not None:
        high = min(high, math.ceil(v) - 1)
    return low, high


def _min_max_int(min_value: int, max_value: int, out: list[str], decimals_left: int = 16,
                 top_level: bool = True) -> None:
    """A port of llama.cpp's build_min_max_int (common/json-schema-to-grammar.cpp), kept line for line
    so it can be compared with the original."""
    has_min, has_max = min_value != INT64_MIN, max_value != INT64_MAX

    def digit_range(a: str, b: str) -> None:
        out.append("[")
        out.append(a if a == b else f"{a}-{b}")
        out.append("]")

    def more_digits(min_digits: int, max_digits: int) -> None:
        out.append("[0-9]")
        if min_digits == max_digits == 1:
            return
        out.append("{")
        out.append(str(min_digits))
        if max_digits != min_digits:
            out.append(",")
            if max_digits != 2**31 - 1:
                out.append(str(max_digits))
        out.append("}")

    def uniform_range(from_: str, to: str) -> None:
        i = 0
        while i < len(from_) and i < len(to) and from_[i] == to[i]:
            i += 1
        if i > 0:
            out.append(f'"{from_[:i]}"')
        if i < len(from_) and i < len(to):
            if i > 0:
                out.append(" ")
            sub_len = len(from_) - i - 1
            if sub_len > 0:
                from_sub, to_sub = from_[i + 1:], to[i + 1:]
                sub_zeros, sub_nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if from_sub == sub_zeros:
                    digit_range(from_[i], chr(ord(to[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{from_[i]}] ")
                    out.append("(")
                    uniform_range(from_sub, sub_nines)
                    out.append(")")
                    if ord(from_[i]) < ord(to[i]) - 1:
                        out.append(" | ")
                        if to_sub == sub_nines:
                            digit_range(chr(ord(from_[i]) + 1), to[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(from_[i]) + 1), chr(ord(to[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(to[i], to[i])
                    out.append(" ")
                    uniform_range(sub_zeros, to_sub)
                out.append(")")
            else:
                out.append(f"[{from_[i]}-{to[i]}]")

    if has_min and has_max:
        if min_value < 0 and max_value < 0:
            out.append('"-" (')
            _min_max_int(-max_value, -min_value, out, decimals_left, True)
            out.append(")")
            return
        if min_value < 0:
            out.append('"-" (')
            _min_max_int(0, -min_value, out, decimals_left, True)
            out.append(") | ")
            min_value = 0
        min_s, max_s = str(min_value), str(max_value)
        for digits in range(len(min_s), len(max_s)):
            uniform_range(min_s, "9" * digits)
            min_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(min_s, max_s)
        return

    less_decimals = max(decimals_left - 1, 1)
    if has_min:
        if min_value < 0:
            out.append('"-" (')
            _min_max_int(INT64_MIN, -min_value, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif min_value == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less_decimals)
            else:
                more_digits(1, decimals_left)
        elif min_value <= 9:
            c = str(min_value)
            range_start = "1" if top_level else "0"
            if c > range_start:
                digit_range(range_start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less_decimals)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less_decimals)
        else:
            min_s = str(min_value)
            length = len(min_s)
            c = min_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(length, less_decimals)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            _min_max_int(int(min_s[1:]), INT64_MAX, out, less_decimals, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(length - 1, less_decimals)
        return

    if has_max:
        if max_value >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less_decimals)
                out.append(" | ")
            _min_max_int(0, max_value, out, decimals_left, True)
        else:
            out.append('"-" (')
            _min_max_int(-max_value, INT64_MAX, out, decimals_left, False)
            out.append(")")
        return

    raise InvalidInput("json_schema: an integer range needs a minimum or a maximum")
