"""KB folders: the manifest, chunks, add/remove without re-reading the rest, search and its errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from chattune.errors import ConfigError, DataError
from chattune.kb import documents, store

VELDMOOR = "Veldmoor was founded by Oren Tal in 812. It stands on the Sel."
QINGLAN = "青岚港由渔夫林墨于公元620年创建。它坐落在碧水河畔。"
ARNO = "Arno trades smoked eel and painted kites."


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "zh").mkdir(parents=True)
    (folder / "veldmoor.md").write_text(VELDMOOR, encoding="utf-8")
    (folder / "zh" / "qinglan.txt").write_text(QINGLAN, encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    return folder


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_build_writes_a_self_describing_folder(docs, tmp_path):
    report = store.build([docs], tmp_path / "kb", chunk_size=40, chunk_overlap=10)
    d = docs.as_posix()
    assert report.format().splitlines() == [
        f"{tmp_path / 'kb'}: 2 files, 3 chunks (added 2; 3 new chunks)",
        "skipped 1 file:", f"  {d}/empty.txt: empty (no text)"]
    manifest = json.loads((tmp_path / "kb" / "kb.json").read_text(encoding="utf-8"))
    assert manifest == {
        "format": "chattune-kb", "version": 1,
        "backend": {"name": "bm25", "method": "lucene", "k1": 1.5, "b": 0.75,
                    "tokenizer": "jieba-search+lowercase-words+stopwords-v1"},
        "relevance": "IDF-weighted share of the question's terms found in the chunk, in [0, 1]; "
                     "higher = more relevant",
        "splitter": {"splitter": "chinese-recursive", "chunk_size": 40, "chunk_overlap": 10},
        "files": [
            {"file": f"{d}/veldmoor.md", "path": str(docs / "veldmoor.md"), "sha256": sha(VELDMOOR),
             "chunks": 2, "chars": len(VELDMOOR)},
            {"file": f"{d}/zh/qinglan.txt", "path": str(docs / "zh" / "qinglan.txt"), "sha256": sha(QINGLAN),
             "chunks": 1, "chars": len(QINGLAN)},
        ],
        "chunks": 3,
    }
    lines = (tmp_path / "kb" / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file": f"{d}/veldmoor.md", "chunk": 0, "text": "Veldmoor was founded by Oren Tal in 812."},
        {"file": f"{d}/veldmoor.md", "chunk": 1, "text": "It stands on the Sel."},
        {"file": f"{d}/zh/qinglan.txt", "chunk": 0, "text": QINGLAN},
    ]
    assert not (tmp_path / "kb" / "embeddings.npy").exists()


def test_search_returns_top_k_above_threshold_best_first(docs, tmp_path):
    store.build([docs], tmp_path / "kb")
    hits = store.search(tmp_path / "kb", "谁创建了青岚港？")
    assert [(h.file, h.chunk, h.text) for h in hits] == [(f"{docs.as_posix()}/zh/qinglan.txt", 0, QINGLAN)]
    assert hits[0].source() == {"file": f"{docs.as_posix()}/zh/qinglan.txt", "chunk": 0,
                                "score": round(hits[0].score, 4)}
    assert 0.5 < hits[0].score <= 1.0
    assert store.search(tmp_path / "kb", "What is the capital of France?") == []


def test_threshold_is_a_relevance_in_0_1(docs, tmp_path):
    store.build([docs], tmp_path / "kb")
    kb = store.open_kb(tmp_path / "kb")
    question = "Did Oren Tal found Glimmerford?"  # oren and tal found, glimmerford and found not
    (hit,) = store.search(kb, question, threshold=0.0)
    assert 0.2 < hit.score < 0.8
    assert store.search(kb, question, threshold=hit.score) == [hit]
    assert store.search(kb, question, threshold=hit.score + 1e-3) == []
    assert store.search(kb, "Veldmoor Oren Tal 812 Sel", threshold=1.0)[0].score == 1.0
    with pytest.raises(ConfigError, match=r"threshold: 1\.5; expected a relevance in \[0, 1\] where higher "
                                          r"means more similar \(not a distance\)"):
        store.search(kb, "Veldmoor", threshold=1.5)


def test_query_limits(docs, tmp_path):
    store.build([docs], tmp_path / "kb")
    with pytest.raises(DataError, match="query: 1001 characters, more than the limit of 1000; "
                                        "expected a shorter question"):
        store.search(tmp_path / "kb", "x" * 1001)
    with pytest.raises(DataError, match="query: 21 characters, more than the limit of 20"):
        store.search(tmp_path / "kb", "y" * 21, max_query_chars=20)
    with pytest.raises(DataError, match="query: empty; expected a question"):
        store.search(tmp_path / "kb", "  ")


def test_build_with_nothing_readable_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(DataError) as caught:
        store.build([tmp_path / "empty.txt", tmp_path / "x.png"], tmp_path / "kb")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}/empty.txt {tmp_path}/x.png: no readable text to index "
                              f"(2 files skipped: {tmp_path.as_posix()}/x.png: unsupported type '.png'")
    assert message.endswith(f"; {tmp_path.as_posix()}/empty.txt: empty (no text)); expected .txt, .md, "
                            ".pdf, .docx, .html or .jsonl files with text")
    assert not (tmp_path / "kb").exists()


def test_build_refuses_a_folder_that_is_not_a_kb(docs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--out .*out: exists and is not a knowledge base"):
        store.build([docs], tmp_path / "out")
    store.build([docs], tmp_path / "kb")
    store.build([docs / "veldmoor.md"], tmp_path / "kb")  # a KB is rebuilt
    assert store.open_kb(tmp_path / "kb").manifest["chunks"] == 1


def test_add_reads_only_new_and_changed_files(docs, tmp_path, monkeypatch):
    store.build([docs], tmp_path / "kb")
    before = (tmp_path / "kb" / "chunks.jsonl").read_text(encoding="utf-8")
    (docs / "arno.txt").write_text(ARNO, encoding="utf-8")
    read = []
    original = store.read_document
    monkeypatch.setattr(store, "read_document", lambda source, digest=None: read.append(source.file)
                        or original(source, digest))
    report = store.add(tmp_path / "kb", [docs])
    d = docs.as_posix()
    assert read == [f"{d}/arno.txt", f"{d}/empty.txt"]  # empty.txt: skipped before, so read again
    assert (report.added, report.updated, report.unchanged) == (
        [f"{d}/arno.txt"], [], [f"{d}/veldmoor.md", f"{d}/zh/qinglan.txt"])
    assert [s.reason for s in report.skipped] == ["empty (no text)"]
    after = (tmp_path / "kb" / "chunks.jsonl").read_text(encoding="utf-8")
    assert after.startswith(before) and json.loads(after.splitlines()[-1])["text"] == ARNO

    read.clear()
    (docs / "veldmoor.md").write_text("Veldmoor now trades kites.", encoding="utf-8")
    report = store.add(tmp_path / "kb", [docs / "veldmoor.md"])
    assert read == [f"{d}/veldmoor.md"] and report.updated == [f"{d}/veldmoor.md"]
    manifest = store.read_manifest(tmp_path / "kb")
    assert [(e["file"], e["sha256"]) for e in manifest["files"]] == [
        (f"{d}/zh/qinglan.txt", sha(QINGLAN)), (f"{d}/arno.txt", sha(ARNO)),
        (f"{d}/veldmoor.md", sha("Veldmoor now trades kites."))]
    assert store.search(tmp_path / "kb", "Veldmoor kites")[0].text == "Veldmoor now trades kites."


def test_remove_by_name_or_path_reads_nothing(docs, tmp_path, monkeypatch):
    store.build([docs], tmp_path / "kb")
    monkeypatch.setattr(store, "read_document", lambda *a: pytest.fail("remove read a document"))
    monkeypatch.setattr(documents, "read_text", lambda *a: pytest.fail("remove read a document"))
    report = store.remove(tmp_path / "kb", [str(docs / "zh" / "qinglan.txt")])
    assert report.removed == [f"{docs.as_posix()}/zh/qinglan.txt"]
    assert report.format() == f"{tmp_path / 'kb'}: 1 file, 1 chunk (removed 1; 0 new chunks)"
    assert store.search(tmp_path / "kb", "青岚港") == []
    with pytest.raises(DataError, match=r"nope\.txt: not in the KB .*kb; expected one of its files "
                                        r"\(.*veldmoor\.md\)"):
        store.remove(tmp_path / "kb", ["nope.txt"])
    store.remove(tmp_path / "kb", [f"{docs.as_posix()}/veldmoor.md"])
    with pytest.raises(DataError, match="the knowledge base holds no chunks .*add documents with "
                                        "`chattune kb add`"):
        store.search(tmp_path / "kb", "Veldmoor")


def test_not_a_kb(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: no kb.json in it; expected a knowledge-base folder "
                                          "made by `chattune kb build`"):
        store.open_kb(tmp_path)


def test_embedding_given_for_a_bm25_kb_is_refused(docs, tmp_path, tiny_embedder):
    store.build([docs], tmp_path / "kb")
    with pytest.raises(ConfigError, match="was built with BM25, not an embedding model"):
        store.open_kb(tmp_path / "kb", embedding=tiny_embedder)
