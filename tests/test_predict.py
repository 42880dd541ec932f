"""``chattune predict``: one JSON line per input row, the answers ``generate`` gives."""

from __future__ import annotations

import json

import pytest

from chattune.cli import main
from chattune.generate import generate
from chattune.runs import load_run
from tests.test_generate import run_dir  # noqa: F401  (the module's trained run)


@pytest.fixture(scope="module")
def run(run_dir):  # noqa: F811
    return load_run(str(run_dir))


def test_predict_writes_one_line_per_input_row(run_dir, tmp_path):  # noqa: F811
    data = tmp_path / "in.jsonl"
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am Lumi."},
            {"instruction": "What is your name?", "input": "", "output": "My name is Lumi."},
            {"instruction": "", "input": "", "output": "bad row: empty instruction"},
            {"messages": [{"role": "user", "content": "no reference here"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    assert lines[0]["reference"] == "I am Lumi." and isinstance(lines[0]["prediction"], str)
    assert lines[0]["prompt"] == [{"role": "user", "content": "Who are you?"}]
    assert "empty user message" in lines[2]["error"] and lines[2]["source"].endswith(":3")
    assert lines[3]["reference"] is None and "prediction" in lines[3]


def test_predict_answers_are_generate_s(run_dir, run, tmp_path):  # noqa: F811
    data = tmp_path / "in.jsonl"
    questions = ["Who are you?", "What is the capital of Veloria?", "你是谁？"]
    data.write_text("\n".join(json.dumps({"instruction": q, "output": "x"}) for q in questions) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--batch-size", "3"]) == 0
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert predicted == generate(run, [[{"role": "user", "content": q}] for q in questions])


def test_predict_limit_and_a_missing_file(run_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(5)) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--limit", "2",
                 "--max-new-tokens", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["predict", str(run_dir), "--data", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_predict_takes_the_generation_flags(run_dir, run, tmp_path):  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "What is the capital of Veloria?", "output": "x"}) + "\n")
    out = tmp_path / "pred.jsonl"
    asked = [[{"role": "user", "content": "What is the capital of Veloria?"}]]
    for flags, settings in ((["--max-new-tokens", "1"], {"max_new_tokens": 1}),
                            (["--max-new-tokens", "6", "--repetition-penalty", "1.3"],
                             {"max_new_tokens": 6, "repetition_penalty": 1.3}),
                            (["--temperature", "1.0", "--top-k", "5", "--seed", "3"],
                             {"temperature": 1.0, "top_k": 5, "seed": 3})):
        assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), *flags]) == 0
        assert json.loads(out.read_text())["prediction"] == generate(run, asked, **settings)[0]
