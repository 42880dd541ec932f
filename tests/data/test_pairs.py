"""Preference rows read from every layout users have (pairs for DPO/ORPO/SimPO, labelled
answers for KTO): the records they become, every row of the real files accounted for
(../shared/data, see its SOURCES.md), bad rows skipped with a counted reason or, with
``strict``, one RecordError line naming the file, row and field, also through ``chattune train``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.config import DataSource
from chattune.data.pairs import (
    LABELLED,
    PAIRED,
    PreferenceRecord,
    load_preference_records,
    read_preference_source,
)
from chattune.data.records import RecordError


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def read_one(tmp_path: Path, row: dict, kind: str) -> PreferenceRecord:
    path = write_json(tmp_path / "one.json", [row])
    records, summary = read_preference_source(DataSource(str(path)), kind, strict=True)
    assert (summary.read, summary.converted) == (1, 1)
    return records[0]


def check_invariant(summary) -> None:
    assert summary.read == summary.converted + summary.skipped_total + summary.duplicated


def distinct(rows: list) -> int:
    return len({json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows})


# --------------------------------------------------------------------------- every layout converts

SYSTEM_AND_HISTORY = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("2+2?")]

PAIRED_LAYOUTS = {
    "ranking sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello."), human("2+2?")],
         "chosen": gpt("4"), "rejected": gpt("5")},
        SYSTEM_AND_HISTORY, "4", "5"),
    "ranking sharegpt, top-level system, answers as strings": (
        {"system": "Be brief.", "conversations": [human("Hi"), gpt("Hello."), human("2+2?")],
         "chosen": "4", "rejected": "5"},
        SYSTEM_AND_HISTORY, "4", "5"),
    "alpaca ranking": (
        {"instruction": "Translate to French", "input": "cat", "chosen": "chat", "rejected": "chien"},
        [{"role": "user", "content": "Translate to French", "input": "cat"}], "chat", "chien"),
    "alpaca ranking, system and history": (
        {"system": "Be brief.", "history": [["Hi", "Hello."]], "instruction": "2+2?", "input": "",
         "chosen": "4", "rejected": "5"},
        SYSTEM_AND_HISTORY, "4", "5"),
    "openai messages + assistant messages": (
        {"messages": SYSTEM_AND_HISTORY, "chosen": assistant("4"), "rejected": assistant("5")},
        SYSTEM_AND_HISTORY, "4", "5"),
    "openai messages + one-message lists": (
        {"messages": SYSTEM_AND_HISTORY, "chosen": [assistant("4")], "rejected": [assistant("5")]},
        SYSTEM_AND_HISTORY, "4", "5"),
    "trl standard": (
        {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"},
        [user("2+2?")], " 4", " 5"),
    "trl conversational": (
        {"prompt": SYSTEM_AND_HISTORY, "chosen": [assistant("4")], "rejected": [assistant("5")]},
        SYSTEM_AND_HISTORY, "4", "5"),
}


@pytest.mark.parametrize("layout", list(PAIRED_LAYOUTS))
def test_every_paired_layout_becomes_the_same_record(layout, tmp_path):
    row, prompt, chosen, rejected = PAIRED_LAYOUTS[layout]
    record = read_one(tmp_path, row, PAIRED)
    assert record == PreferenceRecord(prompt, chosen, rejected, None, f"{tmp_path / 'one.json'}#0")


LABELLED_LAYOUTS = {
    "kto messages + label true": (
        {"messages": [*SYSTEM_AND_HISTORY, assistant("4")], "label": True}, SYSTEM_AND_HISTORY, "4", True),
    "kto messages + label false": (
        {"messages": [user("2+2?"), assistant("5")], "label": False}, [user("2+2?")], "5", False),
    "trl prompt/completion/label": (
        {"prompt": "2+2?", "completion": " 4", "label": True}, [user("2+2?")], " 4", True),
    "trl conversational prompt/completion/label": (
        {"prompt": SYSTEM_AND_HISTORY, "completion": [assistant("5")], "label": False}, SYSTEM_AND_HISTORY, "5", False),
}


@pytest.mark.parametrize("layout", list(LABELLED_LAYOUTS))
def test_every_labelled_layout_becomes_the_same_record(layout, tmp_path):
    row, prompt, answer, label = LABELLED_LAYOUTS[layout]
    record = read_one(tmp_path, row, LABELLED)
    assert record == PreferenceRecord(prompt, answer, None, label, f"{tmp_path / 'one.json'}#0")


def test_the_canonical_rows_keep_prompt_answers_and_label():
    pair = PreferenceRecord([user("q")], "yes", "no", source="f.json#0")
    assert pair.to_json() == {"messages": [user("q")], "chosen": assistant("yes"), "rejected": assistant("no"),
                              "source": "f.json#0"}
    labelled = PreferenceRecord([user("q")], "yes", desirable=False, source="f.json#1")
    assert labelled.to_json() == {"messages": [user("q"), assistant("yes")], "label": False, "source": "f.json#1"}


# --------------------------------------------------------------------------- the real files


def test_dpo_en_demo_every_row_counted(shared_data):
    path = shared_data / "dpo_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, summary = read_preference_source(DataSource(str(path)), PAIRED)
    check_invariant(summary)
    assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (300, 295, 5, 0)
    assert summary.converted == distinct(raw) == len(records)
    first = records[0]
    assert first.prompt == [user(raw[0]["conversations"][0]["value"])]
    assert (first.chosen, first.rejected) == (raw[0]["chosen"]["value"], raw[0]["rejected"]["value"])
    assert first.source == f"{path}#0" and first.desirable is None
    # not every row is one human turn: of the 295 kept, 80 open with a system turn, 103 carry earlier turns
    assert sum(r.prompt[0]["role"] == "system" for r in records) == 80
    assert sum(sum(m["role"] == "user" for m in r.prompt) > 1 for r in records) == 103
    assert all(r.prompt[-1]["role"] == "user" and r.chosen != r.rejected for r in records)


def test_dpo_zh_demo_every_row_counted(shared_data):
    path = shared_data / "dpo_zh_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, summary = read_preference_source(DataSource(str(path)), PAIRED)
    check_invariant(summary)
    assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (300, 289, 11, 0)
    assert summary.converted == distinct(raw) == len(records)
    assert sum(r.prompt[0]["role"] == "system" for r in records) == 62  # of 64 rows, before de-duplication


def test_kto_en_demo_every_row_counted_with_its_label(shared_data):
    path = shared_data / "kto_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, summary = read_preference_source(DataSource(str(path)), LABELLED)
    check_invariant(summary)
    assert (summary.read, summary.converted, summary.duplicated, summary.skipped_total) == (300, 300, 0, 0)
    assert Counter(r.desirable for r in records) == {True: 150, False: 150}
    for record, row in zip(records, raw, strict=True):
        assert record.desirable is row["label"]
        assert record.prompt + [assistant(record.chosen)] == row["messages"]


def test_pair_files_need_pairs_and_labelled_files_need_labels(shared_data):
    _, as_labelled = read_preference_source(DataSource(str(shared_data / "dpo_en_demo.json")), LABELLED)
    assert (as_labelled.converted, dict(as_labelled.skipped)) == (0, {"missing field": 300})
    _, as_pairs = read_preference_source(DataSource(str(shared_data / "kto_en_demo.json")), PAIRED)
    assert (as_pairs.converted, dict(as_pairs.skipped)) == (0, {"missing field": 300})


def test_duplicates_are_found_across_files_and_sampling_counts(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    first = write_json(tmp_path / "a.json", rows[:4])
    second = write_json(tmp_path / "b.json", rows[2:])
    records, (a, b) = load_preference_records([DataSource(str(first)), DataSource(str(second), max_samples=1)],
                                              PAIRED)
    assert (a.converted, a.duplicated) == (4, 0)
    assert (b.read, b.converted, b.duplicated, b.sampled_out) == (4, 2, 2, 1)
    assert len(records) == 5


# --------------------------------------------------------------------------- bad rows

GOOD_PAIR = {"conversations": [human("q")], "chosen": gpt("yes"), "rejected": gpt("no")}

BAD_PAIRS = {
    # name: (row, the strict error after "FILE#1", the skipped reason)
    "empty chosen": ({**GOOD_PAIR, "chosen": gpt("  ")}, ".chosen.value: empty response", "empty response"),
    "empty openai rejected": ({"messages": [user("q")], "chosen": assistant("yes"), "rejected": assistant("")},
                              ".rejected.content: empty response", "empty response"),
    "identical answers": ({**GOOD_PAIR, "rejected": gpt("yes ")},
                          ": chosen and rejected are identical (nothing to prefer)",
                          "chosen and rejected are identical (nothing to prefer)"),
    "missing rejected": ({"conversations": [human("q")], "chosen": gpt("yes")},
                         ": missing field 'rejected' (a pair needs a chosen and a rejected answer)", "missing field"),
    "prompt ends with the assistant": (
        {**GOOD_PAIR, "conversations": [human("q"), gpt("a")]},
        ".conversations: the prompt must end with the user's message, got 'assistant' "
        "(the last message must be the user's)", "the last message must be"),
    "answer by the human": ({**GOOD_PAIR, "chosen": human("yes")},
                            ".chosen.from: expected 'assistant' (or ShareGPT's 'gpt'), got 'human'",
                            "expected 'assistant' (or ShareGPT's 'gpt'), got 'human'"),
    "two chosen messages": ({"messages": [user("q")], "chosen": [assistant("a"), assistant("b")],
                             "rejected": assistant("no")},
                            ".chosen: expected one assistant message, got a list of 2",
                            "expected one assistant message, got a list of 2"),
}

BAD_LABELLED = {
    "label a string": ({"messages": [user("q"), assistant("a")], "label": "yes"},
                       ".label: expected one of true or false, got 'yes'", "expected one of"),
    "label a number": ({"messages": [user("q"), assistant("a")], "label": 1},
                       ".label: expected one of true or false, got 1", "expected one of"),
    "label null": ({"messages": [user("q"), assistant("a")], "label": None},
                   ".label: expected one of true or false, got None", "expected one of"),
    "missing label": ({"messages": [user("q"), assistant("a")]},
                      ": missing field 'label' (true: a desirable answer, false: an undesirable one)", "missing field"),
    "no answer to judge": ({"messages": [user("q")], "label": True},
                           ": the last message must be the assistant's answer that label judges",
                           "the last message must be"),
    "empty answer": ({"messages": [user("q"), assistant(" ")], "label": True},
                     ".messages[1].content: empty response", "empty response"),
    "empty completion": ({"prompt": "q", "completion": "", "label": False},
                         ".completion: empty response", "empty response"),
}


def _bad_file(tmp_path: Path, good: dict, bad: dict) -> Path:
    return write_json(tmp_path / "rows.json", [good, bad, good, {**good, "chosen": "other"} if "chosen" in good
                                               else {**good, "label": not good["label"]}])


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_a_bad_pair_is_skipped_with_its_reason(case, tmp_path):
    row, _, reason = BAD_PAIRS[case]
    path = _bad_file(tmp_path, GOOD_PAIR, row)
    records, summary = read_preference_source(DataSource(str(path)), PAIRED)
    check_invariant(summary)
    assert (summary.read, summary.converted, summary.duplicated) == (4, 2, 1)
    assert dict(summary.skipped) == {reason: 1}
    assert [r.source for r in records] == [f"{path}#0", f"{path}#3"]
    assert summary.examples == [f"{path}#1{BAD_PAIRS[case][1]}"]


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_a_bad_pair_with_strict_is_one_line_naming_file_row_and_field(case, tmp_path):
    row, error, _ = BAD_PAIRS[case]
    path = _bad_file(tmp_path, GOOD_PAIR, row)
    with pytest.raises(RecordError) as exc:
        read_preference_source(DataSource(str(path)), PAIRED, strict=True)
    assert str(exc.value) == f"{path}#1{error}"


GOOD_LABELLED = {"messages": [user("q"), assistant("a")], "label": True}


@pytest.mark.parametrize("case", list(BAD_LABELLED))
def test_a_bad_labelled_row_is_skipped_with_its_reason(case, tmp_path):
    row, _, reason = BAD_LABELLED[case]
    path = _bad_file(tmp_path, GOOD_LABELLED, row)
    records, summary = read_preference_source(DataSource(str(path)), LABELLED)
    check_invariant(summary)
    assert (summary.read, summary.converted, summary.duplicated) == (4, 2, 1)
    assert dict(summary.skipped) == {reason: 1}
    assert [r.desirable for r in records] == [True, False]


@pytest.mark.parametrize("case", list(BAD_LABELLED))
def test_a_bad_labelled_row_with_strict_is_one_line_naming_file_row_and_field(case, tmp_path):
    row, error, _ = BAD_LABELLED[case]
    path = _bad_file(tmp_path, GOOD_LABELLED, row)
    with pytest.raises(RecordError) as exc:
        read_preference_source(DataSource(str(path)), LABELLED, strict=True)
    assert str(exc.value) == f"{path}#1{error}"


def test_a_row_of_no_known_layout_names_its_keys(tmp_path):
    path = write_json(tmp_path / "rows.json", [{"question": "q", "chosen": "a", "rejected": "b"}, ["q", "a", "b"]])
    _, summary = read_preference_source(DataSource(str(path)), PAIRED)
    assert dict(summary.skipped) == {"unknown format": 1, "expected a JSON object": 1}
    with pytest.raises(RecordError, match=r"#0: unknown format: keys \['chosen', 'question', 'rejected'\]"):
        read_preference_source(DataSource(str(path)), PAIRED, strict=True)


# --------------------------------------------------------------------------- chattune train


@pytest.mark.parametrize(("stage", "good", "bad", "error"), [
    ("dpo", GOOD_PAIR, BAD_PAIRS["identical answers"][0], BAD_PAIRS["identical answers"][1]),
    ("dpo", GOOD_PAIR, BAD_PAIRS["empty chosen"][0], BAD_PAIRS["empty chosen"][1]),
    ("kto", GOOD_LABELLED, BAD_LABELLED["label a string"][0], BAD_LABELLED["label a string"][1]),
])
def test_train_with_strict_stops_at_a_bad_row_in_one_line(stage, good, bad, error, tiny_models, tmp_path, capsys):
    path, model = _bad_file(tmp_path, good, bad), tiny_models("glm4")
    capsys.readouterr()
    code = main(["train", f"model_name_or_path={model}", f"train_files={path}", f"stage={stage}",
                 "strict=true", "report_to=none", "max_steps=1", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"chattune: error: {path}#1{error}"]
