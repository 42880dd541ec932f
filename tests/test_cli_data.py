"""``chattune data convert`` and ``chattune data inspect`` through ``chattune.cli.main``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.config import DataSource
from chattune.data.sources import read_source


def write_jsonl(path: Path, values) -> Path:
    path.write_text(
        "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8"
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def summary_row(text: str, name: str) -> list[str]:
    """The numbers of a summary-table row whose file column ends with ``name``."""
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0].endswith(name):
            return cells[1:]
    raise AssertionError(f"no row for {name} in:\n{text}")


class TestConvert:
    def test_alpaca_en_to_canonical_jsonl(self, shared_data, tmp_path, capsys):
        src = shared_data / "alpaca_en_demo.json"
        out = tmp_path / "sub" / "en.jsonl"
        assert main(["data", "convert", str(src), "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "alpaca_en_demo.json") == ["999", "985", "0", "14", "985"]
        assert f"wrote 985 records to {out}" in stdout

        rows = read_jsonl(out)
        assert len(rows) == 985
        assert all(set(r) == {"messages", "source"} for r in rows)
        assert rows[0]["source"] == f"{src}#0"

        # Re-reading the output through the readers gives the same messages.
        original, _ = read_source(DataSource(str(src)))
        again, summary = read_source(DataSource(str(out)))
        assert [r.messages for r in again] == [r.messages for r in original]
        assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (
            985,
            985,
            0,
            0,
        )

    def test_zh_text_written_as_utf8_not_escaped(self, shared_data, tmp_path, capsys):
        out = tmp_path / "zh.jsonl"
        assert (
            main(["data", "convert", str(shared_data / "alpaca_zh_demo.json"), "--out", str(out)])
            == 0
        )
        capsys.readouterr()
        text = out.read_text(encoding="utf-8")
        assert len(text.splitlines()) == 992
        assert "\\u" not in text.splitlines()[0]

    def test_several_inputs_and_keep_duplicates(self, shared_data, tmp_path, capsys):
        out = tmp_path / "mix.jsonl"
        inputs = [
            str(shared_data / "alpaca_en_demo.json"),
            str(shared_data / "axolotl_conversation.json"),
        ]
        assert main(["data", "convert", *inputs, "--keep-duplicates", "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        rows = read_jsonl(out)
        assert len(rows) == 999 + 1
        assert len(rows[-1]["messages"]) == 12
        assert summary_row(stdout, "axolotl_conversation.json") == ["1", "1", "0", "0", "1"]

    def test_csv_with_column_map(self, tmp_path, capsys):
        src = tmp_path / "ad.csv"
        with src.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerows([["content", "summary"], ["类型#裤", "宽松的裤子"], ["类型#裙", ""]])
        out = tmp_path / "ad.jsonl"
        rc = main(
            [
                "data",
                "convert",
                str(src),
                "--columns",
                "prompt=content,response=summary",
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "ad.csv") == ["2", "1", "1", "0", "1"]
        assert "skipped 1 x missing or empty column 'summary' (mapped to response)" in stdout
        assert read_jsonl(out) == [
            {
                "messages": [
                    {"role": "user", "content": "类型#裤"},
                    {"role": "assistant", "content": "宽松的裤子"},
                ],
                "source": f"{src}:2",
            }
        ]

    def test_converting_the_output_again_is_stable(self, tmp_path, capsys):
        src = write_jsonl(
            tmp_path / "a.jsonl",
            [
                {
                    "instruction": "Add",
                    "input": "1+1",
                    "output": "2",
                    "system": "S",
                    "history": [["hi", "hello"]],
                },
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            ],
        )
        first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
        assert main(["data", "convert", str(src), "--out", str(first)]) == 0
        assert main(["data", "convert", str(first), "--out", str(second)]) == 0
        capsys.readouterr()
        assert [r["messages"] for r in read_jsonl(first)] == [
            r["messages"] for r in read_jsonl(second)
        ]
        assert read_jsonl(first)[0]["messages"][3] == {
            "role": "user",
            "content": "Add",
            "input": "1+1",
        }

    def test_round_trip_with_unicode_line_separator(self, tmp_path, capsys):
        src = tmp_path / "a.json"
        src.write_text(json.dumps([{"instruction": "a\u2028b", "output": "c"}]), encoding="utf-8")
        out = tmp_path / "out.jsonl"
        assert main(["data", "convert", str(src), "--out", str(out)]) == 0
        again, _ = read_source(DataSource(str(out)))
        assert again[0].messages[0]["content"] == "a\u2028b"


class TestInspect:
    def test_prints_the_table_and_writes_nothing(self, shared_data, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        before = files_under(tmp_path)
        inputs = [
            str(shared_data / n)
            for n in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "axolotl_conversation.json")
        ]
        assert main(["data", "inspect", *inputs]) == 0
        stdout = capsys.readouterr().out
        assert stdout.splitlines()[0].split() == [
            "file",
            "read",
            "converted",
            "skipped",
            "duplicated",
            "kept",
        ]
        assert summary_row(stdout, "alpaca_en_demo.json") == ["999", "985", "0", "14", "985"]
        assert summary_row(stdout, "alpaca_zh_demo.json") == ["1000", "992", "0", "8", "992"]
        assert summary_row(stdout, "axolotl_conversation.json") == ["1", "1", "0", "0", "1"]
        assert "wrote" not in stdout
        assert files_under(tmp_path) == before

    def test_reasons_examples_and_show(self, tmp_path, capsys):
        src = write_jsonl(
            tmp_path / "m.jsonl",
            [
                {"instruction": "q1", "output": "a1"},
                {"instruction": "q2"},
                {"instruction": "q3", "output": 3},
                {"instruction": "q4", "output": "a4"},
            ],
        )
        before = files_under(tmp_path)
        assert main(["data", "inspect", str(src), "--show", "1"]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "m.jsonl") == ["4", "2", "2", "0", "2"]
        assert "skipped 1 x unknown format" in stdout
        assert "skipped 1 x expected a string" in stdout
        assert f"e.g. {src}:2: unknown format" in stdout
        shown = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert shown == [
            {
                "messages": [
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                ],
                "source": f"{src}:1",
            }
        ]
        assert files_under(tmp_path) == before


class TestBadInput:
    def run_error(self, argv, capsys) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("chattune: error: ")
        return captured.err

    def test_malformed_json(self, tmp_path, capsys):
        src = tmp_path / "bad.json"
        src.write_text(
            '[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]'
        )
        out = tmp_path / "out.jsonl"
        err = self.run_error(["data", "convert", str(src), "--out", str(out)], capsys)
        assert f"{src}:2:" in err and "malformed JSON" in err
        assert not out.exists()

    def test_malformed_jsonl_in_inspect(self, tmp_path, capsys):
        src = tmp_path / "bad.jsonl"
        src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
        err = self.run_error(["data", "inspect", str(src)], capsys)
        assert f"{src}:2:" in err

    def test_missing_file(self, tmp_path, capsys):
        src = tmp_path / "nope.jsonl"
        err = self.run_error(["data", "inspect", str(src)], capsys)
        assert f"{src}: no such file" in err

    def test_unknown_file_type(self, tmp_path, capsys):
        src = tmp_path / "notes.txt"
        src.write_text("plain text\n")
        err = self.run_error(
            ["data", "convert", str(src), "--out", str(tmp_path / "o.jsonl")], capsys
        )
        assert f"{src}: unknown file type .txt" in err

    def test_strict_names_line_and_field(self, tmp_path, capsys):
        src = write_jsonl(
            tmp_path / "m.jsonl",
            [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ["a"]}],
        )
        out = tmp_path / "o.jsonl"
        err = self.run_error(["data", "convert", str(src), "--strict", "--out", str(out)], capsys)
        assert f"{src}:2.output: expected a string, got list" in err
        assert not out.exists()

    def test_strict_roles_out_of_order(self, tmp_path, capsys):
        src = tmp_path / "sg.json"
        src.write_text(
            json.dumps(
                {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}
            )
        )
        err = self.run_error(["data", "inspect", str(src), "--strict"], capsys)
        assert f"{src}#0: messages[0].role" in err and "roles out of order" in err

    def test_bad_column_map_syntax(self, tmp_path, capsys):
        src = write_jsonl(tmp_path / "a.jsonl", [{"content": "c", "summary": "s"}])
        err = self.run_error(["data", "inspect", str(src), "--columns", "prompt"], capsys)
        assert err.startswith("chattune: error: --columns: expected target=column pairs")
        assert "got 'prompt'" in err

    def test_bad_column_map_target_exits_2(self, tmp_path, capsys):
        src = write_jsonl(tmp_path / "a.jsonl", [{"content": "c", "summary": "s"}])
        err = self.run_error(["data", "inspect", str(src), "--columns", "prompt=content"], capsys)
        assert f"{src}: column map needs 'response'" in err

    def test_unknown_format_choice(self, tmp_path, capsys):
        src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
        with pytest.raises(SystemExit) as info:
            main(["data", "inspect", str(src), "--format", "xml"])
        assert info.value.code == 2
        assert "invalid choice: 'xml'" in capsys.readouterr().err

    def test_non_utf8_csv_exits_2(self, tmp_path, capsys):
        src = tmp_path / "in.csv"
        src.write_bytes("content,summary\ncaf\xe9,x\n".encode("latin-1"))
        columns = "prompt=content,response=summary"
        err = self.run_error(["data", "inspect", str(src), "--columns", columns], capsys)
        assert f"{src}: not UTF-8" in err

    def test_malformed_history_column_exits_2_when_strict(self, tmp_path, capsys):
        src = tmp_path / "in.csv"
        src.write_text('content,summary,hist\nq,a,"[oops"\n', encoding="utf-8")
        columns = "prompt=content,response=summary,history=hist"
        err = self.run_error(
            ["data", "inspect", str(src), "--strict", "--columns", columns], capsys
        )
        assert f"{src}:2.hist: history is not a JSON list of pairs" in err

    def test_malformed_history_column_is_skipped_when_not_strict(self, tmp_path, capsys):
        src = tmp_path / "in.csv"
        src.write_text('content,summary,hist\nq,a,"[oops"\nq2,a2,\n', encoding="utf-8")
        columns = "prompt=content,response=summary,history=hist"
        assert main(["data", "inspect", str(src), "--columns", columns]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "in.csv") == ["2", "1", "1", "0", "1"]
        assert f"e.g. {src}:2.hist: history is not a JSON list of pairs" in stdout
