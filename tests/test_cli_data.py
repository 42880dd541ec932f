"""``chattune data convert`` and ``chattune data inspect`` through ``chattune.cli.main``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.config import DataSource
from chattune.data.sources import read_source
from tests.data.toolcall_rows import CONVERT_CURRENCY, GLAIVE_ROW, write_toolcall_file


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


class TestConvertToolCalling:
    def test_glaive_format_file_writes_rows_with_tools(self, tmp_path, capsys):
        src = tmp_path / "glaive_toolcall.json"
        plain = {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
            "tools": "[]",
        }
        src.write_text(json.dumps([GLAIVE_ROW, plain]), encoding="utf-8")
        out = tmp_path / "out.jsonl"
        assert main(["data", "convert", str(src), "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "glaive_toolcall.json") == ["2", "2", "0", "0", "2"]
        assert "    1 rows with tools, 1 tool calls" in stdout
        first, second = read_jsonl(out)
        assert first == {
            "messages": [
                {"role": "user", "content": GLAIVE_ROW["conversations"][0]["value"]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "name": "convert_currency",
                            "arguments": {
                                "amount": 1000,
                                "from_currency": "USD",
                                "to_currency": "EUR",
                            },
                        }
                    ],
                },
                {
                    "role": "tool",
                    "content": GLAIVE_ROW["conversations"][2]["value"],
                    "name": "convert_currency",
                },
                {
                    "role": "assistant",
                    "content": "Sure, 1000 US dollars is approximately 850 Euros.",
                },
            ],
            "tools": [CONVERT_CURRENCY],
            "source": f"{src}#0",
        }
        assert second == {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "source": f"{src}#1",
        }

    def test_generated_file_converts_and_converts_again_stably(self, tmp_path, capsys):
        src, expected = write_toolcall_file(tmp_path / "toolcall_300.json")
        first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
        assert main(["data", "convert", str(src), "--out", str(first)]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "toolcall_300.json") == ["300", "230", "60", "10", "230"]
        assert "    180 rows with tools, 210 tool calls" in stdout
        assert "wrote 230 records" in stdout
        rows = read_jsonl(first)
        kept = [e for e in expected if e.outcome == "converted"]
        assert ["tools" in row for row in rows] == [e.has_tools for e in kept]
        assert main(["data", "convert", str(first), "--out", str(second)]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "1.jsonl") == ["230", "230", "0", "0", "230"]
        assert "    180 rows with tools, 210 tool calls" in stdout
        again = read_jsonl(second)
        assert [(r["messages"], r.get("tools")) for r in again] == [
            (r["messages"], r.get("tools")) for r in rows
        ]

    def test_inspect_shows_the_tool_counts(self, tmp_path, capsys):
        src, _ = write_toolcall_file(tmp_path / "toolcall_300.json")
        assert main(["data", "inspect", str(src), "--show", "1"]) == 0
        stdout = capsys.readouterr().out
        assert "    180 rows with tools, 210 tool calls" in stdout
        assert "skipped 10 x has no tool result" in stdout
        shown = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert shown[0]["tools"] == [CONVERT_CURRENCY]


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


# --------------------------------------------------------------------------- hostile input, one line each


def one_error_line(argv, capsys) -> str:
    """Run the CLI expecting exit status 2, one ``chattune: error:`` line on stderr and no
    traceback; return the message."""
    capsys.readouterr()  # drop what fixtures printed (progress bars of building a tiny model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chattune: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("chattune: error: ")


class TestHostileConvertAndInspect:
    @pytest.mark.parametrize("command", ["inspect", "convert"])
    def test_a_directory(self, tmp_path, capsys, command):
        folder = tmp_path / "data.jsonl"
        folder.mkdir()
        extra = ["--out", str(tmp_path / "o.jsonl")] if command == "convert" else []
        err = one_error_line(["data", command, str(folder), *extra], capsys)
        assert err == f"{folder}: is a directory; expected a data file (.json, .jsonl, .csv or .parquet)"

    @pytest.mark.parametrize(
        "name,content,expected",
        [
            ("garbage.json", bytes(range(128, 256)) * 4, ": not UTF-8 text (invalid start byte at byte 0)"),
            ("utf16.jsonl", '{"instruction": "a", "output": "b"}\n'.encode("utf-16"), ": not UTF-8 text"),
            ("n.json", b"42", ": expected a JSON array or object, got int"),
            ("deep.json", b"[" * 100_000 + b"]" * 100_000, ": JSON nested too deeply to read"),
            ("big.jsonl", b'{"instruction": ' + b"1" * 5000 + b', "output": "a"}\n',
             ":1: unreadable JSON value: Exceeds the limit (4300 digits)"),
            ("fake.parquet", b"not parquet at all", ": not a readable Parquet file"),
        ],
    )
    def test_unreadable_files(self, tmp_path, capsys, name, content, expected):
        src = tmp_path / name
        src.write_bytes(content)
        err = one_error_line(["data", "inspect", str(src)], capsys)
        assert err.startswith(f"{src}{expected}")

    def test_csv_without_header_is_summarised_not_a_crash(self, tmp_path, capsys):
        src = tmp_path / "noheader.csv"
        src.write_text("q1,a1\nq2,a2\n")
        assert main(["data", "inspect", str(src)]) == 0
        stdout = capsys.readouterr().out
        assert summary_row(stdout, "noheader.csv") == ["1", "0", "1", "0", "0"]
        assert f"e.g. {src}:2: unknown format: keys ['a1', 'q1']" in stdout

    def test_csv_with_more_cells_than_header(self, tmp_path, capsys):
        src = tmp_path / "ragged.csv"
        src.write_text("a,b\n1,2,3\n")
        assert main(["data", "inspect", str(src)]) == 0
        assert "keys ['(cells past the header)', 'a', 'b']" in capsys.readouterr().out

    def test_unpaired_surrogate_is_skipped_and_convert_still_writes(self, tmp_path, capsys):
        src = tmp_path / "s.jsonl"
        src.write_text('{"instruction": "x\\ud800", "output": "y"}\n{"instruction": "q", "output": "a"}\n')
        out = tmp_path / "o.jsonl"
        assert main(["data", "convert", str(src), "--out", str(out)]) == 0
        assert "skipped 1 x not valid Unicode text" in capsys.readouterr().out
        assert len(read_jsonl(out)) == 1


    def test_a_negative_show_is_refused(self, tmp_path, capsys):
        src = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "q1", "output": "a1"}])
        assert one_error_line(["data", "inspect", str(src), "--show", "-1"], capsys) == "--show: must be >= 0, got -1"


@pytest.fixture
def prepare_setup(tiny_models, tmp_path):
    """(config path, good data path, tiny model path) for ``chattune data prepare``."""
    model = tiny_models("glm4")
    data = write_jsonl(tmp_path / "good.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {model}\ntrain_files: [{data}]\n", encoding="utf-8")
    return config, data, model


def damaged_copy(model: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(model, tmp_path / name))


class TestPrepare:
    def test_encodes_then_reuses(self, prepare_setup, capsys):
        config, _, _ = prepare_setup
        capsys.readouterr()
        assert main(["data", "prepare", str(config)]) == 0
        first = capsys.readouterr().out
        assert "[train] rows in 6, out 6" in first and "encoded and cached data set at" in first
        assert main(["data", "prepare", str(config)]) == 0
        assert "reused cached data set at" in capsys.readouterr().out

    def prepare_error(self, prepare_setup, capsys, *overrides) -> str:
        config, _, _ = prepare_setup
        return one_error_line(["data", "prepare", str(config), *overrides], capsys)

    # model and tokenizer

    def test_model_path_is_a_file(self, prepare_setup, tmp_path, capsys):
        path = tmp_path / "weights.bin"
        path.write_bytes(b"xx")
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={path}")
        assert err.startswith(f"could not load the tokenizer '{path}': it is a file; expected a model folder")

    def test_model_path_is_an_empty_folder(self, prepare_setup, tmp_path, capsys):
        empty = tmp_path / "empty"
        empty.mkdir()
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={empty}")
        assert err.startswith(f"could not load the tokenizer '{empty}': empty folder; expected config.json")

    def test_model_path_missing(self, prepare_setup, tmp_path, capsys):
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={tmp_path / 'nope'}")
        assert err.startswith(f"could not load the tokenizer '{tmp_path / 'nope'}': no such folder")

    def test_no_model_given(self, prepare_setup, capsys):
        err = self.prepare_error(prepare_setup, capsys, "model_name_or_path=")
        assert err.startswith("model_name_or_path: no base model given")

    def test_corrupt_config_json(self, prepare_setup, tmp_path, capsys):
        model = damaged_copy(prepare_setup[2], tmp_path, "corrupt")
        (model / "config.json").write_text("{not json")
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={model}")
        assert err == (f"could not load the tokenizer '{model}': {model / 'config.json'}: not valid JSON "
                       "(Expecting property name enclosed in double quotes at line 1 column 2); expected a JSON object")

    def test_tokenizer_without_eos(self, prepare_setup, tmp_path, capsys):
        model = damaged_copy(prepare_setup[2], tmp_path, "no-eos")
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("eos_token")
        config.pop("pad_token")
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={model}", "template=alpaca")
        assert err.startswith(f"tokenizer {model}: has no EOS token, which ends every trained answer; "
                              "expected eos_token set in its tokenizer_config.json")

    def test_template_tokenizer_without_chat_template(self, prepare_setup, tmp_path, capsys):
        model = damaged_copy(prepare_setup[2], tmp_path, "no-template")
        (model / "chat_template.jinja").unlink()
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={model}", "template=tokenizer")
        assert err.startswith(f"template 'tokenizer': the tokenizer {model} has no chat template; "
                              "choose a named template (alpaca,")

    def test_chat_template_that_raises(self, prepare_setup, tmp_path, capsys):
        model = damaged_copy(prepare_setup[2], tmp_path, "raising")
        (model / "chat_template.jinja").write_text("{{ raise_exception('System role not supported') }}")
        err = self.prepare_error(prepare_setup, capsys, f"model_name_or_path={model}")
        assert err == ("template 'tokenizer', rendering a probe conversation (a system message and two turns): "
                       "the tokenizer's chat template failed: TemplateError: System role not supported; "
                       "fix the template or choose a named template")

    def test_unknown_template(self, prepare_setup, capsys):
        err = self.prepare_error(prepare_setup, capsys, "template=alpacca")
        assert err.startswith("unknown template 'alpacca'; expected 'auto', 'tokenizer' or one of ['alpaca'")

    # data

    @pytest.mark.parametrize(
        "name,content,expected",
        [
            ("garbage.json", bytes(range(128, 256)) * 4, ": not UTF-8 text"),
            ("n.json", b"42", ": expected a JSON array or object, got int"),
            ("fake.parquet", b"not parquet", ": not a readable Parquet file"),
        ],
    )
    def test_unreadable_train_file(self, prepare_setup, tmp_path, capsys, name, content, expected):
        src = tmp_path / name
        src.write_bytes(content)
        err = self.prepare_error(prepare_setup, capsys, f"train_files=[{src}]")
        assert err.startswith(f"{src}{expected}")

    def test_empty_train_file(self, prepare_setup, tmp_path, capsys):
        src = tmp_path / "empty.jsonl"
        src.write_text("")
        err = self.prepare_error(prepare_setup, capsys, f"train_files=[{src}]")
        assert err == (f"train_files: no training rows left after reading and encoding: {src}: "
                       "no rows (empty file, or a CSV with a header only)")

    def test_csv_without_header(self, prepare_setup, tmp_path, capsys):
        src = tmp_path / "noheader.csv"
        src.write_text("q1,a1\nq2,a2\n")
        err = self.prepare_error(prepare_setup, capsys, f"train_files=[{src}]")
        assert err.startswith(f"train_files: no training rows left after reading and encoding: {src}: "
                              f"1 row read, 1 skipped (1 x unknown format); first error: {src}:2: unknown "
                              "format: keys ['a1', 'q1']")

    def test_every_row_dropped_by_max_seq_length(self, prepare_setup, capsys):
        data = prepare_setup[1]
        err = self.prepare_error(prepare_setup, capsys, "template=alpaca", "max_seq_length=10")
        assert err == (f"train_files: no training rows left after reading and encoding: {data}: 6 rows read; "
                       "all 6 rows were dropped at encoding (6 x prompt fills max_seq_length: no answer token "
                       "would remain) with max_seq_length=10; raise max_seq_length or choose a template with "
                       "shorter markers")

    def test_column_map_naming_missing_columns(self, prepare_setup, capsys):
        data = prepare_setup[1]
        err = self.prepare_error(prepare_setup, capsys,
                                 f"train_files=[{{path: {data}, columns: {{prompt: content, response: summary}}}}]")
        assert err.startswith(f"train_files: no training rows left after reading and encoding: {data}: "
                              "6 rows read, 6 skipped (6 x missing or empty column 'content' (mapped to prompt))")

    def test_train_files_is_a_directory(self, prepare_setup, tmp_path, capsys):
        err = self.prepare_error(prepare_setup, capsys, f"train_files=[{tmp_path}]")
        assert err == f"{tmp_path}: is a directory; expected a data file (.json, .jsonl, .csv or .parquet)"

    def test_missing_eval_file(self, prepare_setup, tmp_path, capsys):
        err = self.prepare_error(prepare_setup, capsys, f"eval_files=[{tmp_path / 'eval.jsonl'}]")
        assert err == f"{tmp_path / 'eval.jsonl'}: no such file"

    def test_no_train_files(self, prepare_setup, capsys):
        err = self.prepare_error(prepare_setup, capsys, "train_files=[]")
        assert err.startswith("train_files: no training data given")

    def test_eval_fraction_leaving_no_train_rows(self, prepare_setup, tmp_path, capsys):
        src = write_jsonl(tmp_path / "two.jsonl", [{"instruction": "q", "output": "a"},
                                                   {"instruction": "q2", "output": "a2"}])
        err = self.prepare_error(prepare_setup, capsys, f"train_files=[{src}]", "eval_fraction=0.9")
        assert err.startswith("eval_fraction: 0.9 holds out all 2 training records")

    def test_all_duplicates_leave_one_row(self, prepare_setup, tmp_path, capsys):
        src = write_jsonl(tmp_path / "dup.jsonl", [{"instruction": "q", "output": "a"}] * 3)
        config = prepare_setup[0]
        capsys.readouterr()
        assert main(["data", "prepare", str(config), f"train_files=[{src}]"]) == 0
        out = capsys.readouterr().out
        assert "[train] rows in 1, out 1" in out
        assert summary_row(out, "dup.jsonl") == ["3", "1", "0", "2", "1"]

    def test_cache_dir_is_a_file(self, prepare_setup, tmp_path, capsys):
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        err = self.prepare_error(prepare_setup, capsys, f"cache_dir={blocker}")
        assert err == (f"cache_dir: cannot write the encoded data set to {blocker}/datasets (from cache_dir): "
                       "Not a directory; set cache_dir to a writable folder")


def test_convert_to_an_unwritable_path_is_one_error_line(tmp_path, capsys):
    source = tmp_path / "in.json"
    source.write_text('[{"instruction": "hi", "output": "there"}]')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (tmp_path, blocker / "under" / "out.jsonl"):
        assert main(["data", "convert", str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("chattune: error:") == 1 and "--out" in err and "Traceback" not in err


def test_train_without_a_config_is_one_error_line(capsys):
    assert main(["train"]) == 2
    assert "give a config file" in capsys.readouterr().err
