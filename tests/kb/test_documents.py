"""Reading documents: every format through its parser; bad files skipped, counted and named."""

from __future__ import annotations

import json
from pathlib import Path

from chattune.kb.documents import (
    Document,
    Skipped,
    collect_sources,
    file_sha256,
    format_skipped,
    read_document,
    read_text,
)
from tests.kb.conftest import write_pdf


def load_documents(paths) -> tuple[list[Document], list[Skipped]]:
    """Every supported file under ``paths`` read as ``kb build`` reads them: (documents, skipped)."""
    sources, skipped = collect_sources(paths)
    documents = []
    for source in sources:
        result = read_document(source)
        (documents if isinstance(result, Document) else skipped).append(result)
    return documents, skipped


def test_txt_md_utf8_bom_and_gb18030(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeff青岚港由渔夫林墨创建。".encode())
    (tmp_path / "b.md").write_bytes("# 澜州\n\n旧文件用 GBK 编码。".encode("gb18030"))
    assert read_text(tmp_path / "a.txt") == "青岚港由渔夫林墨创建。"
    assert read_text(tmp_path / "b.md") == "# 澜州\n\n旧文件用 GBK 编码。"


def test_pdf(tmp_path):
    path = write_pdf(tmp_path / "a.pdf", ["Veldmoor was founded in 812.", "It lies on the Sel."])
    text = read_text(path)
    assert "Veldmoor was founded in 812." in text and "It lies on the Sel." in text


def test_docx_paragraphs_and_tables(tmp_path):
    import docx

    document = docx.Document()
    document.add_paragraph("青岚港坐落在碧水河畔。")
    document.add_paragraph("Veldmoor trades smoked eel.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "town", "Veldmoor"
    document.save(tmp_path / "a.docx")
    assert read_text(tmp_path / "a.docx") == "青岚港坐落在碧水河畔。\nVeldmoor trades smoked eel.\ntown | Veldmoor"


def test_html_text_by_blocks_without_scripts(tmp_path):
    (tmp_path / "a.html").write_text(
        "<html><head><title>Reach</title><style>p{}</style></head><body>"
        "<h1>Veldmoor</h1><p>Founded in <b>812</b> by Oren Tal.</p><script>var x=1;</script>"
        "<ul><li>smoked eel</li><li>kites</li></ul>line one<br>line two</body></html>", encoding="utf-8")
    assert read_text(tmp_path / "a.html") == (
        "Reach\n\nVeldmoor\n\nFounded in 812 by Oren Tal.\n\nsmoked eel\n\nkites\n\nline one\nline two")


def test_jsonl_text_then_content_field(tmp_path):
    rows = [{"text": "第一条。"}, {"content": "Second row."}, {"text": "  "}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert read_text(tmp_path / "a.jsonl") == "第一条。\n\nSecond row."


def test_folders_walked_recursively_in_order_hidden_left_out(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / ".git").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("b")
    (tmp_path / "docs" / "sub" / "a.md").write_text("a")
    (tmp_path / "docs" / ".git" / "x.txt").write_text("x")
    (tmp_path / "docs" / ".hidden.txt").write_text("x")
    sources, skipped = collect_sources([tmp_path / "docs"])
    assert [s.path.relative_to(tmp_path).as_posix() for s in sources] == ["docs/b.txt", "docs/sub/a.md"]
    assert skipped == []


def test_files_are_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/a.txt").write_text("text")
    sources, _ = collect_sources(["./docs", "docs/a.txt", "docs/../docs/a.txt"])
    assert [s.file for s in sources] == ["docs/a.txt"]  # named once, however often given


def test_bad_files_skipped_counted_and_named(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("Veldmoor.")
    (docs / "empty.txt").write_text("")
    (docs / "blank.md").write_text(" \n\n ")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02")
    (docs / "broken.pdf").write_bytes(b"not a pdf")
    write_pdf(docs / "scanned.pdf", [])
    (docs / "broken.docx").write_bytes(b"not a zip")
    (docs / "rows.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    (docs / "notjson.jsonl").write_text("{oops\n")
    (docs / "image.png").write_bytes(b"\x89PNG")
    documents, skipped = load_documents([docs, tmp_path / "missing.txt"])
    assert [d.file for d in documents] == [f"{docs.as_posix()}/good.txt"]
    reasons = {Path(s.file).name: s.reason for s in skipped}
    assert reasons == {
        "missing.txt": "not found",
        "image.png": "unsupported type '.png'; expected one of .txt, .md, .pdf, .docx, .html, .htm, .jsonl",
        "binary.txt": "binary data (NUL bytes) in a text file",
        "blank.md": "empty (no text)",
        "empty.txt": "empty (no text)",
        "broken.docx": "not a readable .docx file (PackageNotFoundError: Package not found at "
                       f"'{docs / 'broken.docx'}')",
        "broken.pdf": reasons["broken.pdf"],
        "scanned.pdf": "no text in the PDF (scanned pages? text is not recognized from images)",
        "notjson.jsonl": "line 1: not JSON (Expecting property name enclosed in double quotes)",
        "rows.jsonl": "line 2: expected an object with a string 'text' (or 'content') field",
    }
    assert reasons["broken.pdf"].startswith("not a readable PDF (")
    summary = format_skipped(skipped)
    assert summary.splitlines()[0] == "skipped 10 files:"
    assert f"  {docs.as_posix()}/empty.txt: empty (no text)" in summary.splitlines()


def test_document_carries_sha256(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    documents, skipped = load_documents([tmp_path / "a.txt"])
    assert documents == [Document(f"{tmp_path.as_posix()}/a.txt", tmp_path / "a.txt", "hello",
                                  file_sha256(tmp_path / "a.txt"))]
    assert documents[0].sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert skipped == [] and format_skipped(skipped) == "skipped 0 files"
    assert Skipped("x", "y").reason == "y"
