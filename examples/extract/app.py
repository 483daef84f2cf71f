"""Extract a contact record from free text: POST "Marie Curie, 34, physicist in Paris ..." and get
{"name": ..., "age": ..., "city": ..., "skills": [...]} back.

The record is a dataclass; `llm.chat(..., schema=Contact)` constrains the model's output to its JSON
schema (the host turns it into a grammar), so the answer always parses, and `out.value` is a Contact.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from amphibia_guest import App, HTTPError, Request, Response, llm

app = App()


@dataclass
class Contact:
    name: str
    age: int | None
    city: str
    role: Literal["scientist", "engineer", "artist", "teacher", "other"]
    skills: list[str] = field(default_factory=list)


# The schema the model must follow: the dataclass's, with bounds a small model needs to stop.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 130}, {"type": "null"}]},
        "city": {"type": "string", "maxLength": 40},
        "role": {"enum": ["scientist", "engineer", "artist", "teacher", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
    },
    "required": ["name", "age", "city", "role", "skills"],
    "additionalProperties": False,
}
PROMPT = "Extract the person's details from this text as JSON (name, age, city, role, skills):\n\n{text}"


def extract(text: str, stream: bool = False) -> Contact:
    messages = [{"role": "user", "content": PROMPT.format(text=text)}]
    if stream:  # the same constraint, streamed
        raw = "".join(llm.chat_stream(messages, max_tokens=200, temperature=0, schema=SCHEMA))
        return Contact(**json.loads(raw))
    out = llm.chat(messages, max_tokens=200, temperature=0, schema=SCHEMA)
    return Contact(**out.value)


@app.route("/", methods=["GET", "POST"])
def root(req: Request) -> Response:
    if req.method == "GET":
        return Response.json({"usage": "POST free text about a person; get a JSON contact record back"})
    text = req.text().strip()
    if not text:
        raise HTTPError(400, "send some text about a person", "invalid_input")
    return Response.json(asdict(extract(text, stream=req.args.get("stream") == "1")))


@app.post("/typed")
def typed(req: Request) -> Response:
    """The dataclass itself as the schema: `out.value` comes back as a Contact."""
    out = llm.chat([{"role": "user", "content": PROMPT.format(text=req.text())}], max_tokens=200, temperature=0,
                   schema=Contact)
    contact = out.value
    assert isinstance(contact, Contact)
    return Response.json(asdict(contact))
