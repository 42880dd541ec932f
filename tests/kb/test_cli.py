"""``chattune kb`` subcommands through their parser: build, search, add, rm and their output."""

from __future__ import annotations

import argparse

import pytest

from chattune.errors import ChattuneError, ConfigError
from chattune.kb.cli import add_kb_parser


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Parse ``argv`` with a parser holding only ``kb``, run its function as chattune's main does."""
    parser = argparse.ArgumentParser(prog="chattune")
    add_kb_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ChattuneError as exc:
        print(f"chattune: error: {exc}")
        code = 2
    return code, capsys.readouterr().out


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "veldmoor.md").write_text("Veldmoor was founded by Oren Tal in 812.", encoding="utf-8")
    (folder / "qinglan.txt").write_text("青岚港由渔夫林墨于公元620年创建。", encoding="utf-8")
    (folder / "notes.png").write_bytes(b"png")
    return folder


def test_build_search_add_rm(docs, tmp_path, capsys):
    kb, d = tmp_path / "kb", docs.as_posix()
    code, out = run(["kb", "build", str(docs), "--out", str(kb), "--chunk-size", "100",
                     "--chunk-overlap", "20"], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{kb}: 2 files, 2 chunks (added 2; 2 new chunks)"
    assert out.splitlines()[1:] == ["skipped 1 file:", f"  {d}/notes.png: unsupported type '.png'; "
                                    "expected one of .txt, .md, .pdf, .docx, .html, .htm, .jsonl"]

    code, out = run(["kb", "search", str(kb), "谁创建了青岚港？"], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("[1] ") and lines[0].endswith(f"  {d}/qinglan.txt (chunk 0)")
    assert 0.15 <= float(lines[0].split()[1]) <= 1.0
    assert lines[1] == "    青岚港由渔夫林墨于公元620年创建。"

    code, out = run(["kb", "search", str(kb), "capital of France", "--top-k", "1"], capsys)
    assert (code, out) == (0, "no chunk above the threshold\n")

    (docs / "arno.txt").write_text("Arno trades smoked eel.", encoding="utf-8")
    code, out = run(["kb", "add", str(kb), str(docs / "arno.txt")], capsys)
    assert (code, out) == (0, f"{kb}: 3 files, 3 chunks (added 1; 1 new chunk)\n")

    code, out = run(["kb", "rm", str(kb), f"{d}/veldmoor.md", str(docs / "arno.txt")], capsys)
    assert (code, out) == (0, f"{kb}: 1 file, 1 chunk (removed 2; 0 new chunks)\n")


def test_errors_are_one_line(docs, tmp_path, capsys):
    run(["kb", "build", str(docs), "--out", str(tmp_path / "kb")], capsys)
    code, out = run(["kb", "search", str(tmp_path / "kb"), "Veldmoor", "--threshold", "1.2"], capsys)
    assert code == 2 and out == ("chattune: error: threshold: 1.2; expected a relevance in [0, 1] where "
                                 "higher means more similar (not a distance)\n")
    code, out = run(["kb", "build", str(docs), "--out", str(tmp_path / "kb2"), "--chunk-overlap", "300"],
                    capsys)
    assert code == 2 and out == ("chattune: error: chunk_overlap: expected 0 <= overlap < chunk_size (250), "
                                 "got 300\n")
    code, out = run(["kb", "search", str(tmp_path / "nokb"), "x"], capsys)
    assert code == 2 and out.count("\n") == 1 and "no kb.json in it" in out


def test_parser_defaults():
    parser = argparse.ArgumentParser(prog="chattune")
    add_kb_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kb", "search", "KB", "q"])
    assert (args.top_k, args.threshold, args.embedding) == (3, 0.15, None)
    args = parser.parse_args(["kb", "build", "a", "b", "--out", "KB"])
    assert (args.docs, args.chunk_size, args.chunk_overlap, args.embedding) == (["a", "b"], 250, 50, None)
    assert issubclass(ConfigError, ChattuneError)


def test_chattune_kb_is_a_subcommand_of_chattune(docs, tmp_path, capsys):
    from chattune.cli import main

    assert main(["kb", "build", str(docs / "veldmoor.md"), "--out", str(tmp_path / "kb")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'kb'}: 1 file, 1 chunk (added 1; 1 new chunk)\n"
    assert main(["kb", "search", str(tmp_path / "kb"), "Who founded Veldmoor?", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "    Veldmoor was founded by Oren Tal in 812."
    assert main(["kb", "search", str(tmp_path / "kb"), "x", "--threshold", "2"]) == 2
    assert capsys.readouterr().err.startswith("chattune: error: threshold: 2.0; expected a relevance in [0, 1]")


def test_the_command_line_does_not_import_the_kb_backends():
    import subprocess
    import sys

    code = ("import sys, chattune.cli; heavy = [m for m in ('numpy', 'bm25s', 'jieba', 'chattune.kb.store') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
