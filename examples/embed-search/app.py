"""Semantic search: embeds documents and ranks them by cosine similarity to a query.

POST {"query": "...", "documents": [...]} (documents optional: a small built-in set is used).
"""
from amphibia_guest import App, HTTPError, Request, Response, llm

app = App()
DOCUMENTS = [
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Python is a programming language loved for its readability.",
    "WebAssembly runs compiled code safely inside web browsers and servers.",
    "Frogs are amphibians that live both in water and on land.",
    "A GPU accelerates the matrix multiplications of neural networks.",
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


@app.route("/", methods=["GET", "POST"])
def search(req: Request) -> Response:
    if req.method == "GET":
        query, documents, top = req.args.get("q", ""), DOCUMENTS, 3
    else:
        data = req.json()
        if not isinstance(data, dict):
            raise HTTPError(400, "expected a JSON object with 'query'", "invalid_input")
        query, documents, top = data.get("query", ""), data.get("documents") or DOCUMENTS, int(data.get("top", 3))
    if not isinstance(query, str) or not query.strip():
        raise HTTPError(400, "'query' must be a non-empty string", "invalid_input")
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise HTTPError(400, "'documents' must be a list of strings", "invalid_input")
    vectors = llm.embed([query, *documents])
    scored = sorted(
        ({"document": doc, "score": round(cosine(vectors[0], vec), 4)} for doc, vec in zip(documents, vectors[1:])),
        key=lambda r: r["score"],
        reverse=True,
    )
    return Response.json({"query": query, "results": scored[: max(1, top)], "dimensions": len(vectors[0])})
