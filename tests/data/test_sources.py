"""Reading whole files into records: the real data (../shared/data, see its SOURCES.md),
the per-file summary, strict mode, de-duplication, sampling and the eval split."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from chattune.config import DataSource
from chattune.data.formats import DataFileError, RawRow, to_record
from chattune.data.records import RecordError, tool_call_count
from chattune.data.sources import (
    file_digest,
    format_summary,
    load_records,
    read_source,
    record_key,
    split_eval,
)
from tests.data.toolcall_rows import toolcall_rows, write_toolcall_file


def write_jsonl(path: Path, values) -> Path:
    path.write_text(
        "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8"
    )
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}"}


def numbered(path: Path, n: int) -> Path:
    return write_jsonl(path, [alpaca(i) for i in range(n)])


def check_invariant(summary) -> None:
    assert summary.read == summary.converted + summary.skipped_total + summary.duplicated


def expected_alpaca_messages(raw: dict) -> list[dict]:
    """The messages an Alpaca record should become, built here independently of the reader."""
    user = {"role": "user", "content": raw["instruction"]}
    if raw.get("input"):
        user["input"] = raw["input"]
    return [user, {"role": "assistant", "content": raw["output"]}]


def first_occurrences(raw_rows: list[dict]) -> list[dict]:
    seen, kept = set(), []
    for row in raw_rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


# --------------------------------------------------------------------------- the real files


class TestRealData:
    def test_files_match_sources_md(self, shared_data):
        """The sha256 column of SOURCES.md matches the files, so the counts below are about them."""
        table = {}
        for line in (shared_data / "SOURCES.md").read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 6 and re.fullmatch(r"[0-9a-f]{64}", cells[5]):
                table[cells[0]] = cells[5]
        assert set(table) >= {  # the files these tests read; the folder holds more since
            "alpaca_en_demo.json",
            "alpaca_zh_demo.json",
            "axolotl_conversation.json",
        }
        for name, digest in table.items():
            assert file_digest(shared_data / name) == digest, name

    @pytest.mark.parametrize(
        "name, read, duplicated",
        [
            ("alpaca_en_demo.json", 999, 14),
            ("alpaca_zh_demo.json", 1000, 8),
        ],
    )
    def test_alpaca_counts(self, shared_data, name, read, duplicated):
        path = shared_data / name
        records, summary = read_source(DataSource(str(path)))
        assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (
            read,
            read - duplicated,
            duplicated,
            0,
        )
        assert len(records) == read - duplicated
        check_invariant(summary)
        # Independent check of SOURCES.md: plain json + a set of canonical dumps.
        raw = json.loads(path.read_text(encoding="utf-8"))
        assert len(raw) == read
        assert (
            len({json.dumps(r, sort_keys=True, ensure_ascii=False) for r in raw})
            == read - duplicated
        )

    @pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
    def test_alpaca_records_are_first_occurrences_in_order(self, shared_data, name):
        path = shared_data / name
        records, _ = read_source(DataSource(str(path)))
        raw = json.loads(path.read_text(encoding="utf-8"))
        kept = first_occurrences(raw)
        assert [r.messages for r in records] == [expected_alpaca_messages(r) for r in kept]
        first_index = {}
        for i, row in enumerate(raw):
            first_index.setdefault(json.dumps(row, sort_keys=True, ensure_ascii=False), i)
        assert [r.source for r in records] == [
            f"{path}#{first_index[json.dumps(r, sort_keys=True, ensure_ascii=False)]}" for r in kept
        ]

    def test_alpaca_en_inputs_kept_apart(self, shared_data):
        records, _ = read_source(DataSource(str(shared_data / "alpaca_en_demo.json")))
        raw = first_occurrences(json.loads((shared_data / "alpaca_en_demo.json").read_text()))
        with_input = [r for r in records if "input" in r.messages[0]]
        assert len(with_input) == sum(1 for r in raw if r["input"])
        assert 0 < len(with_input) < len(records)

    def test_explicit_alpaca_format_gives_the_same(self, shared_data):
        path = str(shared_data / "alpaca_zh_demo.json")
        auto, _ = read_source(DataSource(path))
        explicit, summary = read_source(DataSource(path, format="alpaca"))
        assert [r.messages for r in auto] == [r.messages for r in explicit]
        assert summary.format == "alpaca"

    def test_keeping_duplicates(self, shared_data):
        records, summary = read_source(
            DataSource(str(shared_data / "alpaca_en_demo.json")), dedup=False
        )
        assert (summary.read, summary.converted, summary.duplicated) == (999, 999, 0)
        assert len(records) == 999

    def test_axolotl_sharegpt_object(self, shared_data):
        path = shared_data / "axolotl_conversation.json"
        raw = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(raw, dict)  # one object, not a list
        records, summary = read_source(DataSource(str(path)))
        assert (summary.read, summary.converted, summary.skipped_total, summary.duplicated) == (
            1,
            1,
            0,
            0,
        )
        (record,) = records
        assert record.source == f"{path}#0"
        assert len(record.messages) == 12
        assert [m["role"] for m in record.messages] == ["user", "assistant"] * 6
        assert [m["content"] for m in record.messages] == [t["value"] for t in raw["conversations"]]
        assert all(set(m) == {"role", "content"} for m in record.messages)

    def test_all_three_together(self, shared_data):
        sources = [
            DataSource(str(shared_data / n))
            for n in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "axolotl_conversation.json")
        ]
        records, summaries = load_records(sources)
        assert [s.converted for s in summaries] == [985, 992, 1]
        assert len(records) == 985 + 992 + 1
        for s in summaries:
            check_invariant(s)
        assert len({record_key(r) for r in records}) == len(records)

    def test_same_file_twice_is_all_duplicates_the_second_time(self, shared_data):
        path = str(shared_data / "alpaca_en_demo.json")
        records, (first, second) = load_records([DataSource(path), DataSource(path)])
        assert (second.read, second.converted, second.duplicated) == (999, 0, 999)
        check_invariant(first)
        check_invariant(second)
        assert len(records) == 985


# --------------------------------------------------------------------------- default vs strict


GOOD = alpaca(0)
MIXED = [  # line: what is wrong
    GOOD,  # 1 ok
    {"instruction": "x"},  # 2 unknown format (no output)
    {"instruction": "x", "output": 3},  # 3 not a string
    GOOD,  # 4 duplicate of line 1
    {"instruction": "x", "output": ""},  # 5 empty response
    {"messages": [{"role": "assistant", "content": "a"}]},  # 6 roles out of order
    alpaca(1),  # 7 ok
    {"prompt": "p", "completion": "c"},  # 8 unknown format
    {"conversations": [{"from": "human", "value": "q"}]},  # 9 no answer
    alpaca(1),  # 10 duplicate of line 7
]


class TestStrictAndDefault:
    def test_default_skips_and_counts(self, tmp_path):
        path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
        records, summary = read_source(DataSource(str(path)))
        assert [r.source for r in records] == [f"{path}:1", f"{path}:7"]
        assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (
            10,
            2,
            2,
            6,
        )
        check_invariant(summary)
        assert summary.skipped == Counter(
            {
                "unknown format": 2,
                "expected a string": 1,
                "empty response": 1,
                "roles out of order": 1,
                "the last message must be": 1,
            }
        )
        assert len(summary.examples) == 5
        assert summary.examples[0].startswith(f"{path}:2: unknown format: keys ['instruction']")
        assert summary.examples[1] == f"{path}:3.output: expected a string, got int"
        j = summary.to_json()
        assert (j["read"], j["converted"], j["skipped"], j["duplicated"], j["kept"]) == (
            10,
            2,
            6,
            2,
            2,
        )
        assert j["skipped_reasons"]["unknown format"] == 2

    def test_strict_raises_at_the_first_bad_record(self, tmp_path):
        path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
        with pytest.raises(
            RecordError, match=re.escape(f"{path}:2: unknown format: keys ['instruction']")
        ):
            read_source(DataSource(str(path)), strict=True)
        other = write_jsonl(tmp_path / "m2.jsonl", [MIXED[0], MIXED[2], MIXED[1]])
        with pytest.raises(
            RecordError, match=re.escape(f"{other}:2.output: expected a string, got int")
        ):
            load_records([DataSource(str(other))], strict=True)

    def test_strict_on_clean_data_counts_duplicates(self, tmp_path):
        path = write_jsonl(tmp_path / "clean.jsonl", [GOOD, GOOD, alpaca(1)])
        records, summary = read_source(DataSource(str(path)), strict=True)
        assert (summary.read, summary.converted, summary.duplicated) == (3, 2, 1)
        assert len(records) == 2

    def test_file_errors_are_not_skippable(self, tmp_path):
        path = tmp_path / "broken.json"
        path.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": }]')
        with pytest.raises(DataFileError, match=re.escape(f"{path}:2:")):
            read_source(DataSource(str(path)))

    def test_duplicates_across_files_count_in_the_later_file(self, tmp_path):
        a = write_jsonl(tmp_path / "a.jsonl", [alpaca(0), alpaca(1)])
        b = write_jsonl(tmp_path / "b.jsonl", [alpaca(1), alpaca(2), {"bad": 1}])
        records, (sa, sb) = load_records([DataSource(str(a)), DataSource(str(b))])
        assert [r.messages[1]["content"] for r in records] == ["answer 0", "answer 1", "answer 2"]
        assert (sb.read, sb.converted, sb.duplicated, sb.skipped_total) == (3, 1, 1, 1)
        check_invariant(sa)
        check_invariant(sb)
        _, (_, sb2) = load_records([DataSource(str(a)), DataSource(str(b))], dedup=False)
        assert (sb2.converted, sb2.duplicated) == (2, 0)

    def test_format_summary_table(self, tmp_path):
        path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
        _, summary = read_source(DataSource(str(path)))
        text = format_summary([summary])
        header, row = text.splitlines()[:2]
        assert header.split() == ["file", "read", "converted", "skipped", "duplicated", "kept"]
        assert row.split()[1:] == ["10", "2", "6", "2", "2"]
        assert "skipped 2 x unknown format" in text
        assert f"e.g. {path}:2: unknown format" in text

    def test_malformed_history_column_is_skipped(self, tmp_path):
        path = tmp_path / "h.csv"
        path.write_text(
            'q,a,hist\nhello,world,"[[""x"", ""y""]]"\nhi,there,"[bad"\n', encoding="utf-8"
        )
        columns = {"prompt": "q", "response": "a", "history": "hist"}
        records, summary = read_source(DataSource(str(path), columns=columns))
        assert (summary.read, summary.converted, summary.skipped_total) == (2, 1, 1)
        assert summary.examples[0].startswith(f"{path}:3.hist: history is not a JSON list of pairs")

    @pytest.mark.parametrize(
        ("fmt", "columns", "message"),
        [
            ("columns", None, "format 'columns' needs a column map"),
            ("auto", {"prompt": "q"}, "column map needs 'response'"),
            ("auto", {"prompt": "q", "response": "a", "answer": "a"}, "target 'answer' unknown"),
        ],
    )
    def test_bad_column_map_fails_up_front_even_when_not_strict(
        self, tmp_path, fmt, columns, message
    ):
        # a configuration error, not a bad record: it must not be skipped row by row
        path = write_jsonl(tmp_path / "c.jsonl", [{"q": "hello", "a": "world"}])
        with pytest.raises(DataFileError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
            read_source(DataSource(str(path), format=fmt, columns=columns), strict=False)


# --------------------------------------------------------------------------- sampling and the eval split


def outputs(records) -> list[str]:
    return [r.messages[1]["content"] for r in records]


class TestSampling:
    def test_max_samples_is_a_seeded_ordered_subset(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 50))
        one, (summary,) = load_records([DataSource(path, max_samples=10)], seed=1)
        two, _ = load_records([DataSource(path, max_samples=10)], seed=1)
        other, _ = load_records([DataSource(path, max_samples=10)], seed=2)
        assert len(one) == 10
        assert outputs(one) == outputs(two)
        assert outputs(one) != outputs(other)
        assert len(set(outputs(one))) == 10
        indices = [int(o.split()[1]) for o in outputs(one)]
        assert indices == sorted(indices)  # file order kept
        assert (summary.converted, summary.sampled_out, summary.to_json()["kept"]) == (50, 40, 10)
        check_invariant(summary)

    def test_max_samples_above_the_count_keeps_all(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 5))
        records, (summary,) = load_records([DataSource(path, max_samples=100)])
        assert outputs(records) == [f"answer {i}" for i in range(5)]
        assert summary.sampled_out == 0

    def test_weight_two_doubles(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 7))
        records, (summary,) = load_records([DataSource(path, weight=2.0)])
        assert len(records) == 14
        assert Counter(outputs(records)) == {f"answer {i}": 2 for i in range(7)}
        assert (summary.repeated, summary.sampled_out, summary.to_json()["kept"]) == (7, 0, 14)
        check_invariant(summary)

    def test_weight_half_halves_deterministically(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 20))
        one, (summary,) = load_records([DataSource(path, weight=0.5)], seed=3)
        two, _ = load_records([DataSource(path, weight=0.5)], seed=3)
        other, _ = load_records([DataSource(path, weight=0.5)], seed=4)
        assert len(one) == 10
        assert len(set(outputs(one))) == 10
        assert outputs(one) == outputs(two)
        assert outputs(one) != outputs(other)
        assert (summary.sampled_out, summary.repeated, summary.to_json()["kept"]) == (10, 0, 10)
        check_invariant(summary)

    def test_weight_one_and_a_half(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 10))
        records, (summary,) = load_records([DataSource(path, weight=1.5)], seed=0)
        counts = Counter(outputs(records))
        assert len(records) == 15
        assert set(counts) == {f"answer {i}" for i in range(10)}
        assert sorted(counts.values()) == [1] * 5 + [2] * 5
        assert summary.repeated == 5

    def test_max_samples_then_weight(self, tmp_path):
        path = str(numbered(tmp_path / "n.jsonl", 30))
        records, (summary,) = load_records([DataSource(path, max_samples=10, weight=2.0)])
        assert len(records) == 20
        assert set(Counter(outputs(records)).values()) == {2}
        assert summary.to_json()["kept"] == 20

    def test_weight_on_real_data(self, shared_data):
        path = str(shared_data / "alpaca_en_demo.json")
        half, (summary,) = load_records([DataSource(path, weight=0.5)], seed=42)
        again, _ = load_records([DataSource(path, weight=0.5)], seed=42)
        assert abs(len(half) - 985 / 2) <= 0.5
        assert [r.source for r in half] == [r.source for r in again]
        assert summary.to_json()["kept"] == len(half)
        double, _ = load_records([DataSource(path, weight=2.0)])
        assert len(double) == 2 * 985


class TestSplitEval:
    def records(self, tmp_path, n=100):
        records, _ = load_records([DataSource(str(numbered(tmp_path / "n.jsonl", n)))])
        return records

    def test_holds_out_the_fraction_without_overlap(self, tmp_path):
        records = self.records(tmp_path)
        train, held = split_eval(records, 0.2, seed=7)
        assert (len(train), len(held)) == (80, 20)
        assert not set(outputs(train)) & set(outputs(held))
        assert sorted(outputs(train) + outputs(held)) == sorted(outputs(records))

    def test_same_seed_same_split(self, tmp_path):
        records = self.records(tmp_path)
        assert outputs(split_eval(records, 0.2, seed=7)[1]) == outputs(
            split_eval(records, 0.2, seed=7)[1]
        )
        assert outputs(split_eval(records, 0.2, seed=7)[1]) != outputs(
            split_eval(records, 0.2, seed=8)[1]
        )

    def test_at_least_one_held_out(self, tmp_path):
        records = self.records(tmp_path, 10)
        train, held = split_eval(records, 0.001, seed=0)
        assert (len(train), len(held)) == (9, 1)

    def test_no_split(self, tmp_path):
        records = self.records(tmp_path, 10)
        assert split_eval(records, 0.0, seed=0) == (records, [])
        assert split_eval(records[:1], 0.5, seed=0) == (records[:1], [])

    def test_real_data_split(self, shared_data):
        records, _ = load_records([DataSource(str(shared_data / "alpaca_zh_demo.json"))])
        train, held = split_eval(records, 0.1, seed=42)
        assert len(held) in (99, 100)  # 10 % of 992, rounded
        assert len(train) + len(held) == 992
        assert not {r.source for r in train} & {r.source for r in held}


# --------------------------------------------------------------------------- hostile input


class TestHostileInput:
    def test_file_digest_of_a_missing_file_or_a_directory(self, tmp_path):
        with pytest.raises(DataFileError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
            file_digest(tmp_path / "nope.jsonl")
        with pytest.raises(DataFileError, match=re.escape(f"{tmp_path}: is a directory; expected a data file")):
            file_digest(tmp_path)

    def test_file_digest_is_the_sha256_of_the_bytes(self, tmp_path):
        import hashlib

        path = tmp_path / "a.jsonl"
        path.write_bytes(b"abc")
        assert file_digest(path) == hashlib.sha256(b"abc").hexdigest()

    def test_directory_in_sources_is_a_data_file_error(self, tmp_path):
        with pytest.raises(DataFileError, match=re.escape(f"{tmp_path}: is a directory")):
            load_records([DataSource(str(tmp_path))])

    def test_rows_that_are_not_objects_are_skipped_with_a_clear_reason(self, tmp_path):
        path = tmp_path / "scalars.jsonl"
        path.write_text('null\n1\n"text"\n[1]\n' + json.dumps(alpaca(0)) + "\n")
        records, summary = read_source(DataSource(str(path)))
        assert len(records) == 1
        assert summary.skipped == Counter({"expected a JSON object": 4})
        assert summary.examples[0] == f"{path}:1: expected a JSON object, got NoneType"
        check_invariant(summary)

    def test_unpaired_surrogates_are_skipped_not_a_crash_in_dedup(self, tmp_path):
        path = tmp_path / "s.jsonl"
        path.write_text('{"instruction": "a\\udc00", "output": "b"}\n' + json.dumps(alpaca(0)) + "\n")
        records, summary = read_source(DataSource(str(path)))
        assert len(records) == 1
        assert summary.skipped == Counter({"not valid Unicode text": 1})
        assert "messages[0].content: not valid Unicode text" in summary.examples[0]
        with pytest.raises(RecordError, match=re.escape(f"{path}:1: messages[0].content: not valid Unicode")):
            read_source(DataSource(str(path)), strict=True)

    def test_a_file_of_duplicates_keeps_the_first(self, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [alpaca(0)] * 5)
        records, summary = read_source(DataSource(str(path)))
        assert len(records) == 1
        assert (summary.read, summary.converted, summary.duplicated) == (5, 1, 4)

    def test_a_csv_without_header_skips_every_row_naming_the_keys(self, tmp_path):
        path = tmp_path / "noheader.csv"
        path.write_text("q1,a1\nq2,a2\nq3,a3\n")
        records, summary = read_source(DataSource(str(path)))
        assert records == [] and summary.read == 2
        assert summary.skipped == Counter({"unknown format": 2})
        assert summary.examples[0].startswith(f"{path}:2: unknown format: keys ['a1', 'q1']")


# --------------------------------------------------------------------------- tool calling data


class TestToolCallingFile:
    """The generated 300-row glaive-style file: every row accounted for, the tool counts right."""

    def test_every_row_is_accounted_for(self, tmp_path):
        path, expected = write_toolcall_file(tmp_path / "glaive_style.json")
        records, summary = read_source(DataSource(str(path)))
        outcomes = Counter(e.outcome for e in expected)
        assert (summary.read, summary.converted, summary.skipped_total, summary.duplicated) == (
            300,
            outcomes["converted"],
            outcomes["skipped"],
            outcomes["duplicated"],
        ) == (300, 230, 60, 10)
        check_invariant(summary)
        assert summary.skipped == Counter(e.reason for e in expected if e.outcome == "skipped")
        assert set(summary.skipped.values()) == {10} and len(summary.skipped) == 6
        converted = [(i, e) for i, e in enumerate(expected) if e.outcome == "converted"]
        assert [r.source for r in records] == [f"{path}#{i}" for i, _ in converted]
        for record, (_, e) in zip(records, converted, strict=True):
            assert tool_call_count(record.messages) == e.tool_calls, e.kind
            assert bool(record.tools) == e.has_tools, e.kind

    def test_summary_counts_rows_with_tools_and_tool_calls(self, tmp_path):
        path, expected = write_toolcall_file(tmp_path / "glaive_style.json")
        _, summary = read_source(DataSource(str(path)))
        kept = [e for e in expected if e.outcome == "converted"]
        assert (summary.with_tools, summary.tool_calls) == (
            sum(e.has_tools for e in kept),
            sum(e.tool_calls for e in kept),
        ) == (180, 210)
        j = summary.to_json()
        assert (j["rows_with_tools"], j["tool_calls"]) == (180, 210)
        assert (j["read"], j["converted"], j["skipped"], j["duplicated"], j["kept"]) == (
            300, 230, 60, 10, 230
        )
        text = format_summary([summary])
        assert text.splitlines()[1].split()[1:] == ["300", "230", "60", "10", "230"]
        assert text.splitlines()[2] == "    180 rows with tools, 210 tool calls"
        assert "skipped 10 x function call is not valid JSON" in text
        assert "skipped 10 x tools are not valid JSON" in text
        assert f"e.g. {path}#24.conversations[1].value: function call is not valid JSON" in text

    def test_strict_stops_at_the_first_broken_row(self, tmp_path):
        path, expected = write_toolcall_file(tmp_path / "glaive_style.json")
        first = next(i for i, e in enumerate(expected) if e.outcome == "skipped")
        with pytest.raises(
            RecordError,
            match=re.escape(
                f"{path}#{first}.conversations[1].value: function call is not valid JSON"
            ),
        ):
            read_source(DataSource(str(path)), strict=True)

    def test_files_without_tools_print_no_tool_line(self, tmp_path):
        path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
        _, summary = read_source(DataSource(str(path)))
        assert (summary.with_tools, summary.tool_calls) == (0, 0)
        assert "tool calls" not in format_summary([summary])


class TestToolCallingDedup:
    def records(self, rows: list[dict]):
        return [to_record(RawRow(row, f"t.json#{i}"), "auto") for i, row in enumerate(rows)]

    def test_rows_differing_only_in_tools_or_calls_are_not_duplicates(self, tmp_path):
        rows, _ = toolcall_rows(1)
        base = rows[0]
        other_tools = {**base, "tools": json.dumps([json.loads(base["tools"])[0], {"name": "x"}])}
        other_call = json.loads(json.dumps(base))
        call = json.loads(other_call["conversations"][1]["value"])
        call["arguments"]["amount"] += 1
        other_call["conversations"][1]["value"] = json.dumps(call)
        no_tools = {**base, "tools": "[]"}
        rows = [base, other_tools, other_call, no_tools, base]
        keys = [record_key(r) for r in self.records(rows)]
        assert len(set(keys[:4])) == 4
        assert keys[4] == keys[0]
        path = write_jsonl(tmp_path / "t.jsonl", rows)
        records, summary = read_source(DataSource(str(path)))
        assert (summary.converted, summary.duplicated) == (4, 1)

    def test_key_of_a_record_without_tools_is_unchanged(self):
        import hashlib

        record = to_record(RawRow(alpaca(3), "a.json#0"), "auto")
        old = hashlib.sha1(
            json.dumps(record.messages, sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()
        assert record_key(record) == old

    def test_canonical_output_read_back_deduplicates_against_the_input(self, tmp_path):
        path, _ = write_toolcall_file(tmp_path / "glaive_style.json", 30)
        records, _ = read_source(DataSource(str(path)))
        out = write_jsonl(tmp_path / "canonical.jsonl", [r.to_json() for r in records])
        again, summary = read_source(DataSource(str(out)))
        assert [(r.messages, r.tools) for r in again] == [(r.messages, r.tools) for r in records]
        assert (summary.with_tools, summary.tool_calls) == (18, 21)
        _, (_, second) = load_records([DataSource(str(path)), DataSource(str(out))])
        assert (second.converted, second.duplicated) == (0, len(records))
