"""Multiple-choice benchmarks: C-Eval, CMMLU and MMLU from a local copy, scored as LLaMA-Factory scores them.

``chattune eval RUN --benchmark ceval|cmmlu|mmlu --data-dir DIR``. Each question (with
``--n-shot`` solved examples of its subject before it, drawn from the subject's dev split) is a
conversation rendered with the run's template; the model's next-token logits at the end of the
prompt are read at the tokens of ``A``, ``B``, ``C`` and ``D`` (the last token of each letter as
the tokenizer encodes it) and the likeliest letter is the answer. Accuracy is reported per
subject, per category (mapping.json's, e.g. STEM, Humanities) and overall, with ``--compare`` the
base (or another run) on the very same prompts beside it.

LLaMA-Factory's prompt words (``The following are multiple choice questions (with answers)
about {subject}.`` / ``以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。``, each option
``\\n{letter}. {text}``, then ``\\nAnswer:`` / ``\\n答案：``) are used as they are. One difference:
LLaMA-Factory draws each question's examples with an unseeded shuffle; here the draw is seeded
(``--seed``), so two evaluations of the same data see the same prompts.

Layouts read (as the data sets publish them):

- ``ceval``: ``dev/{subject}_dev.csv`` and ``val/{subject}_val.csv`` with a header
  ``id,question,A,B,C,D,answer,explanation`` (its test split publishes no answers);
- ``cmmlu``: ``dev/{subject}.csv`` and ``test/{subject}.csv`` with a header
  ``,Question,A,B,C,D,Answer``;
- ``mmlu``: ``[data/]dev/{subject}_dev.csv`` and ``[data/]val|test/{subject}_{split}.csv`` without a
  header (question, A, B, C, D, answer).

An optional ``mapping.json`` (``{subject: {"name", "category"}}``, as LLaMA-Factory ships it)
names the subjects and their categories; without it the subjects are the files found, in the
category ``Other``.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.errors import ConfigError, DataError

CHOICES = ("A", "B", "C", "D")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}
DEFAULT_LANG = {"ceval": "zh", "cmmlu": "zh", "mmlu": "en"}
SPLITS = {"ceval": ("val", "dev"), "cmmlu": ("test", "dev"), "mmlu": ("test", "val", "dev")}


@dataclass(frozen=True)
class EvalWords:
    """A language's words around a question (LLaMA-Factory's evaluation templates)."""

    system: str
    choice: str
    answer: str


WORDS = {
    "en": EvalWords("The following are multiple choice questions (with answers) about {subject}.\n\n",
                    "\n{choice}. {content}", "\nAnswer:"),
    "zh": EvalWords("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n{choice}. {content}",
                    "\n答案："),
}


@dataclass
class Question:
    """One multiple-choice question, and where it was read."""

    question: str
    options: dict[str, str]
    answer: str
    where: str


@dataclass
class Subject:
    """A subject's solved examples (dev split) and the questions to score."""

    key: str
    name: str
    category: str
    shots: list[Question] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def _split_file(root: Path, benchmark: str, subject: str, split: str) -> Path:
    """Where a subject's split lies in the benchmark's layout."""
    if benchmark == "cmmlu":
        return root / split / f"{subject}.csv"
    if benchmark == "mmlu" and (root / "data").is_dir():
        root = root / "data"
    return root / split / f"{subject}_{split}.csv"


def _split_folder(root: Path, benchmark: str, split: str) -> Path:
    return _split_file(root, benchmark, "x", split).parent


def _subject_of(path: Path, benchmark: str, split: str) -> str:
    return path.stem if benchmark == "cmmlu" else path.stem.removesuffix(f"_{split}")


def read_questions(path: Path, *, need_answer: bool = True) -> list[Question]:
    """The questions of one CSV file (with or without a header row naming the columns)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
    if not rows:
        return []
    lowered = [cell.strip().lower() for cell in rows[0]]
    if "question" in lowered and "answer" in lowered:
        columns = {name: lowered.index(name) for name in ("question", "a", "b", "c", "d", "answer")
                   if name in lowered}
        missing = [name for name in ("question", "a", "b", "c", "d", "answer") if name not in columns]
        if missing:
            raise DataError(f"{path}: line 1: the header lacks {', '.join(missing)}; expected question, A, B, C, D, "
                            "answer")
        body, first_line = rows[1:], 2
    else:
        columns = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        body, first_line = rows, 1
    questions = []
    for number, row in enumerate(body, start=first_line):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{number}"
        if len(row) <= max(columns.values()):
            raise DataError(f"{where}: {len(row)} columns; expected question, A, B, C, D and the answer")
        answer = row[columns["answer"]].strip().upper()
        if need_answer and answer not in CHOICES:
            raise DataError(f"{where}: the answer is {row[columns['answer']]!r}; expected one of A, B, C, D"
                            + (" (this split publishes no answers: score the val or dev split)" if not answer else ""))
        options = {letter: row[columns[letter.lower()]].strip() for letter in CHOICES}
        questions.append(Question(row[columns["question"]].strip(), options, answer, where))
    return questions


def read_benchmark(benchmark: str, data_dir: str | Path, split: str | None = None, *,
                   subjects: list[str] | None = None, limit: int | None = None) -> list[Subject]:
    """A benchmark's subjects from ``data_dir`` (its published layout): each subject's dev
    questions (the solved examples) and the questions of ``split`` (at most ``limit`` each)."""
    if benchmark not in DEFAULT_SPLIT:
        raise ConfigError(f"--benchmark: expected one of {', '.join(DEFAULT_SPLIT)}, got {benchmark!r}")
    split = split or DEFAULT_SPLIT[benchmark]
    if benchmark == "ceval" and split == "test":
        raise ConfigError("--split test: C-Eval's test split publishes no answers (its site scores submitted "
                          "predictions); score --split val")
    if split not in SPLITS[benchmark]:
        raise ConfigError(f"--split: {benchmark} has the splits {', '.join(SPLITS[benchmark])}, got {split!r}")
    root = Path(data_dir)
    folder = _split_folder(root, benchmark, split)
    if not folder.is_dir():
        raise DataError(f"--data-dir {root}: no {folder.relative_to(root)}/ folder; expected {benchmark}'s layout "
                        f"({_split_file(Path('DIR'), benchmark, '{subject}', split)})")
    mapping_path = root / "mapping.json"
    mapping: dict = {}
    if mapping_path.is_file():
        try:
            mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{mapping_path}: not readable JSON ({exc})") from exc
        if not isinstance(mapping, dict):
            raise DataError(f"{mapping_path}: expected an object of subject: {{name, category}}")
    found = sorted(_subject_of(p, benchmark, split) for p in folder.glob("*.csv"))
    keys = [key for key in (mapping or {k: None for k in found}) if key in found]
    if subjects:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise ConfigError(f"--subjects: {', '.join(unknown)} not in {folder}; it has {', '.join(found[:20])}"
                              + (" ..." if len(found) > 20 else ""))
        keys = [key for key in keys if key in subjects] or list(subjects)
    if not keys:
        raise DataError(f"{folder}: no subject files (*.csv) in it")
    result = []
    for key in keys:
        info = mapping.get(key) if isinstance(mapping.get(key), dict) else {}
        subject = Subject(key, str(info.get("name") or key.replace("_", " ")), str(info.get("category") or "Other"))
        dev = _split_file(root, benchmark, key, "dev")
        subject.shots = read_questions(dev) if dev.is_file() else []
        subject.questions = read_questions(_split_file(root, benchmark, key, split))
        if limit:
            subject.questions = subject.questions[:limit]
        result.append(subject)
    return result


def question_text(question: Question, words: EvalWords) -> str:
    """The question and its options, ending with the answer cue."""
    options = "".join(words.choice.format(choice=letter, content=question.options[letter]) for letter in CHOICES)
    return question.question + options + words.answer


def question_messages(question: Question, shots: list[Question], subject_name: str, lang: str) -> list[dict]:
    """The conversation asking ``question`` after its solved examples, the subject's line first
    (ending with the question: the model's next token is its answer)."""
    words = WORDS[lang]
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": question_text(shot, words)},
                     {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": question_text(question, words)})
    messages[0] = {**messages[0], "content": words.system.format(subject=subject_name) + messages[0]["content"]}
    return messages


def choice_token_ids(tokenizer) -> list[int]:
    """The token read for each letter: the last token of the letter as the tokenizer encodes it."""
    return [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in CHOICES]


def build_prompts(run, subjects: list[Subject], *, n_shot: int, lang: str, seed: int, max_length: int,
                  log=print) -> list[tuple[Subject, Question, list[int]]]:
    """Each question's prompt ids (its examples drawn from the subject's dev split, seeded per
    question; fewer examples when the prompt would not fit ``max_length``)."""
    prompts = []
    shortened = 0
    for subject in subjects:
        for index, question in enumerate(subject.questions):
            pool = [shot for shot in subject.shots if shot is not question]
            drawn = random.Random(f"{seed}:{subject.key}:{index}").sample(pool, min(n_shot, len(pool)))
            while True:
                ids = run.prompt_ids(question_messages(question, drawn, subject.name, lang))
                if len(ids) < max_length or not drawn:
                    break
                drawn = drawn[:-1]
                shortened += 1
            if len(ids) >= max_length:
                raise DataError(f"{question.where}: the question alone is {len(ids)} tokens; the model's context is "
                                f"{max_length}")
            prompts.append((subject, question, ids))
    if shortened:
        log(f"benchmark: {shortened} examples left out of prompts that would not fit {max_length} tokens")
    return prompts


@torch.no_grad()
def predict(run, adapter: str, prompts: list[list[int]], choice_ids: list[int], *, batch_size: int = 8,
            pad_token_id: int = 0) -> list[tuple[str, list[float]]]:
    """The likeliest letter of each prompt and the letters' probabilities (a softmax over the
    four letters' logits at the prompt's last position), with ``adapter`` active."""
    from chattune.evaluation.evaluate import ActiveAdapter

    model = run.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # like lengths together: less padding
    by_index: dict[int, tuple[str, list[float]]] = {}
    try:
        with ActiveAdapter(run, adapter):
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                longest = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), longest), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), longest), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
                    mask[row, :len(prompts[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                last = logits[torch.arange(len(chunk)), mask.sum(dim=1).to(device) - 1]
                probs = torch.softmax(last[:, choice_ids].float(), dim=-1).cpu()
                for row, i in enumerate(chunk):
                    by_index[i] = (CHOICES[int(probs[row].argmax())], [round(float(p), 4) for p in probs[row]])
    finally:
        model.train(was_training)
    return [by_index[i] for i in range(len(prompts))]


def accuracy_table(prompts: list[tuple[Subject, Question, list[int]]], predictions: list[tuple[str, list[float]]]
                   ) -> dict:
    """Accuracy per subject, per category and overall (``Average``), in percent."""
    subjects: dict[str, dict] = {}
    categories: dict[str, list[bool]] = {}
    everything: list[bool] = []
    for (subject, question, _), (letter, _) in zip(prompts, predictions, strict=True):
        right = letter == question.answer
        entry = subjects.setdefault(subject.key, {"name": subject.name, "category": subject.category,
                                                  "correct": 0, "total": 0})
        entry["correct"] += right
        entry["total"] += 1
        categories.setdefault(subject.category, []).append(right)
        everything.append(right)
    for entry in subjects.values():
        entry["accuracy"] = round(100 * entry["correct"] / entry["total"], 2)
    return {"Average": round(100 * sum(everything) / len(everything), 2) if everything else None,
            "categories": {name: round(100 * sum(v) / len(v), 2) for name, v in sorted(categories.items())},
            "subjects": subjects, "questions": len(everything)}


def run_benchmark(run, profile: str | None, prompts, *, batch_size: int = 8) -> tuple[dict, list]:
    """Score the prompts with ``run``'s profile: (the accuracy table, the predictions)."""
    chosen = run.profile(profile)
    predictions = predict(run, chosen.adapter, [ids for _, _, ids in prompts], choice_token_ids(run.tokenizer),
                          batch_size=batch_size, pad_token_id=run.tokenizer.pad_token_id or 0)
    return accuracy_table(prompts, predictions), predictions


def write_benchmark(out: Path, result: dict, prompts, predictions, other_predictions=None) -> None:
    """``eval.json`` (the runs view reads it) and ``results.json`` (each question's letter and
    probabilities, by subject, as LLaMA-Factory's results.json keys them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    by_subject: dict[str, dict] = {}
    counters: dict[str, int] = {}
    for position, ((subject, question, _), (letter, probs)) in enumerate(zip(prompts, predictions, strict=True)):
        index = counters.get(subject.key, 0)
        counters[subject.key] = index + 1
        row = {"prediction": letter, "answer": question.answer, "probabilities": probs, "where": question.where}
        if other_predictions is not None:
            row["compare_prediction"] = other_predictions[position][0]
        by_subject.setdefault(subject.key, {})[str(index)] = row
    (out / "results.json").write_text(json.dumps(by_subject, indent=2, ensure_ascii=False), encoding="utf-8")


def benchmark_result(benchmark: str, split: str, n_shot: int, lang: str, table: dict, other: dict | None,
                     other_name: str | None) -> dict:
    """The eval.json of a benchmark run: metrics (accuracy overall and by category), the
    data's description, and the comparison."""
    metrics = {"accuracy": table["Average"], **{f"accuracy/{k}": v for k, v in table["categories"].items()}}
    result = {"benchmark": benchmark, "metrics": metrics, "subjects": table["subjects"],
              "data": {"benchmark": benchmark, "split": split, "n_shot": n_shot, "lang": lang,
                       "questions": table["questions"], "subjects": len(table["subjects"])}}
    if other is not None:
        their = {"accuracy": other["Average"], **{f"accuracy/{k}": v for k, v in other["categories"].items()}}
        keys = list(metrics)
        result["compare"] = {"name": other_name, "metrics": their, "subjects": other["subjects"],
                             "better": [k for k in keys if (metrics[k] or 0) > (their.get(k) or 0)],
                             "worse": [k for k in keys if (metrics[k] or 0) < (their.get(k) or 0)],
                             "same": [k for k in keys if metrics[k] == their.get(k)]}
    return result


def format_benchmark(result: dict, name: str) -> str:
    """The accuracy table as printed: by category and overall, then by subject."""
    other = result.get("compare")
    head = f"{'':>30}  {name:>10}" + (f"  {other['name']:>10}" if other else "")
    lines = [f"{result['benchmark']} ({result['data']['split']}, {result['data']['n_shot']}-shot, "
             f"{result['data']['questions']} questions in {result['data']['subjects']} subjects)", head]

    def line(label: str, ours, theirs) -> str:
        text = f"{label[:30]:>30}  {ours:>10.2f}"
        return text + (f"  {theirs:>10.2f}" if other else "")

    for key, value in result["metrics"].items():
        label = "Average" if key == "accuracy" else key.removeprefix("accuracy/")
        lines.append(line(label, value, other["metrics"].get(key) if other else None))
    lines.append("")
    for key, entry in result["subjects"].items():
        lines.append(line(entry["name"], entry["accuracy"],
                          other["subjects"][key]["accuracy"] if other else None))
    return "\n".join(lines)
