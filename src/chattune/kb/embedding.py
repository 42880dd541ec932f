"""A sentence-transformers embedding model given by local path, and the hash that names it.

A dense knowledge base records a sha256 over the model folder's weights files
(``*.safetensors``, ``*.bin``, ...) and the configs that shape its output
(``config.json`` files, pooling's included, ``modules.json``,
``sentence_bert_config.json``), so that searching it with a different model is refused
instead of returning nonsense. The model is only ever loaded from a local path.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from chattune.errors import ConfigError, ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")
CONFIG_NAMES = ("config.json", "modules.json", "sentence_bert_config.json")


def require_dense() -> None:
    """A clear error where the dense backend's packages are not installed."""
    import importlib.util

    missing = [name for name in ("sentence_transformers", "faiss") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--embedding: dense knowledge bases need {' and '.join(missing)}; "
                          "install them with pip install 'chattune[kb-dense]'")


def _hashed_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_NAMES)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def model_hash(path: str | Path) -> str:
    """sha256 over the model folder's weights files and configs (names and bytes), in hex."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"--embedding {path}: not a folder; expected the local path of a "
                          "sentence-transformers model (models are not downloaded)")
    files = _hashed_files(root)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ConfigError(f"--embedding {path}: no weights files ({', '.join(WEIGHT_SUFFIXES)}) in it; "
                          "expected a saved sentence-transformers model")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash(root, stamp)


@lru_cache(maxsize=8)
def _hash(root: Path, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stamp:
        file = Path(name)
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


EXPECTED_MODEL = ("expected a folder saved by sentence-transformers (SentenceTransformer.save: modules.json, "
                  "config.json, weights and tokenizer files)")


def not_a_model(path: str | Path, exc: BaseException) -> ModelLoadError:
    """The one-line error for a folder that does not load (or does not embed) as a
    sentence-transformers model, with the library's reason shortened to one line."""
    reason = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {reason[:200]}{'...' if len(reason) > 200 else ''}" if reason \
        else type(exc).__name__
    return ModelLoadError(f"--embedding {path}: not a sentence-transformers embedding model ({reason}); "
                          f"{EXPECTED_MODEL}")


@lru_cache(maxsize=2)
def load_model(path: str):
    """The sentence-transformers model at local ``path``, on CPU (loaded once per process),
    checked by embedding one probe text; a folder that fails either way raises ModelLoadError."""
    require_dense()
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        probe = model.encode(["probe"], convert_to_numpy=True, show_progress_bar=False)
    except Exception as exc:  # a folder that is not such a model fails in many ways: KeyError, TypeError, ...
        raise not_a_model(path, exc) from exc
    if getattr(probe, "ndim", 0) != 2 or probe.shape[1] == 0:
        raise not_a_model(path, ValueError(f"its output has shape {getattr(probe, 'shape', None)}, "
                                           "not one vector per text"))
    return model


def embedding_dim(model) -> int:
    """The length of the model's embeddings."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter() or 0)


def embed(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Unit-length float32 embeddings of ``texts``, one row each."""
    if not texts:
        dim = embedding_dim(model)
        return np.zeros((0, dim), dtype=np.float32)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
