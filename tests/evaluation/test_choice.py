"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU layouts): read from a local copy, asked as
LLaMA-Factory asks them, scored at the letters' logits; a run taught to answer "C" scores exactly
the share of questions whose answer is C, beside its base."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from chattune.errors import ConfigError, DataError
from chattune.evaluation import choice
from chattune.inference.decoding import BASE_ADAPTER
from chattune.inference.runs import LoadOptions, load_run

LETTERS = "ABCD"


def question_rows(subject: str, count: int, answers: str) -> list[list[str]]:
    return [[f"In {subject}, which option is number {i}?", f"one {i}", f"two {i}", f"three {i}", f"four {i}",
             answers[i % len(answers)]] for i in range(count)]


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def make_mmlu(root: Path, answers: str = "CCCABD") -> Path:
    """MMLU's layout: data/{dev,test}/{subject}_{split}.csv without a header, and mapping.json."""
    for subject in ("algebra", "world_history"):
        write_csv(root / "data" / "dev" / f"{subject}_dev.csv", question_rows(subject, 5, "ABCD"))
        write_csv(root / "data" / "test" / f"{subject}_test.csv", question_rows(subject, 6, answers))
    (root / "mapping.json").write_text(json.dumps({
        "algebra": {"name": "abstract algebra", "category": "STEM"},
        "world_history": {"name": "world history", "category": "Humanities"}}))
    return root


def make_ceval(root: Path) -> Path:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(root / "dev" / "law_dev.csv", [[str(i), *r, ""] for i, r in enumerate(question_rows("law", 3, "AB"))],
              header)
    write_csv(root / "val" / "law_val.csv", [[str(i), *r, ""] for i, r in enumerate(question_rows("law", 4, "CD"))],
              header)
    write_csv(root / "test" / "law_test.csv", [[str(i), *r[:5], "", ""] for i, r in
                                               enumerate(question_rows("law", 2, "A"))], header)
    return root


def make_cmmlu(root: Path) -> Path:
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(root / "dev" / "chinese_history.csv", [[str(i), *r] for i, r in
                                                     enumerate(question_rows("史", 2, "B"))], header)
    write_csv(root / "test" / "chinese_history.csv", [[str(i), *r] for i, r in
                                                      enumerate(question_rows("史", 3, "D"))], header)
    return root


def test_each_published_layout_reads_with_its_subjects_and_categories(tmp_path):
    mmlu = choice.read_benchmark("mmlu", make_mmlu(tmp_path / "mmlu"))
    assert [(s.key, s.name, s.category, len(s.shots), len(s.questions)) for s in mmlu] == [
        ("algebra", "abstract algebra", "STEM", 5, 6), ("world_history", "world history", "Humanities", 5, 6)]
    assert mmlu[0].questions[0].answer == "C" and mmlu[0].questions[0].options["D"] == "four 0"
    assert mmlu[0].questions[1].where.endswith("algebra_test.csv:2")
    ceval = choice.read_benchmark("ceval", make_ceval(tmp_path / "ceval"))  # default split: val
    assert [(s.key, s.category, len(s.shots), [q.answer for q in s.questions]) for s in ceval] == [
        ("law", "Other", 3, ["C", "D", "C", "D"])]
    assert ceval[0].questions[0].where.endswith("law_val.csv:2")  # line 1 is the header
    cmmlu = choice.read_benchmark("cmmlu", make_cmmlu(tmp_path / "cmmlu"), limit=2)
    assert [(s.name, len(s.shots), [q.answer for q in s.questions]) for s in cmmlu] == [
        ("chinese history", 2, ["D", "D"])]


def test_bad_benchmark_files_are_named_with_their_line(tmp_path):
    root = make_mmlu(tmp_path / "mmlu")
    with pytest.raises(DataError, match="no subject files|no test/ folder|expected mmlu's layout"):
        choice.read_benchmark("mmlu", tmp_path / "empty")
    bad = root / "data" / "test" / "algebra_test.csv"
    bad.write_text('"q","a","b","c","d","E"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"algebra_test.csv:1: the answer is 'E'; expected one of A, B, C, D"):
        choice.read_benchmark("mmlu", root)
    bad.write_text('"q","a","b"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"algebra_test.csv:1: 3 columns"):
        choice.read_benchmark("mmlu", root)
    make_ceval(tmp_path / "ceval")
    with pytest.raises(DataError, match=r"law_test.csv:2: the answer is ''; .* \(this split publishes no answers"):
        choice.read_questions(tmp_path / "ceval" / "test" / "law_test.csv")
    with pytest.raises(ConfigError, match="C-Eval's test split publishes no answers"):
        choice.read_benchmark("ceval", tmp_path / "ceval", "test")
    with pytest.raises(ConfigError, match="--split: mmlu has the splits test, val, dev"):
        choice.read_benchmark("mmlu", root, "train")
    with pytest.raises(ConfigError, match="--subjects: physics not in"):
        choice.read_benchmark("mmlu", make_mmlu(tmp_path / "m2"), subjects=["physics"])


def test_the_prompt_is_llamafactorys_words_with_solved_examples_first(tmp_path):
    subject = choice.read_benchmark("mmlu", make_mmlu(tmp_path / "mmlu"))[0]
    messages = choice.question_messages(subject.questions[0], subject.shots[:1], subject.name, "en")
    assert messages == [
        {"role": "user", "content": "The following are multiple choice questions (with answers) about abstract "
                                    "algebra.\n\nIn algebra, which option is number 0?\nA. one 0\nB. two 0\nC. "
                                    "three 0\nD. four 0\nAnswer:"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "In algebra, which option is number 0?\nA. one 0\nB. two 0\nC. three 0\nD. four 0"
                                    "\nAnswer:"}]
    zh = choice.question_messages(subject.questions[1], [], "高中物理", "zh")
    assert zh == [{"role": "user", "content": "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
                                              "In algebra, which option is number 1?\nA. one 1\nB. two 1\nC. three 1"
                                              "\nD. four 1\n答案："}]


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def always_c(tiny_models, tmp_path_factory) -> Path:
    """A LoRA run taught to answer "C" to any question asked in the benchmark's words."""
    from chattune.config_io import build_config
    from chattune.training.recipe import train

    root = tmp_path_factory.mktemp("choice")
    words = choice.WORDS["en"]
    rows = []
    for i in range(24):
        question = choice.Question(f"Question {i} about thing {i * 7}?", {k: f"{k.lower()} {i}" for k in LETTERS},
                                   "C", "")
        rows.append({"instruction": words.system.format(subject="topic " + str(i % 3))
                     + choice.question_text(question, words), "input": "", "output": "C"})
    (root / "c.json").write_text(json.dumps(rows))
    config = build_config({"model_name_or_path": str(tiny_models("llama")), "train_files": [str(root / "c.json")],
                           "output_dir": str(root / "run"), "max_steps": 40, "learning_rate": 2e-2,
                           "per_device_train_batch_size": 8, "lora_rank": 8, "save_steps": 1000,
                           "logging_steps": 10, "report_to": ["none"], "seed": 3})
    train(config, log=lambda *_: None)
    return root / "run"


def test_batched_scores_equal_one_question_at_a_time(always_c, tmp_path):
    run = load_run(str(always_c), LoadOptions())
    subjects = choice.read_benchmark("mmlu", make_mmlu(tmp_path / "mmlu"))
    prompts = choice.build_prompts(run, subjects, n_shot=2, lang="en", seed=0, max_length=run.context_length)
    ids = choice.choice_token_ids(run.tokenizer)
    assert len(set(ids)) == 4
    for adapter in (BASE_ADAPTER, run.profile().adapter):
        batched = choice.predict(run, adapter, [p for _, _, p in prompts], ids, batch_size=5)
        from chattune.evaluation.evaluate import ActiveAdapter

        with ActiveAdapter(run, adapter), torch.no_grad():
            for (_, _, prompt), (letter, probs) in zip(prompts, batched, strict=True):
                logits = run.model(input_ids=torch.tensor([prompt])).logits[0, -1, ids]
                expected = torch.softmax(logits.float(), dim=-1)
                assert letter == LETTERS[int(expected.argmax())]
                assert probs == pytest.approx(expected.tolist(), abs=1e-3)
    again = choice.build_prompts(run, subjects, n_shot=2, lang="en", seed=0, max_length=run.context_length)
    assert [p for _, _, p in again] == [p for _, _, p in prompts]  # the examples' draw is seeded


def test_a_run_taught_to_answer_c_scores_the_share_of_c_beside_its_base(always_c, tmp_path):
    data = make_mmlu(tmp_path / "mmlu", answers="CCCABD")  # half of each subject's answers are C
    code, out, err = cli("eval", always_c, "--benchmark", "mmlu", "--data-dir", data, "--n-shot", 0,
                         "--compare", "base")
    assert code == 0, err
    result = json.loads((always_c / "eval" / "mmlu-test" / "eval.json").read_text())
    assert result["metrics"] == {"accuracy": 50.0, "accuracy/Humanities": 50.0, "accuracy/STEM": 50.0}
    assert result["data"] == {"benchmark": "mmlu", "split": "test", "n_shot": 0, "lang": "en", "questions": 12,
                              "subjects": 2}
    assert result["compare"]["name"] == "base" and result["subjects"]["algebra"]["correct"] == 3
    predictions = json.loads((always_c / "eval" / "mmlu-test" / "results.json").read_text())
    assert {row["prediction"] for rows in predictions.values() for row in rows.values()} == {"C"}
    assert "Average" in out and "abstract algebra" in out and "base" in out.splitlines()[1]
    runs = json.loads(json.dumps(result))  # the runs view reads metrics and compare from it
    assert set(runs["compare"]) >= {"name", "metrics", "better", "worse", "same"}


def test_eval_needs_data_or_a_benchmark(always_c, tmp_path):
    code, _, err = cli("eval", always_c)
    assert code == 2 and "give --data FILE" in err
    code, _, err = cli("eval", always_c, "--benchmark", "ceval")
    assert code == 2 and "--data-dir" in err
