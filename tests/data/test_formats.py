"""Readers and record formats: every file type, every layout, and the errors for bad input.

Everything here runs on small files written into ``tmp_path``; the real data in
../shared/data is exercised in test_sources.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chattune.data.formats import DataFileError, RawRow, read_rows, to_record
from chattune.data.records import RecordError, tool_call_count, user_text, validate_messages
from tests.data.toolcall_rows import (
    CALCULATE_TIP,
    CONVERT_CURRENCY,
    GET_WEATHER,
    GLAIVE_ROW,
    tools_column,
)

ALPACA = {"instruction": "Say hi", "input": "", "output": "Hi!"}
CHATGLM_ADVERTISE = [  # ChatGLM AdvertiseGen style rows
    {"content": "类型#裤*版型#宽松", "summary": "宽松的阔腿裤"},
    {"content": "类型#上衣*颜色#白色", "summary": "白色上衣，清爽"},
]
AD_COLUMNS = {"prompt": "content", "response": "summary"}


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, values) -> Path:
    path.write_text(
        "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8"
    )
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def convert_all(path: Path, fmt: str = "auto", columns=None) -> list:
    """Every row of a file as a Record (raising at the first bad one)."""
    return [to_record(row, fmt, columns) for row in read_rows(path)]


def loc(path: Path, suffix: str) -> str:
    """A regex matching ``path`` followed by a location suffix, escaped."""
    return re.escape(f"{path}{suffix}")


# --------------------------------------------------------------------------- file types


class TestFileTypes:
    def test_json_array_rows_are_located_by_index(self, tmp_path):
        path = write_json(tmp_path / "a.json", [ALPACA, {**ALPACA, "output": "Hello!"}])
        rows = list(read_rows(path))
        assert [r.where for r in rows] == [f"{path}#0", f"{path}#1"]
        assert [r.value["output"] for r in rows] == ["Hi!", "Hello!"]

    def test_single_json_object_is_one_row(self, tmp_path):
        path = write_json(tmp_path / "one.json", ALPACA)
        rows = list(read_rows(path))
        assert len(rows) == 1
        assert rows[0].where == f"{path}#0"
        assert rows[0].value == ALPACA

    def test_jsonl_rows_are_located_by_line_and_blank_lines_skipped(self, tmp_path):
        path = tmp_path / "a.jsonl"
        path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps({**ALPACA, "output": "Yo"}) + "\n")
        rows = list(read_rows(path))
        assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]
        assert [r.value["output"] for r in rows] == ["Hi!", "Yo"]

    def test_jsonl_content_in_a_json_file(self, tmp_path):
        path = write_jsonl(tmp_path / "lines.json", [ALPACA, {**ALPACA, "output": "Yo"}])
        rows = list(read_rows(path))
        assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]
        assert [to_record(r, "auto").messages[-1]["content"] for r in rows] == ["Hi!", "Yo"]

    def test_ndjson_extension_is_json_lines(self, tmp_path):
        path = write_jsonl(tmp_path / "a.ndjson", [ALPACA])
        assert [r.where for r in read_rows(path)] == [f"{path}:1"]

    def test_json_with_utf8_bom(self, tmp_path):
        path = tmp_path / "bom.json"
        path.write_bytes(json.dumps([ALPACA]).encode("utf-8-sig"))
        assert [r.value for r in read_rows(path)] == [ALPACA]

    def test_json_content_without_known_extension(self, tmp_path):
        path = write_json(tmp_path / "data.txt", [ALPACA])
        assert [r.value for r in read_rows(path)] == [ALPACA]

    def test_empty_file_has_no_rows(self, tmp_path):
        for name in ("empty.json", "empty.jsonl"):
            path = tmp_path / name
            path.write_text("  \n")
            assert list(read_rows(path)) == []

    def test_csv_with_column_map(self, tmp_path):
        path = write_csv(
            tmp_path / "ad.csv",
            ["content", "summary"],
            [[r["content"], r["summary"]] for r in CHATGLM_ADVERTISE],
        )
        records = convert_all(path, columns=AD_COLUMNS)
        assert [r.source for r in records] == [f"{path}:2", f"{path}:3"]
        assert records[0].messages == [
            {"role": "user", "content": "类型#裤*版型#宽松"},
            {"role": "assistant", "content": "宽松的阔腿裤"},
        ]
        assert records[1].messages[1]["content"] == "白色上衣，清爽"

    def test_csv_quoted_multiline_and_commas(self, tmp_path):
        path = write_csv(tmp_path / "q.csv", ["content", "summary"], [["a, b\nc", 'x, "y"']])
        (record,) = convert_all(path, columns=AD_COLUMNS)
        assert record.messages == [
            {"role": "user", "content": "a, b\nc"},
            {"role": "assistant", "content": 'x, "y"'},
        ]

    def test_csv_alpaca_headers_detected_automatically(self, tmp_path):
        path = write_csv(
            tmp_path / "alp.csv",
            ["instruction", "input", "output"],
            [["Add", "1+1", "2"], ["Say hi", "", "Hi"]],
        )
        records = convert_all(path)
        assert records[0].messages[0] == {"role": "user", "content": "Add", "input": "1+1"}
        assert records[1].messages[0] == {"role": "user", "content": "Say hi"}

    def test_parquet_with_column_map(self, tmp_path):
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "ad.parquet"
        pq.write_table(pa.Table.from_pylist(CHATGLM_ADVERTISE), path)
        records = convert_all(path, columns=AD_COLUMNS)
        assert [r.source for r in records] == [f"{path}#0", f"{path}#1"]
        assert [r.messages for r in records] == [
            [
                {"role": "user", "content": row["content"]},
                {"role": "assistant", "content": row["summary"]},
            ]
            for row in CHATGLM_ADVERTISE
        ]

    def test_parquet_openai_messages_and_magic_bytes_without_extension(self, tmp_path):
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        rows = [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ]
        path = tmp_path / "chat.bin"  # no .parquet suffix: found by its PAR1 header
        pq.write_table(pa.Table.from_pylist(rows), path)
        (record,) = convert_all(path)
        assert record.messages == rows[0]["messages"]
        assert record.source == f"{path}#0"

    def test_bad_parquet_file(self, tmp_path):
        pytest.importorskip("pyarrow")
        path = tmp_path / "broken.parquet"
        path.write_bytes(b"PAR1 not really")
        with pytest.raises(DataFileError, match=loc(path, ": not a readable Parquet file")):
            list(read_rows(path))

    def test_missing_file(self, tmp_path):
        path = tmp_path / "nope.json"
        with pytest.raises(DataFileError, match=loc(path, ": no such file")):
            list(read_rows(path))

    def test_unknown_file_type(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("just some text\n")
        with pytest.raises(
            DataFileError,
            match=loc(path, ": unknown file type .txt; expected .json, .jsonl, .csv or .parquet"),
        ):
            list(read_rows(path))

    def test_unknown_file_type_without_suffix(self, tmp_path):
        path = tmp_path / "README"
        path.write_text("hello\n")
        with pytest.raises(DataFileError, match=loc(path, ": unknown file type (none)")):
            list(read_rows(path))

    def test_json_not_utf8(self, tmp_path):
        path = tmp_path / "latin.json"
        path.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
        with pytest.raises(DataFileError, match=loc(path, ": not UTF-8 text")):
            list(read_rows(path))

    def test_json_top_level_scalar(self, tmp_path):
        path = write_json(tmp_path / "n.json", 42)
        with pytest.raises(
            DataFileError, match=loc(path, ": expected a JSON array or object, got int")
        ):
            list(read_rows(path))

    def test_tsv_is_tab_separated(self, tmp_path):
        path = tmp_path / "ad.tsv"
        path.write_text("content\tsummary\nhello, there\tworld\n", encoding="utf-8")
        (record,) = convert_all(path, columns=AD_COLUMNS)
        assert record.messages[0]["content"] == "hello, there"

    def test_csv_with_utf8_bom(self, tmp_path):
        path = tmp_path / "excel.csv"
        path.write_bytes("content,summary\nhello,world\n".encode("utf-8-sig"))
        (record,) = convert_all(path, columns=AD_COLUMNS)
        assert record.messages[0]["content"] == "hello"

    def test_csv_not_utf8(self, tmp_path):
        path = tmp_path / "latin.csv"
        path.write_bytes("content,summary\ncaf\xe9,x\n".encode("latin-1"))
        with pytest.raises(DataFileError, match=loc(path, ": not UTF-8")):
            list(read_rows(path))

    @pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
    def test_jsonl_with_unicode_line_separator_inside_a_string(self, tmp_path, char):
        path = write_jsonl(tmp_path / "sep.jsonl", [{"instruction": f"a{char}b", "output": "c"}])
        (record,) = convert_all(path)
        assert record.messages[0]["content"] == f"a{char}b"


# --------------------------------------------------------------------------- formats


def rec(value, fmt="auto", columns=None, where="f.json#0", **kwargs):
    return to_record(RawRow(value, where), fmt, columns, **kwargs)


class TestAlpaca:
    def test_system_and_history(self):
        value = {
            "system": "You are terse.",
            "history": [["Hi", "Hello."], ["How are you?", "Fine."]],
            "instruction": "Add these",
            "input": "2 and 3",
            "output": "5",
        }
        assert rec(value).messages == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "Add these", "input": "2 and 3"},
            {"role": "assistant", "content": "5"},
        ]

    def test_input_kept_apart_and_joined_by_user_text(self):
        record = rec({"instruction": "Translate", "input": "bonjour", "output": "hello"})
        user = record.messages[0]
        assert user == {"role": "user", "content": "Translate", "input": "bonjour"}
        assert user_text(user) == "Translate\nbonjour"

    def test_empty_or_missing_input_and_system_add_nothing(self):
        expected = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
        assert rec(ALPACA).messages == expected
        assert rec({"instruction": "Say hi", "output": "Hi!"}).messages == expected
        assert rec({**ALPACA, "system": "", "history": []}).messages == expected
        assert rec({**ALPACA, "input": None, "system": None, "history": None}).messages == expected

    def test_instruction_may_be_empty_when_input_is_not(self):
        record = rec({"instruction": "", "input": "text", "output": "x"})
        assert record.messages[0] == {"role": "user", "content": "", "input": "text"}

    def test_user_text_without_instruction_has_no_leading_newline(self):
        record = rec({"instruction": "", "input": "text", "output": "x"})
        assert user_text(record.messages[0]) == "text"

    def test_source_is_the_row_location(self):
        assert rec(ALPACA, where="data.jsonl:7").source == "data.jsonl:7"


class TestShareGPT:
    def test_human_gpt_and_system_turn(self):
        value = {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye"},
            ]
        }
        assert rec(value).messages == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]

    def test_top_level_system_field(self):
        value = {
            "system": "S",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        }
        assert rec(value).messages == [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]

    def test_user_assistant_names_and_role_content_keys(self):
        value = {
            "conversations": [
                {"from": "user", "value": "q1"},
                {"from": "assistant", "value": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        }
        assert rec(value).messages == [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]

    @pytest.mark.parametrize("name", ["model", "chatgpt"])
    def test_other_assistant_names(self, name):
        value = {"conversations": [{"from": "human", "value": "q"}, {"from": name, "value": "a"}]}
        assert rec(value).messages[-1] == {"role": "assistant", "content": "a"}

    def test_explicit_format(self):
        value = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
        assert rec(value, "sharegpt").messages == rec(value).messages


class TestOpenAI:
    def test_messages_kept_and_extra_keys_dropped(self):
        value = {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q", "name": "bob"},
                {"role": "assistant", "content": "a", "weight": 1},
            ],
            "id": 7,
        }
        assert rec(value).messages == [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]

    def test_input_key_survives(self):
        value = {
            "messages": [
                {"role": "user", "content": "q", "input": "ctx"},
                {"role": "assistant", "content": "a"},
            ]
        }
        assert rec(value, "openai").messages[0] == {"role": "user", "content": "q", "input": "ctx"}

    def test_need_answer_false_allows_a_trailing_user_message(self):
        value = {"messages": [{"role": "user", "content": "q"}]}
        assert rec(value, need_answer=False).messages == [{"role": "user", "content": "q"}]
        with pytest.raises(
            RecordError, match=r"the last message must be the assistant's answer, got 'user'"
        ):
            rec(value)


class TestColumns:
    def test_prompt_response(self):
        assert rec(CHATGLM_ADVERTISE[0], columns=AD_COLUMNS).messages == [
            {"role": "user", "content": CHATGLM_ADVERTISE[0]["content"]},
            {"role": "assistant", "content": CHATGLM_ADVERTISE[0]["summary"]},
        ]

    def test_every_target(self):
        value = {
            "q": "Question",
            "ctx": "Context",
            "a": "Answer",
            "sys": "System",
            "hist": '[["h1", "r1"]]',
            "unused": "x",
        }
        columns = {
            "prompt": "q",
            "query": "ctx",
            "response": "a",
            "system": "sys",
            "history": "hist",
        }
        assert rec(value, "columns", columns).messages == [
            {"role": "system", "content": "System"},
            {"role": "user", "content": "h1"},
            {"role": "assistant", "content": "r1"},
            {"role": "user", "content": "Question", "input": "Context"},
            {"role": "assistant", "content": "Answer"},
        ]

    def test_history_as_a_list(self):
        value = {"q": "Q", "a": "A", "hist": [["h", "r"]]}
        messages = rec(value, columns={"prompt": "q", "response": "a", "history": "hist"}).messages
        assert [m["content"] for m in messages] == ["h", "r", "Q", "A"]

    def test_column_map_overrides_auto_detection(self):
        value = {"instruction": "ignored", "output": "ignored", "content": "c", "summary": "s"}
        assert [m["content"] for m in rec(value, columns=AD_COLUMNS).messages] == ["c", "s"]

    def test_missing_column(self):
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0: missing or empty column 'summary' (mapped to response)"),
        ):
            rec({"content": "c"}, columns=AD_COLUMNS)

    def test_empty_prompt_column(self):
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0: missing or empty column 'content' (mapped to prompt)"),
        ):
            rec({"content": "", "summary": "s"}, columns=AD_COLUMNS)

    # A bad column map is a configuration error (DataFileError), not a bad record.
    def test_columns_format_needs_a_map(self):
        with pytest.raises(
            DataFileError, match=re.escape("f.json#0: format 'columns' needs a column map")
        ):
            rec({"content": "c"}, "columns")

    def test_map_needs_prompt_and_response(self):
        with pytest.raises(DataFileError, match=re.escape("f.json#0: column map needs 'response'")):
            rec({"content": "c"}, columns={"prompt": "content"})

    def test_unknown_target(self):
        with pytest.raises(
            DataFileError,
            match=re.escape("f.json#0: column map target 'answer' unknown; expected ['prompt'"),
        ):
            rec({"c": "c", "s": "s"}, columns={"prompt": "c", "response": "s", "answer": "s"})

    def test_non_string_column_error_names_the_column(self):
        with pytest.raises(
            RecordError, match=re.escape("f.json#0.summary: expected a string, got int")
        ):
            rec({"content": "c", "summary": 3}, columns=AD_COLUMNS)


# --------------------------------------------------------------------------- errors naming file, place, field


class TestErrors:
    def test_malformed_json_array_names_file_line_col(self, tmp_path):
        path = tmp_path / "bad.json"
        path.write_text(
            '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
        )
        with pytest.raises(
            DataFileError, match=loc(path, ":3:") + r"\d+: malformed JSON: Expecting ',' delimiter"
        ):
            list(read_rows(path))

    def test_malformed_jsonl_names_the_line(self, tmp_path):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n{oops\n")
        with pytest.raises(DataFileError, match=loc(path, ":3:2: malformed JSON")):
            list(read_rows(path))

    def test_malformed_jsonl_content_in_json_file_names_the_line(self, tmp_path):
        path = tmp_path / "lines.json"
        path.write_text(json.dumps(ALPACA) + "\n" + '{"instruction": "x",}\n')
        with pytest.raises(DataFileError, match=loc(path, ":2:") + r"\d+: malformed JSON"):
            list(read_rows(path))

    def test_missing_field_in_json_array_names_index(self, tmp_path):
        path = write_json(
            tmp_path / "a.json", [ALPACA, {"instruction": "x", "input": "", "outptu": "y"}]
        )
        with pytest.raises(
            RecordError,
            match=loc(path, "#1: unknown format: keys ['input', 'instruction', 'outptu']"),
        ):
            convert_all(path)
        with pytest.raises(RecordError, match=loc(path, "#1: missing field 'output'")):
            convert_all(path, "alpaca")

    def test_non_string_field_in_jsonl_names_line_and_field(self, tmp_path):
        path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "x", "output": 42}])
        with pytest.raises(RecordError, match=loc(path, ":2.output: expected a string, got int")):
            convert_all(path)

    def test_non_string_input(self, tmp_path):
        path = write_json(
            tmp_path / "a.json", [{"instruction": "x", "input": ["a"], "output": "y"}]
        )
        with pytest.raises(RecordError, match=loc(path, "#0.input: expected a string, got list")):
            convert_all(path)

    def test_empty_response(self, tmp_path):
        path = write_jsonl(
            tmp_path / "a.jsonl", [ALPACA, ALPACA, {"instruction": "x", "output": "  "}]
        )
        with pytest.raises(RecordError, match=loc(path, ":3: messages[1].content: empty response")):
            convert_all(path)

    def test_empty_response_in_csv_names_the_line(self, tmp_path):
        path = write_csv(tmp_path / "ad.csv", ["content", "summary"], [["a", "b"], ["c", ""]])
        with pytest.raises(
            RecordError,
            match=loc(path, ":3: missing or empty column 'summary' (mapped to response)"),
        ):
            convert_all(path, columns=AD_COLUMNS)

    def test_missing_column_in_csv_names_the_line(self, tmp_path):
        path = write_csv(tmp_path / "ad.csv", ["content", "answer"], [["a", "b"]])
        with pytest.raises(
            RecordError,
            match=loc(path, ":2: missing or empty column 'summary' (mapped to response)"),
        ):
            convert_all(path, columns=AD_COLUMNS)

    def test_empty_user_message(self):
        with pytest.raises(
            RecordError, match=re.escape("f.json#0: messages[0].content: empty user message")
        ):
            rec({"instruction": " ", "input": "", "output": "x"})

    def test_roles_out_of_order(self, tmp_path):
        value = {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
        path = write_jsonl(tmp_path / "o.jsonl", [value])
        with pytest.raises(
            RecordError,
            match=loc(
                path,
                ":1: messages[1].role: expected 'assistant' here (roles out of order), got 'user'",
            ),
        ):
            convert_all(path)

    def test_sharegpt_starting_with_gpt_is_out_of_order(self):
        value = {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}
        with pytest.raises(
            RecordError,
            match=re.escape(
                "messages[0].role: expected 'user' here (roles out of order), got 'assistant'"
            ),
        ):
            rec(value)

    def test_system_not_first(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        }
        with pytest.raises(
            RecordError,
            match=re.escape(
                "f.json#0: messages[1]: a system message may only come first (roles out of order)"
            ),
        ):
            rec(value)

    def test_unknown_role(self):
        value = {"messages": [{"role": "bot", "content": "q"}]}
        with pytest.raises(
            RecordError,
            match=re.escape(
                "messages[0].role: expected one of ['system', 'user', 'assistant'], got 'bot'"
            ),
        ):
            rec(value)

    def test_non_string_message_content(self):
        value = {
            "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]
        }
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0: messages[0].content: expected a string, got NoneType"),
        ):
            rec(value)

    def test_unknown_sharegpt_speaker(self):
        value = {"conversations": [{"from": "narrator", "value": "q"}]}
        with pytest.raises(
            RecordError,
            match=re.escape(
                "f.json#0.conversations[0].from: expected one of ['assistant', 'chatgpt', 'gpt', 'human', 'model', 'system', 'user'], got 'narrator'"
            ),
        ):
            rec(value)

    def test_non_string_sharegpt_value(self):
        value = {"conversations": [{"from": "human", "value": 5}]}
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0.conversations[0].value: expected a string, got int"),
        ):
            rec(value)

    def test_conversations_not_a_list(self):
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0.conversations: expected a list of {from, value} objects"),
        ):
            rec({"conversations": "hi"})

    def test_messages_not_a_list(self):
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0.messages: expected a list of {role, content} objects"),
        ):
            rec({"messages": {"role": "user"}})

    def test_bad_history(self):
        with pytest.raises(
            RecordError, match=re.escape("f.json#0.history[1]: expected a [query, answer] pair")
        ):
            rec({**ALPACA, "history": [["a", "b"], ["only one"]]})
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0.history: expected a list of [query, answer] pairs"),
        ):
            rec({**ALPACA, "history": "a,b"})
        with pytest.raises(
            RecordError, match=re.escape("f.json#0.history[0]: expected two strings")
        ):
            rec({**ALPACA, "history": [["a", 1]]})

    def test_unknown_format_lists_keys(self, tmp_path):
        path = write_json(tmp_path / "u.json", [{"prompt": "p", "completion": "c"}])
        with pytest.raises(
            RecordError,
            match=loc(
                path,
                "#0: unknown format: keys ['completion', 'prompt']; expected alpaca (instruction, input, output), sharegpt (conversations), openai (messages)",
            ),
        ):
            convert_all(path)

    def test_unknown_format_name(self):
        with pytest.raises(
            RecordError,
            match=re.escape("f.json#0: unknown format 'xml'; expected one of ['auto', 'alpaca'"),
        ):
            rec(ALPACA, "xml")

    def test_row_not_an_object(self, tmp_path):
        path = write_json(tmp_path / "s.json", ["just a string"])
        with pytest.raises(RecordError, match=loc(path, "#0: expected a JSON object, got str")):
            convert_all(path)
        with pytest.raises(RecordError, match=loc(path, "#0: expected a JSON object, got str")):
            convert_all(path, "alpaca")

    def test_explicit_format_that_does_not_fit(self):
        value = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
        with pytest.raises(RecordError, match=re.escape("f.json#0: missing field 'instruction'")):
            rec(value, "alpaca")

    def test_unhashable_sharegpt_speaker(self):
        value = {
            "conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]
        }
        with pytest.raises(
            RecordError, match=re.escape("f.json#0.conversations[0].from: expected one of")
        ):
            rec(value)


# --------------------------------------------------------------------------- hostile files


class TestHostileFiles:
    """Input that once escaped as a traceback: each now a DataFileError/RecordError naming where."""

    def test_directory_is_named_as_such(self, tmp_path):
        folder = tmp_path / "train.jsonl"
        folder.mkdir()
        with pytest.raises(DataFileError, match=loc(folder, ": is a directory; expected a data file")):
            list(read_rows(folder))

    def test_device_file_is_not_a_regular_file(self):
        if not Path("/dev/null").exists():
            pytest.skip("no /dev/null here")
        with pytest.raises(DataFileError, match="/dev/null: not a regular file; expected a data file"):
            list(read_rows("/dev/null"))

    @pytest.mark.parametrize("name", ["garbage.json", "garbage.jsonl", "garbage.csv", "garbage"])
    def test_binary_garbage_is_not_utf8(self, tmp_path, name):
        path = tmp_path / name
        path.write_bytes(b"\x00\x81\xfe\xff" + bytes(range(256)) * 4)
        with pytest.raises(DataFileError, match=loc(path, ": not UTF-8 text")):
            list(read_rows(path))

    def test_utf16_json_is_not_utf8(self, tmp_path):
        path = tmp_path / "u16.json"
        path.write_bytes(json.dumps([ALPACA]).encode("utf-16"))
        with pytest.raises(DataFileError, match=loc(path, ": not UTF-8 text")):
            list(read_rows(path))

    @pytest.mark.parametrize("value,kind", [('"text"', "str"), ("null", "NoneType"), ("true", "bool")])
    def test_json_top_level_non_container(self, tmp_path, value, kind):
        path = tmp_path / "v.json"
        path.write_text(value)
        with pytest.raises(DataFileError, match=loc(path, f": expected a JSON array or object, got {kind}")):
            list(read_rows(path))

    def test_json_nested_too_deeply(self, tmp_path):
        path = tmp_path / "deep.json"
        path.write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(DataFileError, match=loc(path, ": JSON nested too deeply to read")):
            list(read_rows(path))

    def test_jsonl_nested_too_deeply_names_the_line(self, tmp_path):
        path = tmp_path / "deep.jsonl"
        path.write_text(json.dumps(ALPACA) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(DataFileError, match=loc(path, ":2: JSON nested too deeply")):
            list(read_rows(path))

    def test_integer_too_long_for_python(self, tmp_path):
        path = tmp_path / "big.jsonl"
        path.write_text('{"instruction": ' + "9" * 5000 + ', "output": "a"}\n')
        with pytest.raises(DataFileError, match=loc(path, ":1: unreadable JSON value: Exceeds the limit")):
            list(read_rows(path))

    def test_empty_csv_and_header_only_csv_have_no_rows(self, tmp_path):
        empty = tmp_path / "empty.csv"
        empty.write_text("")
        header = tmp_path / "header.csv"
        header.write_text("instruction,output\n")
        assert list(read_rows(empty)) == [] and list(read_rows(header)) == []

    def test_csv_without_header_names_the_first_line_as_keys(self, tmp_path):
        path = tmp_path / "noheader.csv"
        path.write_text("q1,a1\nq2,a2\n")
        (row,) = list(read_rows(path))
        with pytest.raises(RecordError, match=loc(path, ":2: unknown format: keys ['a1', 'q1']")):
            to_record(row, "auto")

    def test_csv_cells_past_the_header_are_named_not_a_type_error(self, tmp_path):
        path = tmp_path / "ragged.csv"
        path.write_text("a,b\n1,2,3\n")
        (row,) = list(read_rows(path))
        with pytest.raises(RecordError, match=re.escape("keys ['(cells past the header)', 'a', 'b']")):
            to_record(row, "auto")

    def test_csv_extra_cells_do_not_stop_a_known_layout(self, tmp_path):
        path = tmp_path / "extra.csv"
        path.write_text("instruction,output\nq,a,stray\n")
        (record,) = convert_all(path)
        assert record.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

    def test_csv_cell_longer_than_the_csv_module_default(self, tmp_path):
        import csv

        before = csv.field_size_limit()
        path = tmp_path / "long.csv"
        path.write_text("instruction,output\n" + "x" * 300_000 + ",y\n")
        (record,) = convert_all(path)
        assert len(record.messages[0]["content"]) == 300_000
        assert csv.field_size_limit() == before

    def test_malformed_csv_names_the_line(self, tmp_path, monkeypatch):
        import csv

        from chattune.data import formats

        before = csv.field_size_limit()
        monkeypatch.setattr(formats, "CSV_FIELD_LIMIT", 15)
        path = tmp_path / "m.csv"
        path.write_text("instruction,output\nq,a\n" + "x" * 20 + ",a\n")
        with pytest.raises(DataFileError, match=loc(path, ":3: malformed CSV: field larger than field limit")):
            list(read_rows(path))
        assert csv.field_size_limit() == before

    def test_parquet_suffix_on_text(self, tmp_path):
        pytest.importorskip("pyarrow")
        path = tmp_path / "fake.parquet"
        path.write_text(json.dumps([ALPACA]))
        with pytest.raises(DataFileError, match=loc(path, ": not a readable Parquet file")):
            list(read_rows(path))

    @pytest.mark.parametrize("field", ["instruction", "input", "output"])
    def test_unpaired_surrogate_is_a_record_error(self, tmp_path, field):
        value = dict(ALPACA, input="x")
        path = tmp_path / "s.jsonl"
        path.write_text(json.dumps(value).replace(f'"{field}": "', f'"{field}": "\\ud800'), encoding="utf-8")
        (row,) = list(read_rows(path))
        index, key = {"instruction": (0, "content"), "input": (0, "input"), "output": (1, "content")}[field]
        with pytest.raises(RecordError, match=loc(path, f":1: messages[{index}].{key}: not valid Unicode text")):
            to_record(row, "auto")


# --------------------------------------------------------------------------- tool calling


GLAIVE_MESSAGES = [
    {
        "role": "user",
        "content": "Hi, I need to convert 1000 US dollars to Euros. Can you help me with that?",
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "name": "convert_currency",
                "arguments": {"amount": 1000, "from_currency": "USD", "to_currency": "EUR"},
            }
        ],
    },
    {
        "role": "tool",
        "content": '{"converted_amount": 850.0, "from_currency": "USD", "to_currency": "EUR"}',
        "name": "convert_currency",
    },
    {"role": "assistant", "content": "Sure, 1000 US dollars is approximately 850 Euros."},
]
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TIP_CALL = {"name": "calculate_tip", "arguments": {"bill": 40, "percent": 15}}


def sharegpt(*turns, tools=None, **extra) -> dict:
    """A ShareGPT row of ``(from, value)`` turns; JSON values for calls and results are dumped."""
    row = {
        "conversations": [
            {"from": who, "value": value if isinstance(value, str) else json.dumps(value)}
            for who, value in turns
        ],
        **extra,
    }
    if tools is not None:
        row["tools"] = tools
    return row


def openai_call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class TestToolCallingShareGPT:
    def test_glaive_row_exact_messages_and_tools(self):
        record = rec(GLAIVE_ROW)
        assert record.messages == GLAIVE_MESSAGES
        assert record.tools == [CONVERT_CURRENCY]
        assert rec(GLAIVE_ROW, "sharegpt").messages == GLAIVE_MESSAGES
        assert record.to_json() == {
            "messages": GLAIVE_MESSAGES,
            "tools": [CONVERT_CURRENCY],
            "source": "f.json#0",
        }

    @pytest.mark.parametrize("tools", ["[]", "", "  ", [], None])
    def test_rows_without_tools_convert_as_before(self, tools):
        row = sharegpt(("human", "Hello"), ("gpt", "Hi!"), tools=tools)
        record = rec(row)
        assert record.messages == [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"},
        ]
        assert record.tools is None
        assert record.to_json() == {"messages": record.messages, "source": "f.json#0"}

    def test_tools_as_a_list_and_openai_wrappers_unwrapped(self):
        wrapped = [{"type": "function", "function": GET_WEATHER}, CALCULATE_TIP]
        extra = {**GET_WEATHER, "strict": True}  # keys other than name/description/parameters
        for tools in (wrapped, json.dumps(wrapped)):
            row = sharegpt(("human", "q"), ("gpt", "a"), tools=tools)
            assert rec(row).tools == [GET_WEATHER, CALCULATE_TIP]
        assert rec(sharegpt(("human", "q"), ("gpt", "a"), tools=[extra])).tools == [GET_WEATHER]
        assert rec(sharegpt(("human", "q"), ("gpt", "a"), tools=[{"name": "ping"}])).tools == [
            {"name": "ping"}
        ]

    def test_parallel_calls_with_one_observation_list_are_split(self):
        row = sharegpt(
            ("human", "Weather in Paris, and the tip on 40?"),
            ("function_call", [WEATHER_CALL, TIP_CALL]),
            ("observation", [{"temperature": 21}, "6.0"]),
            ("gpt", "21 degrees; tip 6."),
            tools=tools_column(GET_WEATHER, CALCULATE_TIP),
        )
        assert rec(row).messages == [
            {"role": "user", "content": "Weather in Paris, and the tip on 40?"},
            {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL, TIP_CALL]},
            {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather"},
            {"role": "tool", "content": "6.0", "name": "calculate_tip"},
            {"role": "assistant", "content": "21 degrees; tip 6."},
        ]

    def test_parallel_calls_with_one_observation_turn_each(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", [WEATHER_CALL, TIP_CALL]),
            ("observation", '["not", "split"]'),
            ("observation", "6.0"),
            ("gpt", "a"),
        )
        assert rec(row).messages[2:4] == [
            {"role": "tool", "content": '["not", "split"]', "name": "get_weather"},
            {"role": "tool", "content": "6.0", "name": "calculate_tip"},
        ]

    def test_a_single_calls_list_result_is_not_split(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", WEATHER_CALL),
            ("observation", '[{"day": 1}, {"day": 2}]'),
            ("gpt", "a"),
        )
        assert rec(row).messages[2] == {
            "role": "tool",
            "content": '[{"day": 1}, {"day": 2}]',
            "name": "get_weather",
        }

    def test_arguments_as_a_json_string_are_parsed_and_missing_ones_are_empty(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", {"name": "get_weather", "arguments": '{"city": "Paris"}'}),
            ("observation", "sunny"),
            ("function_call", {"name": "ping"}),
            ("observation", "pong"),
            ("gpt", "a"),
        )
        messages = rec(row).messages
        assert messages[1]["tool_calls"] == [WEATHER_CALL]
        assert messages[3]["tool_calls"] == [{"name": "ping", "arguments": {}}]

    def test_system_sequential_calls_and_a_second_user_turn(self):
        row = sharegpt(
            ("human", "Weather?"),
            ("function_call", WEATHER_CALL),
            ("observation", "sunny"),
            ("function_call", TIP_CALL),
            ("observation", "6.0"),
            ("gpt", "Sunny; tip 6."),
            ("human", "Thanks"),
            ("gpt", "You are welcome."),
            system="You have tools.",
            tools=tools_column(GET_WEATHER, CALCULATE_TIP),
        )
        assert [(m["role"], m.get("name")) for m in rec(row).messages] == [
            ("system", None),
            ("user", None),
            ("assistant", None),
            ("tool", "get_weather"),
            ("assistant", None),
            ("tool", "calculate_tip"),
            ("assistant", None),
            ("user", None),
            ("assistant", None),
        ]

    def test_a_conversation_may_end_with_the_call(self):
        row = sharegpt(("human", "Weather?"), ("function_call", WEATHER_CALL))
        assert rec(row).messages[-1] == {
            "role": "assistant",
            "content": "",
            "tool_calls": [WEATHER_CALL],
        }


class TestToolCallingOpenAI:
    def test_string_arguments_tool_call_ids_null_content_system_and_turns(self):
        value = {
            "messages": [
                {"role": "system", "content": "You have tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [openai_call("call_1", "get_weather", '{"city": "Paris"}')],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
                {"role": "assistant", "content": "21 degrees."},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "Welcome."},
            ],
            "tools": [{"type": "function", "function": GET_WEATHER}],
        }
        record = rec(value)
        assert record.messages == [
            {"role": "system", "content": "You have tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather"},
            {"role": "assistant", "content": "21 degrees."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome."},
        ]
        assert record.tools == [GET_WEATHER]

    def test_object_arguments_text_beside_a_call_and_empty_tool_calls(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [openai_call("a", "get_weather", {"city": "Paris"})],
                },
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "assistant", "content": "Sunny.", "tool_calls": []},
            ]
        }
        messages = rec(value).messages
        assert messages[1] == {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [WEATHER_CALL],
        }
        assert messages[3] == {"role": "assistant", "content": "Sunny."}

    def test_parallel_results_are_put_in_the_calls_order(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        openai_call("w", "get_weather", '{"city": "Paris"}'),
                        openai_call("t", "calculate_tip", '{"bill": 40, "percent": 15}'),
                    ],
                },
                {"role": "tool", "tool_call_id": "t", "content": "6.0"},
                {"role": "tool", "tool_call_id": "w", "content": "sunny"},
                {"role": "assistant", "content": "a"},
            ]
        }
        assert rec(value).messages[1:4] == [
            {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL, TIP_CALL]},
            {"role": "tool", "content": "sunny", "name": "get_weather"},
            {"role": "tool", "content": "6.0", "name": "calculate_tip"},
        ]

    def test_canonical_jsonl_round_trip(self, tmp_path):
        records = [
            rec(GLAIVE_ROW, where="g.json#0"),
            rec(sharegpt(("human", "q"), ("gpt", "a"), tools="[]"), where="g.json#1"),
            rec(
                sharegpt(
                    ("human", "q"),
                    ("function_call", [WEATHER_CALL, TIP_CALL]),
                    ("observation", ["sunny", "6.0"]),
                    ("gpt", "a"),
                    system="S",
                    tools=[GET_WEATHER, CALCULATE_TIP],
                ),
                where="g.json#2",
            ),
        ]
        path = write_jsonl(tmp_path / "canonical.jsonl", [r.to_json() for r in records])
        assert "tools" not in json.loads(path.read_text().splitlines()[1])
        again = convert_all(path, "openai")
        assert [(r.messages, r.tools) for r in again] == [(r.messages, r.tools) for r in records]
        assert [(r.messages, r.tools) for r in convert_all(path)] == [
            (r.messages, r.tools) for r in records
        ]


def test_tool_call_count():
    assert tool_call_count(GLAIVE_MESSAGES) == 1
    assert tool_call_count([{"role": "user", "content": "q"}]) == 0


class TestToolCallingErrors:
    def error(self, value, fmt="auto", **kwargs) -> str:
        with pytest.raises(RecordError) as info:
            rec(value, fmt, **kwargs)
        return str(info.value)

    def test_function_call_not_valid_json(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", '{"name": "get_weather", "arguments": {'),
            ("observation", "x"),
            ("gpt", "a"),
        )
        assert self.error(row) == (
            "f.json#0.conversations[1].value: function call is not valid JSON: "
            "Expecting property name enclosed in double quotes"
        )

    def test_function_call_arguments_not_valid_json(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", {"name": "get_weather", "arguments": "{city"}),
            ("observation", "x"),
            ("gpt", "a"),
        )
        assert self.error(row) == (
            "f.json#0.conversations[1].value.arguments: function call arguments are not valid "
            "JSON: Expecting property name enclosed in double quotes"
        )

    def test_function_call_neither_object_nor_list(self):
        row = sharegpt(("human", "q"), ("function_call", "42"), ("observation", "x"), ("gpt", "a"))
        assert self.error(row) == (
            "f.json#0.conversations[1].value: expected a function call {name, arguments} "
            "(or a list of them), got int"
        )

    def test_tools_not_valid_json(self):
        row = sharegpt(("human", "q"), ("gpt", "a"), tools='[{"name": "get_weather",')
        assert self.error(row) == (
            "f.json#0.tools: tools are not valid JSON: "
            "Expecting property name enclosed in double quotes"
        )

    @pytest.mark.parametrize(
        ("tools", "message"),
        [
            ('{"name": "x"}', "f.json#0.tools: expected a list of function objects, got dict"),
            (
                '["get_weather"]',
                "f.json#0.tools[0]: expected a function object with name, description and "
                "parameters, got str",
            ),
            ('[{"description": "d"}]', "f.json#0.tools[0].name: expected a non-empty function "
             "name, got None"),
            (
                '[{"type": "function", "function": {"name": ""}}]',
                "f.json#0.tools[0].function.name: expected a non-empty function name, got ''",
            ),
            (
                '[{"type": "retrieval", "function": {"name": "x"}}]',
                "f.json#0.tools[0].type: expected 'function', got 'retrieval'",
            ),
            (
                '[{"name": "x", "parameters": "none"}]',
                "f.json#0.tools[0].parameters: expected a JSON schema object, got str",
            ),
            ('[{"name": "x"}, {"name": "x"}]', "f.json#0.tools[1].name: duplicate tool name 'x'"),
        ],
    )
    def test_bad_tools(self, tools, message):
        assert self.error(sharegpt(("human", "q"), ("gpt", "a"), tools=tools)) == message

    def test_arguments_not_an_object(self, tmp_path):
        path = write_json(
            tmp_path / "file.json",
            [
                sharegpt(
                    ("human", "q"),
                    ("function_call", {"name": "get_weather", "arguments": ["Paris"]}),
                    ("observation", "x"),
                    ("gpt", "a"),
                )
            ],
        )
        with pytest.raises(RecordError) as info:
            convert_all(path)
        assert str(info.value) == (
            f"{path}#0: messages[1].tool_calls[0].arguments: expected a JSON object, got list"
        )

    def test_empty_call_name(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", {"name": " ", "arguments": {}}),
            ("observation", "x"),
            ("gpt", "a"),
        )
        assert self.error(row) == "f.json#0: messages[1].tool_calls[0].name: empty call name"
        row = sharegpt(("human", "q"), ("function_call", {"arguments": {}}), ("gpt", "a"))
        assert self.error(row) == "f.json#0: messages[1].tool_calls[0].name: empty call name"

    def test_call_to_a_tool_the_record_does_not_have(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", TIP_CALL),
            ("observation", "x"),
            ("gpt", "a"),
            tools=tools_column(GET_WEATHER, CONVERT_CURRENCY),
        )
        assert self.error(row) == (
            "f.json#0: messages[1].tool_calls[0].name: unknown tool 'calculate_tip'; the record's "
            "tools are ['get_weather', 'convert_currency']"
        )
        # without tools any name may be called
        del row["tools"]
        assert rec(row).messages[1]["tool_calls"] == [TIP_CALL]

    def test_call_with_no_result(self):
        row = sharegpt(("human", "q"), ("function_call", WEATHER_CALL), ("gpt", "It is sunny."))
        assert self.error(row) == (
            "f.json#0: messages[1].tool_calls[0]: call to 'get_weather' has no tool result "
            "(messages[2] is 'assistant', expected 'tool'; one tool message per call, in order)"
        )

    def test_one_observation_for_two_calls_that_is_no_list_of_two(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", [WEATHER_CALL, TIP_CALL]),
            ("observation", '{"temperature": 21, "tip": 6.0}'),
            ("gpt", "a"),
        )
        assert self.error(row) == (
            "f.json#0: messages[1].tool_calls[1]: call to 'calculate_tip' has no tool result "
            "(messages[3] is 'assistant', expected 'tool'; one tool message per call, in order)"
        )

    def test_missing_result_at_the_end(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", [WEATHER_CALL, TIP_CALL]),
            ("observation", "sunny"),
        )
        message = (
            "f.json#0: messages[1].tool_calls[1]: call to 'calculate_tip' has no tool result "
            "(the conversation ends; one tool message per call, in order)"
        )
        assert self.error(row) == message
        assert self.error(row, need_answer=False) == message

    def test_tool_message_without_a_call(self):
        row = sharegpt(("human", "q"), ("observation", "x"), ("gpt", "a"))
        assert self.error(row) == (
            "f.json#0: messages[1].role: expected 'assistant' here (roles out of order), "
            "got 'tool'; a tool message must answer an assistant's tool_calls"
        )
        row = sharegpt(("human", "q"), ("gpt", "a"), ("observation", "x"), ("gpt", "b"))
        assert self.error(row) == (
            "f.json#0: messages[2].role: expected 'user' here (roles out of order), "
            "got 'tool'; a tool message must answer an assistant's tool_calls"
        )

    def test_more_results_than_calls(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", WEATHER_CALL),
            ("observation", "sunny"),
            ("observation", "rainy"),
            ("gpt", "a"),
        )
        assert self.error(row) == (
            "f.json#0: messages[3].role: expected 'assistant' here (roles out of order), "
            "got 'tool'; a tool message must answer an assistant's tool_calls"
        )

    def test_ending_with_results_needs_an_answer_unless_predicting(self):
        row = sharegpt(("human", "q"), ("function_call", WEATHER_CALL), ("observation", "sunny"))
        assert self.error(row) == (
            "f.json#0: the last message must be the assistant's answer, got 'tool'"
        )
        assert rec(row, need_answer=False).messages[-1]["role"] == "tool"

    def test_empty_plain_answer_is_still_an_empty_response(self):
        row = sharegpt(("human", "q"), ("function_call", WEATHER_CALL), ("observation", "x"),
                       ("gpt", " "))
        assert self.error(row) == "f.json#0: messages[3].content: empty response"

    def test_unknown_speaker_and_role_mention_the_tool_ones(self):
        assert self.error({"conversations": [{"from": "tool_result", "value": "x"}]}) == (
            "f.json#0.conversations[0].from: expected one of ['assistant', 'chatgpt', 'gpt', "
            "'human', 'model', 'system', 'user'], got 'tool_result'; or 'function_call' / "
            "'observation' for tool calls and their results"
        )
        assert self.error({"messages": [{"role": "function", "content": "x"}]}) == (
            "f.json#0: messages[0].role: expected one of ['system', 'user', 'assistant'], got "
            "'function'; or 'tool' for a tool's result after an assistant's tool_calls"
        )

    def test_openai_unknown_tool_call_id(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None,
                 "tool_calls": [openai_call("a", "get_weather", "{}")]},
                {"role": "tool", "tool_call_id": "b", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        }
        assert self.error(value) == (
            "f.json#0.messages[2].tool_call_id: no tool call with id 'b'; the calls before it "
            "have ids ['a']"
        )

    def test_openai_bad_arguments_string_and_call_type(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None,
                 "tool_calls": [openai_call("a", "get_weather", "{city: Paris}")]},
            ]
        }
        assert self.error(value) == (
            "f.json#0.messages[1].tool_calls[0].function.arguments: function call arguments are "
            "not valid JSON: Expecting property name enclosed in double quotes"
        )
        value["messages"][1]["tool_calls"][0]["type"] = "code_interpreter"
        assert self.error(value) == (
            "f.json#0.messages[1].tool_calls[0].type: expected 'function', got 'code_interpreter'"
        )

    def test_tool_result_named_after_another_function(self):
        value = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
                {"role": "tool", "name": "calculate_tip", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        }
        assert self.error(value) == (
            "f.json#0: messages[2].name: expected 'get_weather' (the result of "
            "messages[1].tool_calls[0]), got 'calculate_tip'"
        )

    def test_tool_calls_only_on_assistant_messages(self):
        value = {
            "messages": [
                {"role": "user", "content": "q", "tool_calls": [WEATHER_CALL]},
                {"role": "assistant", "content": "a"},
            ]
        }
        # from_openai drops a user's extra keys; the canonical check still refuses it
        assert rec(value).messages[0] == {"role": "user", "content": "q"}
        with pytest.raises(
            RecordError,
            match=re.escape(
                "w: messages[0].tool_calls: only an assistant message may carry tool_calls, "
                "got one on a 'user' message"
            ),
        ):
            validate_messages(value["messages"], "w")

    def test_canonical_tool_calls_must_be_a_non_empty_list(self):
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": []},
        ]
        with pytest.raises(
            RecordError,
            match=re.escape(
                "w: messages[1].tool_calls: expected a non-empty list of {name, arguments} calls, "
                "got an empty list"
            ),
        ):
            validate_messages(messages, "w")

    def test_unpaired_surrogate_in_arguments(self):
        row = sharegpt(
            ("human", "q"),
            ("function_call", '{"name": "f", "arguments": {"x": "\\udc00"}}'),
            ("observation", "x"),
            ("gpt", "a"),
        )
        assert self.error(row).startswith(
            "f.json#0: messages[1].tool_calls[0].arguments: not valid Unicode text"
        )
