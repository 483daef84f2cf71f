"""The default embedding model (all-MiniLM-L6-v2, converted to GGUF on first use): the conversion, its
numbers against the model's own weights, retrieval quality, one answer wherever it runs (in process
or on a pool worker that `amphibia up` starts when a request first needs it), and model purposes."""
from __future__ import annotations

import json
import math
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from conftest import CACHE, ROOT

from amphibia.config import AppSpec, Config, ModelSpec, PoolConfig, ServerConfig, default_models, load_config
from amphibia.errors import ConfigError, InvalidInput
from amphibia.inference.service import InferenceService
from amphibia.loopback import free_port, serve_in_thread

# Retrieval: each query has one document that answers it, among distractors that share its words
# ("France", "Python", "volcano"). Mean-pooled SmolLM2 states found 6 of 12 here (measured).
DOCUMENTS = {
    "paris": "Paris is the capital of France and is known for the Eiffel Tower.",
    "python": "Python is a programming language loved for its readability.",
    "wasm": "WebAssembly runs compiled code safely inside web browsers and servers.",
    "frogs": "Frogs are amphibians that live both in water and on land.",
    "gpu": "A GPU accelerates the matrix multiplications of neural networks.",
    "bread": "Knead flour, water, yeast and salt into a dough, let it rise, then bake it.",
    "everest": "Mount Everest, between Nepal and China, rises 8,849 metres above sea level.",
    "photosynthesis": "Leaves use sunlight to turn water and carbon dioxide into sugar and oxygen.",
    "football": "Every four years national teams compete for the FIFA World Cup.",
    "mars": "Olympus Mons on Mars is the largest volcano in the solar system.",
    "coffee": "Espresso is brewed by forcing hot water through finely ground coffee under pressure.",
    "vaccines": "Vaccines teach the immune system to recognise a virus without causing the illness.",
    "wine": "France produces famous wines in Bordeaux, Burgundy and Champagne.",
    "snake": "Pythons are large snakes that kill their prey by constriction.",
}
QUERIES = {
    "capital of France": "paris",
    "Which coding language is easy to read?": "python",
    "How can a sandbox execute native-speed programs in a web page?": "wasm",
    "Which creatures start life as tadpoles?": "frogs",
    "What hardware makes training deep learning models faster?": "gpu",
    "How do I make a loaf at home?": "bread",
    "What is the tallest peak on Earth?": "everest",
    "How do plants make their food?": "photosynthesis",
    "When is the next soccer championship between countries?": "football",
    "Where is the biggest volcano among the planets?": "mars",
    "How is a strong Italian coffee prepared?": "coffee",
    "How does an immunisation protect you from disease?": "vaccines",
}
TOKEN = "test-embeddings-token"


def test_retrieval_hit_at_1(service: InferenceService, caller: AppSpec) -> None:
    names = list(DOCUMENTS)
    docs, _ = service.embed(caller, "", [DOCUMENTS[n] for n in names])  # "": the default embedding model
    queries, _ = service.embed(caller, "", list(QUERIES))
    scores = np.array(queries) @ np.array(docs).T
    found = [names[i] for i in scores.argmax(axis=1)]
    hits = sum(f == want for f, want in zip(found, QUERIES.values()))
    assert hits / len(QUERIES) >= 0.8, list(zip(QUERIES, found))
    assert len(docs[0]) == 384 and abs(float(np.dot(docs[0], docs[0])) - 1.0) < 1e-5  # L2-normalised


def test_conversion_is_cached_and_matches_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written once into the cache (no half-written file left), found again at once, and the vectors
    llama.cpp computes from it equal a plain numpy BERT over the package's own weights."""
    from amphibia.inference.llama_model import LlamaModel

    monkeypatch.setenv("AMPHIBIA_MODEL_CACHE", str(tmp_path))
    spec = default_models()["minilm"]
    started = time.monotonic()
    path = spec.gguf_path()
    took = time.monotonic() - started
    assert path.parent == tmp_path and path.suffix == ".gguf" and took < 30, took
    mtime = path.stat().st_mtime_ns
    assert spec.gguf_path() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    model = LlamaModel(path, spec.n_ctx, threads=1, embeddings_only=True)
    try:
        assert model._embed_ctx is model.ctx  # no generation context beside it
        text = "The capital of France is Paris."
        tokens = model.tokenize(text)
        assert tokens[0] == 101 and tokens[-1] == 102  # [CLS] ... [SEP], as the model was trained
        [vector], used = model.embed([text])
    finally:
        model.close()
    reference = _numpy_bert(spec, tokens)
    assert used == len(tokens) and float(np.dot(vector, reference)) > 0.9999


def _numpy_bert(spec: ModelSpec, tokens: list[int]) -> np.ndarray:
    """all-MiniLM-L6-v2 in numpy from the package's safetensors: BERT, mean pooling, L2 norm."""
    import importlib.util

    origin = importlib.util.find_spec(spec.package).submodule_search_locations[0]
    with zipfile.ZipFile(Path(origin) / spec.file) as z:
        data = z.read("model.safetensors")
        config = json.loads(z.read("config.json"))
    n = int.from_bytes(data[:8], "little")
    header = {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
    w = {k: np.frombuffer(data, "<f4", (v["data_offsets"][1] - v["data_offsets"][0]) // 4, 8 + n + v["data_offsets"][0])
         .reshape(v["shape"]).astype(np.float64) for k, v in header.items() if v["dtype"] == "F32"}
    erf = np.vectorize(math.erf)

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + config["layer_norm_eps"]) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    e = "embeddings."
    x = norm(w[e + "word_embeddings.weight"][tokens] + w[e + "position_embeddings.weight"][:len(tokens)]
             + w[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    heads = config["num_attention_heads"]
    d = x.shape[1] // heads
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (dense(x, p + f"attention.self.{m}").reshape(len(tokens), heads, d).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        a = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(len(tokens), -1)
        x = norm(x + dense(o, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = dense(x, p + "intermediate.dense")
        x = norm(x + dense(0.5 * h * (1 + erf(h / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_purposes_are_checked_once_for_every_entrance(service: InferenceService, caller: AppSpec) -> None:
    plain = AppSpec(name="plain", path=Path("."))  # no allowed_models: its model and its embedding model
    assert service.call_request(plain, "", "embed", {"texts": ["x"]}).model == plain.embedding_model == "minilm"
    assert service.call_request(plain, "minilm", "embed", {"texts": ["x"]}).model == "minilm"
    with pytest.raises(InvalidInput, match="model 'smollm2' is a model for generation, not embeddings"):
        service.call_request(caller, "smollm2", "embed", {"texts": ["x"]})
    with pytest.raises(InvalidInput, match="model 'minilm' is a model for embeddings, not generation"):
        service.generation(caller, model="minilm", prompt="hi")
    assert service.tokenize(caller, "minilm", "hello world") == [7592, 2088]  # any model tokenizes


def test_config_declares_purposes(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("")

    def load(text: str) -> Config:
        (tmp_path / "amphibia.toml").write_text(text)
        return load_config(tmp_path / "amphibia.toml")

    config = load('[models.other]\npath = "x.gguf"\npurpose = "embeddings"\n'
                  '[apps.app]\npath = "app"\nembedding_model = "other"\n')
    assert config.apps["app"].embedding_model == "other" and config.apps["app"].allows("other")
    assert config.models["minilm"].purpose == "embeddings" and config.models["smollm2"].purpose == "generation"
    with pytest.raises(ConfigError, match="purpose must be one of generation, embeddings"):
        load('[models.other]\npath = "x.gguf"\npurpose = "chat"\n')
    with pytest.raises(ConfigError, match="embedding_model 'smollm2' is a model for generation"):
        load('[apps.app]\npath = "app"\nembedding_model = "smollm2"\n')
    with pytest.raises(ConfigError, match="model 'minilm' is a model for embeddings"):
        load('[apps.app]\npath = "app"\nmodel = "minilm"\n')
    with pytest.raises(ConfigError, match="which no \\[models.nope\\] defines"):
        load('[apps.app]\npath = "app"\nembedding_model = "nope"\n')


@pytest.fixture(scope="module")
def up() -> Iterator[tuple[str, object]]:
    """A gateway as `amphibia up` sets it up (its own local workers), serving no apps."""
    from amphibia.http.app import create_app

    models = default_models()
    models["smollm2"] = replace(models["smollm2"], threads=1)  # this machine has 2 cores
    config = Config(server=replace(ServerConfig(), cache_dir=CACHE), models=models, apps={},
                    pool=PoolConfig(token=TOKEN, local_worker=True, local_slots=1), root=ROOT)
    port = free_port()
    asgi = create_app(config, local_worker_port=port)
    served = serve_in_thread(asgi, port)
    try:
        yield served.url, asgi
    finally:
        served.stop()
    for supervisor in asgi.state.local_workers:  # stopped with the gateway, the embedding worker too
        assert supervisor.proc is None or supervisor.proc.poll() is not None


def test_pool_embeddings_equal_in_process_ones(up, service: InferenceService, caller: AppSpec) -> None:
    url, asgi = up

    def workers() -> dict[str, list[str]]:
        return {w["id"]: w["models"] for w in httpx.get(f"{url}/pool", timeout=10).json()["workers"]}

    assert "local-minilm" not in workers()  # started when a request first needs it
    texts = list(QUERIES)[:5] + list(DOCUMENTS.values())[:5]
    res = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=120)  # no model: the default
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["model"] == "minilm" and workers()["local-minilm"] == ["minilm"]
    local, _ = service.embed(caller, "minilm", texts)
    assert [d["embedding"] for d in body["data"]] == local  # the same file, threads and path: equal numbers
    names = [s.name for s in asgi.state.local_workers]
    assert names.count("local-minilm") == 1
    # A second request finds the worker there; a generation model is refused for embeddings, and the
    # embedding model for chat, over HTTP as everywhere.
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "frogs"}, timeout=60).status_code == 200
    res = httpx.post(f"{url}/v1/embeddings", json={"model": "smollm2", "input": "frogs"}, timeout=60)
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_input"
    chat = {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}
    res = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert res.status_code == 400 and "for embeddings, not generation" in res.json()["error"]["message"]
    assert [s.name for s in asgi.state.local_workers].count("local-minilm") == 1
