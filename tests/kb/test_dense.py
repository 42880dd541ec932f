"""The dense backend, really run offline: a tiny sentence-transformers model, faiss, the model hash."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from chattune.errors import ConfigError
from chattune.kb import embedding, store

TEXTS = {
    "a.txt": "青岚港由渔夫林墨创建。",
    "b.txt": "veldmoor stands on the sel river.",
    "c.txt": "arno trades smoked eel and kites.",
}


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_model_hash_names_the_weights(tiny_embedder, other_embedder, tmp_path):
    digest = embedding.model_hash(tiny_embedder)
    assert len(digest) == 64 and digest == embedding.model_hash(tiny_embedder)
    assert digest != embedding.model_hash(other_embedder)
    copy = shutil.copytree(tiny_embedder, tmp_path / "copy")
    assert embedding.model_hash(copy) == digest  # the bytes, not the place
    with pytest.raises(ConfigError, match="--embedding .*nowhere: not a folder; expected the local path of a "
                                          "sentence-transformers model"):
        embedding.model_hash(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights files"):
        embedding.model_hash(tmp_path / "empty")


def test_embeddings_are_unit_length(tiny_embedder):
    vectors = embedding.embed(embedding.load_model(str(tiny_embedder)), ["hello", "青岚港"])
    assert vectors.shape == (2, 16) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_dense_build_search_add_remove(docs, tmp_path, tiny_embedder, monkeypatch):
    kb = tmp_path / "kb"
    report = store.build([docs], kb, embedding=tiny_embedder)
    assert report.chunks == 3
    manifest = store.read_manifest(kb)
    assert manifest["backend"] == {"name": "embedding", "model": str(tiny_embedder.resolve()),
                                   "model_sha256": embedding.model_hash(tiny_embedder), "dim": 16,
                                   "similarity": "cosine"}
    assert manifest["relevance"].startswith("cosine similarity of the embeddings, negatives as 0")
    stored = np.load(kb / "embeddings.npy")
    assert stored.shape == (3, 16)

    # a chunk's own text is its nearest neighbour, at relevance 1
    hits = store.search(kb, TEXTS["b.txt"], top_k=3, threshold=0.0)
    assert hits[0].text == TEXTS["b.txt"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    embedded = []
    original = embedding.embed
    monkeypatch.setattr(embedding, "embed", lambda model, texts, **kw: embedded.extend(texts)
                        or original(model, texts, **kw))
    (docs / "d.txt").write_text("lanzhou has twenty towns.", encoding="utf-8")
    store.add(kb, [docs])
    assert embedded == ["lanzhou has twenty towns."]  # the other chunks' embeddings are reused
    after = np.load(kb / "embeddings.npy")
    assert np.array_equal(after[:3], stored) and after.shape == (4, 16)

    store.remove(kb, [str(docs / "a.txt")])
    assert np.array_equal(np.load(kb / "embeddings.npy"), after[1:])
    assert [c["text"] for c in store.open_kb(kb).chunks] == [TEXTS["b.txt"], TEXTS["c.txt"],
                                                             "lanzhou has twenty towns."]
    assert embedded == ["lanzhou has twenty towns."]


def test_a_different_model_is_refused(docs, tmp_path, tiny_embedder, other_embedder):
    store.build([docs], tmp_path / "kb", embedding=tiny_embedder)
    digest = embedding.model_hash(tiny_embedder)[:12]
    with pytest.raises(ConfigError, match=f"--embedding {other_embedder}: the KB {tmp_path / 'kb'} was built "
                                          f"with a different embedding model \\({tiny_embedder.resolve()}, "
                                          f"sha256 {digest}, this one"):
        store.search(tmp_path / "kb", "veldmoor", embedding=other_embedder)
    moved = shutil.copytree(tiny_embedder, tmp_path / "moved")
    assert store.search(tmp_path / "kb", "veldmoor", embedding=moved, threshold=0.0)


def test_a_vanished_model_says_which_to_pass(docs, tmp_path, tiny_embedder):
    model = shutil.copytree(tiny_embedder, tmp_path / "model")
    store.build([docs], tmp_path / "kb", embedding=model)
    shutil.rmtree(model)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'kb'}: its embedding model {model} is gone; pass "
                                          "--embedding with the model it was built with"):
        store.search(tmp_path / "kb", "veldmoor")


def _modules_junk(folder):
    (folder / "modules.json").write_text("[1, 2]")
    return "TypeError"


def _no_pooling(folder):
    import json

    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:1]))  # the transformer alone: no sentence embedding
    return "KeyError"


def _config_of_nothing(folder):
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (folder / "modules.json").unlink()
    return "Error"


@pytest.mark.parametrize("damage", [_modules_junk, _no_pooling, _config_of_nothing])
def test_a_folder_that_is_not_an_embedding_model_is_one_line(damage, docs, tmp_path, tiny_embedder, capsys):
    from chattune.cli import main

    folder = shutil.copytree(tiny_embedder, tmp_path / "not-a-model")
    reason = damage(folder)
    capsys.readouterr()
    assert main(["kb", "build", str(docs), "--out", str(tmp_path / "kb"), "--embedding", str(folder)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chattune: error:")]
    assert len(err) == 1, err
    assert err[0].startswith(f"chattune: error: --embedding {folder}: not a sentence-transformers embedding "
                             f"model ("), err[0]
    assert reason in err[0] and err[0].endswith("expected a folder saved by sentence-transformers "
                                                "(SentenceTransformer.save: modules.json, config.json, "
                                                "weights and tokenizer files)")
    assert not (tmp_path / "kb").exists()
