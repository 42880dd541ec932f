"""``chattune tokenizer extend`` through the CLI: the folder it writes, the report and table it
prints, text fields joined from JSON rows, and one-line errors (exit 2) naming the file or
option at fault, with nothing written."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.vocab.command import REPORT_NAME
from chattune.vocab.extend import EXTENSION_NAME, read_extension


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_dir(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def base(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, zh_train, english) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    en = root / "en.txt"
    en.write_text("\n".join(english) + "\n", encoding="utf-8")  # a document a line
    return {"zh": write_jsonl(root / "zh.jsonl", zh_train), "en": en, "root": root,
            "en_lines": len("\n".join(english).splitlines())}


@pytest.fixture(scope="module")
def extended(base_dir, files):
    """One CLI run: (exit code, stdout, stderr, out folder)."""
    out = files["root"] / "extended"
    code, stdout, stderr = run_cli(["tokenizer", "extend", base_dir, "--corpus", files["zh"], "--add", 50,
                                    "--out", out, "--holdout", 0.2, "--compare", files["en"]])
    return code, stdout, stderr, out


def test_extend_writes_the_tokenizer_folder(extended):
    code, _, stderr, out = extended
    assert code == 0, stderr
    for name in ("tokenizer.json", "tokenizer_config.json", EXTENSION_NAME, REPORT_NAME):
        assert (out / name).is_file(), name


def test_extend_prints_a_table(extended, base):
    _, stdout, _, out = extended
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    lines = stdout.splitlines()
    assert lines[0].startswith(f"tokenizer: {len(base):,} -> {report['tokens_after']:,} tokens "
                               f"(+{report['added']}, learned from {report['learned_from']['documents']} documents)")
    assert str(out) in lines[0]
    held = [line for line in lines if line.startswith("held_out ")]
    compare = [line for line in lines if line.startswith("compare ")]
    assert len(held) == 1 and len(compare) == 1
    assert f"{report['held_out']['ratio']:.2f}x" in held[0]
    assert sum("of which ASCII-only" in line for line in lines) == 2
    assert lines[-1].split() == ["of", "which", "ASCII-only:", f"{report['compare']['ascii_texts']},",
                                 "encoded", "differently:", "0"]


def test_extend_report(extended, base, files, zh_train):
    _, _, _, out = extended
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["tokens_before"] == len(base)
    assert 0 < report["added"] <= 50
    assert report["tokens_after"] == len(base) + report["added"]
    assert report["held_out"]["texts"] > 0
    assert report["learned_from"]["documents"] + report["held_out"]["texts"] == len(zh_train)
    assert report["held_out"]["ratio"] > 1
    assert report["held_out"]["ascii_texts"] == 0
    compare = report["compare"]
    assert compare["texts"] == compare["ascii_texts"] == files["en_lines"]
    assert compare["ascii_texts_changed"] == 0 and compare["texts_encoded_differently"] == 0
    assert compare["ratio"] == 1.0
    assert compare["files"] == [str(files["en"])]


def test_extended_tokenizer_loads(extended, base, base_dir):
    from transformers import AutoTokenizer

    from chattune.model import load_tokenizer

    _, _, _, out = extended
    added = read_extension(out)["added"]
    for tokenizer in (AutoTokenizer.from_pretrained(out), load_tokenizer(str(out))):
        assert len(tokenizer) == len(base) + added
        assert tokenizer.eos_token == base.eos_token
        assert tokenizer.chat_template == base.chat_template


def test_extension_record(extended, base_dir, base, files, zh_train):
    _, _, _, out = extended
    record = read_extension(out)
    assert record["base"] == str(base_dir)
    assert record["base_tokens"] == len(base)
    assert record["holdout"] == 0.2 and record["min_frequency"] == 2
    assert record["text_filter"] == "non-ASCII"
    assert record["corpus"] == [{"path": str(files["zh"]), "read": len(zh_train), "documents": len(zh_train),
                                 "empty": 0, "chars": sum(len(t) for t in zh_train)}]
    assert [e["id"] for e in record["new_tokens"]] == list(range(len(base), len(base) + record["added"]))


def test_rerun_into_an_earlier_extension_folder(base_dir, files, tmp_path):
    out = tmp_path / "out"
    args = ["tokenizer", "extend", base_dir, "--corpus", files["zh"], "--out", out, "--holdout", 0]
    assert run_cli([*args, "--add", 10])[0] == 0
    code, _, stderr = run_cli([*args, "--add", 5])
    assert code == 0, stderr
    assert read_extension(out)["added"] == 5
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["added"] == 5 and report["held_out"]["texts"] == 0 and "compare" not in report


def test_text_fields_of_alpaca_rows_are_joined(base_dir, base, tmp_path, zh_train):
    rows = [{"instruction": a, "input": "", "output": b} for a, b in zip(zh_train[::2], zh_train[1::2],
                                                                        strict=True)]
    corpus = tmp_path / "alpaca.json"
    corpus.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    code, _, stderr = run_cli(["tokenizer", "extend", base_dir, "--corpus", corpus, "--add", 30, "--out", out,
                               "--holdout", 0.2, "--text-field", "instruction", "--text-field", "output"])
    assert code == 0, stderr
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["learned_from"]["documents"] + report["held_out"]["texts"] == len(rows)
    joined = sum(len(r["instruction"]) + 1 + len(r["output"]) for r in rows)
    assert report["learned_from"]["chars"] + report["held_out"]["chars"] == joined
    assert report["held_out"]["ratio"] > 1


def test_real_alpaca_zh(base_dir, shared_data, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([
        "tokenizer", "extend", base_dir, "--corpus", shared_data / "alpaca_zh_demo.json", "--add", 100,
        "--out", out, "--text-field", "instruction", "--text-field", "input", "--text-field", "output",
        "--compare", shared_data / "alpaca_en_demo.json", "--compare-text-field", "instruction",
        "--compare-text-field", "output"])
    assert code == 0, stderr
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    rows = len(json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8")))
    assert report["added"] == 100
    assert report["learned_from"]["documents"] + report["held_out"]["texts"] == rows
    assert report["held_out"]["ratio"] > 1.2
    assert report["compare"]["ascii_texts"] > 0 and report["compare"]["ascii_texts_changed"] == 0
    assert "held_out" in stdout and "compare" in stdout


def test_all_scripts_learns_ascii_tokens(base_dir, tmp_path):
    corpus = tmp_path / "en.txt"
    corpus.write_text("Tokenizers tokenize tokenized tokenization, zyxwvut zyxwvut.\n" * 6, encoding="utf-8")
    out = tmp_path / "out"
    code, _, stderr = run_cli(extend_args(base_dir, corpus, out, "--holdout", 0, "--all-scripts"))
    assert code == 0, stderr
    record = read_extension(out)
    assert record["text_filter"] == "any"
    assert record["added"] > 0 and any(e["text"].isascii() for e in record["new_tokens"])


# --- bad input: exit 2, one line on stderr naming what is at fault, nothing written ---------------


def check_refused(args: list, *expected: str) -> str:
    code, stdout, stderr = run_cli(args)
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    assert stderr.startswith("chattune: error: ") and stderr.endswith("\n")
    assert stderr.count("\n") == 1, stderr
    for part in expected:
        assert part in stderr, (part, stderr)
    return stderr


def extend_args(base_dir, corpus, out, *more) -> list:
    return ["tokenizer", "extend", base_dir, "--corpus", corpus, "--add", 20, "--out", out, *more]


def test_empty_corpus(base_dir, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n   \n\n", encoding="utf-8")
    check_refused(extend_args(base_dir, corpus, tmp_path / "out"),
                  "--corpus: no text to learn from", f"{corpus}: 3 read, 3 empty")
    assert not (tmp_path / "out").exists()


def test_empty_jsonl_corpus(base_dir, tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("", encoding="utf-8")
    check_refused(extend_args(base_dir, corpus, tmp_path / "out"), f"{corpus}: 0 read, 0 empty")


def test_binary_corpus(base_dir, tmp_path):
    corpus = tmp_path / "data.txt"
    corpus.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    check_refused(extend_args(base_dir, corpus, tmp_path / "out"), f"{corpus}: looks binary")
    assert not (tmp_path / "out").exists()


def test_corpus_not_utf8(base_dir, tmp_path, zh_train):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(zh_train[0].encode("utf-8") + b"\n" + "café crème".encode("latin-1") + b"\n")
    check_refused(extend_args(base_dir, corpus, tmp_path / "out"), f"{corpus}:2: not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_missing_corpus(base_dir, tmp_path):
    corpus = tmp_path / "nope.jsonl"
    check_refused(extend_args(base_dir, corpus, tmp_path / "out"), f"{corpus}: no such file")


def test_missing_compare_file(base_dir, files, tmp_path):
    missing = tmp_path / "missing.txt"
    check_refused(extend_args(base_dir, files["zh"], tmp_path / "out", "--compare", missing),
                  f"{missing}: no such file")


def test_english_corpus_has_nothing_to_add(base_dir, files, tmp_path):
    check_refused(extend_args(base_dir, files["en"], tmp_path / "out", "--holdout", 0),
                  "no new token occurs at least --min-frequency 2", "non-ASCII")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("add", ["0", "-1"])
def test_add_below_one(base_dir, files, tmp_path, add):
    args = ["tokenizer", "extend", base_dir, "--corpus", files["zh"], "--add", add, "--out", tmp_path / "out"]
    check_refused(args, f"--add: {add};", "at least 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("holdout", ["1.0", "-0.1"])
def test_bad_holdout(base_dir, files, tmp_path, holdout):
    check_refused(extend_args(base_dir, files["zh"], tmp_path / "out", "--holdout", holdout),
                  f"--holdout: {float(holdout)}")


def test_out_is_a_non_empty_folder(base_dir, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    check_refused(extend_args(base_dir, files["zh"], out), f"--out: {out} is not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_is_a_file(base_dir, files, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("{}", encoding="utf-8")
    check_refused(extend_args(base_dir, files["zh"], out), f"--out: {out} is a file")
    assert out.read_text(encoding="utf-8") == "{}"


def test_empty_out_folder_is_used(base_dir, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_cli(extend_args(base_dir, files["zh"], out))
    assert code == 0, stderr
    assert (out / EXTENSION_NAME).is_file()


def test_wordpiece_base(files, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, "[PAD]": 2, "a": 3, "b": 4, "##b": 5, "中": 6}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "wordpiece"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[SEP]",
                            pad_token="[PAD]").save_pretrained(base)
    check_refused(extend_args(base, files["zh"], tmp_path / "out"), f"{base}: cannot extend a WordPiece")
    assert not (tmp_path / "out").exists()


def test_missing_base(files, tmp_path):
    base = tmp_path / "no-model"
    check_refused(extend_args(base, files["zh"], tmp_path / "out"), str(base))
