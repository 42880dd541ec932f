"""``chattune eval``: LLaMA-Factory's files, figures that are the rows' arithmetic, the
reference loss as training computes it, ``--compare`` with the base or another run, bad
input, and ``eval_generate`` during training."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from chattune.config_io import load_config
from chattune.errors import ConfigError
from chattune.evaluation import evaluate as ev
from chattune.evaluation.metrics import METRIC_NAMES, average, exact_match, similarity
from chattune.inference.generate import generate
from chattune.inference.runs import LoadOptions, load_run
from tests.training.test_recipe import make_config

SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match")
FIGURES = SCORES + ("answer_length", "eval_loss", "perplexity", "eval_tokens")
PREDICT_RESULTS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
                   "predict_runtime", "predict_samples_per_second"}
ROW_KEYS = {"index", "source", "prompt", "label", "predict", "tokens", "no_reference", "scores"}
SEED = 7
RUN_MAX_NEW_TOKENS = 12  # make_config's max_new_tokens: the runs' generation default


def quiet(*_):
    pass


def cli(*argv) -> tuple[int, str, str]:
    """``chattune ARGV`` with its stdout and stderr captured (usable in module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def conversations(path: Path) -> list[list[dict]]:
    """The prompts of a data file's rows, as eval reads them."""
    return [e.messages for e in ev.read_eval_data(str(path)).examples]


def data_rows(data_file: Path) -> list[dict]:
    return json.loads(data_file.read_text(encoding="utf-8"))


# --- the module's runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def lora(tiny_models, data_file, root):
    """One LoRA run (lr high enough that its answers differ from the base's) that also scores
    generation on a fixed sample of 4 eval rows at steps 4, 8 and 12."""
    from chattune.training.recipe import train

    config = make_config(tiny_models("glm4"), data_file, root / "lora", max_steps=12, save_steps=12,
                         eval_steps=4, eval_fraction=0.2, learning_rate=1e-2, report_to=["none"],
                         eval_generate="true", eval_generate_samples=4, cache_dir=str(root / "cache"))
    return train(config, log=quiet)


@pytest.fixture(scope="module")
def freeze(tiny_models, data_file, root):
    """A freeze run: it replaces base weights, so its base is loaded on its own to compare."""
    from chattune.training.recipe import train

    config = make_config(tiny_models("glm4"), data_file, root / "freeze", method="freeze", max_steps=4,
                         save_steps=4, eval_fraction=0.0, learning_rate=5e-3, report_to=["none"],
                         cache_dir=str(root / "cache"))
    return train(config, log=quiet)


@pytest.fixture(scope="module")
def lora_eval(lora, data_file):
    """``chattune eval RUN --data F`` with the defaults: (its folder, stdout)."""
    code, out, err = cli("eval", lora.output_dir, "--data", data_file)
    assert code == 0, err
    rows = len(data_rows(data_file))
    assert f"generated {rows}/{rows}" in err and "generated 8/" not in out  # progress on stderr only
    return lora.output_dir / "eval" / data_file.stem, out


@pytest.fixture(scope="module")
def lora_compare(lora, data_file, root):
    """``chattune eval RUN --data F --compare base --out X``: (its folder, stdout)."""
    out_dir = root / "compare-base"
    code, out, err = cli("eval", lora.output_dir, "--data", data_file, "--compare", "base", "--out", out_dir)
    assert code == 0, err
    return out_dir, out


@pytest.fixture(scope="module")
def lora_loaded(lora):
    return load_run(str(lora.output_dir))


# --- 1. the files -----------------------------------------------------------------------------


def test_eval_writes_llamafactory_s_files_and_eval_json(lora, lora_eval, data_file, tiny_models):
    out_dir, stdout = lora_eval
    rows = data_rows(data_file)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "eval.json", "eval_rows.jsonl", "generated_predictions.jsonl", "predict_results.json"]

    predictions = read_jsonl(out_dir / "generated_predictions.jsonl")
    assert len(predictions) == len(rows)
    for line, row in zip(predictions, rows, strict=True):
        assert set(line) == {"prompt", "predict", "label"}
        assert line["label"] == row["output"]
        assert row["instruction"] in line["prompt"] and isinstance(line["predict"], str)

    predict_results = read_json(out_dir / "predict_results.json")
    assert set(predict_results) == PREDICT_RESULTS

    result = read_json(out_dir / "eval.json")
    assert set(result) == {"run", "data", "generation", "metrics", "runtime_s", "samples_per_second", "compare"}
    assert result["compare"] is None
    assert set(result["metrics"]) == set(FIGURES)
    for name in METRIC_NAMES:
        assert predict_results[f"predict_{name}"] == result["metrics"][name]
    assert predict_results["predict_runtime"] == result["runtime_s"] > 0
    assert predict_results["predict_samples_per_second"] == result["samples_per_second"] > 0

    run = result["run"]
    manifest = read_json(lora.output_dir / "chattune.json")
    assert run["name"] == lora.output_dir.name and run["path"] == str(lora.output_dir)
    assert run["template"] == "tokenizer" and run["global_step"] == 12
    assert run["method"] == manifest["method"]["name"] == "lora"
    assert run["base_model"]["config_sha256"] == manifest["base_model"]["config_sha256"]
    assert len(run["base_model"]["config_sha256"]) == 64
    assert run["base_model"]["path"] == str(Path(tiny_models("glm4")).resolve())

    assert result["data"]["path"] == str(data_file)
    assert (result["data"]["rows"], result["data"]["scored"], result["data"]["no_reference"],
            result["data"]["unreadable"]) == (len(rows), len(rows), 0, 0)
    assert result["generation"] == {"do_sample": False, "batch_size": 8}  # greedy by default

    eval_rows = read_jsonl(out_dir / "eval_rows.jsonl")
    assert len(eval_rows) == len(rows)
    assert all(set(r) == ROW_KEYS for r in eval_rows)
    assert [r["index"] for r in eval_rows] == list(range(len(rows)))
    assert [r["source"] for r in eval_rows] == [f"{data_file}#{i}" for i in range(len(rows))]
    assert [r["predict"] for r in eval_rows] == [p["predict"] for p in predictions]
    assert [r["prompt"] for r in eval_rows] == [p["prompt"] for p in predictions]
    assert all(0 < r["tokens"] <= RUN_MAX_NEW_TOKENS for r in eval_rows)  # the run's max_new_tokens
    assert f"wrote {out_dir}/eval.json" in stdout


def test_predictions_are_the_run_s_greedy_answers(lora_eval, lora_loaded, data_file):
    out_dir, _ = lora_eval
    asked = conversations(data_file)[:4]
    predictions = read_jsonl(out_dir / "generated_predictions.jsonl")
    assert [p["predict"] for p in predictions[:4]] == generate(lora_loaded, asked, do_sample=False)
    prompt_ids = lora_loaded.prompt_ids(asked[0])
    assert predictions[0]["prompt"] == lora_loaded.decode(prompt_ids)


# --- 2. the figures are the rows' arithmetic ----------------------------------------------------


def check_figures(rows: list[dict], figures: dict) -> None:
    """Every row's scores are what metrics gives its (predict, label); the totals their means."""
    scored = [r for r in rows if not r["no_reference"]]
    assert scored
    for row in scored:
        expected = {**similarity(row["predict"], row["label"]),
                    "exact_match": exact_match(row["predict"], row["label"])}
        assert row["scores"] == expected, row
    for name in SCORES:
        mean = sum(r["scores"][name] for r in scored) / len(scored)
        assert figures[name] == pytest.approx(mean, abs=1e-9), name
    assert figures["answer_length"] == pytest.approx(sum(r["tokens"] for r in rows) / len(rows))
    assert figures["perplexity"] == pytest.approx(math.exp(figures["eval_loss"]), rel=1e-12)
    assert figures["eval_tokens"] > 0


def test_totals_are_the_means_of_the_rows_scores(lora_eval):
    out_dir, _ = lora_eval
    rows = read_jsonl(out_dir / "eval_rows.jsonl")
    figures = read_json(out_dir / "eval.json")["metrics"]
    check_figures(rows, figures)
    assert figures == pytest.approx({**figures, **average([r["scores"] for r in rows])})


def test_totals_of_the_compared_side_are_the_means_of_its_rows(lora_compare):
    """The base's answers score above zero, so this checks arithmetic on real numbers."""
    out_dir, _ = lora_compare
    other = read_json(out_dir / "eval.json")["compare"]["metrics"]
    base_rows = read_jsonl(out_dir / "compare_rows.jsonl")
    check_figures(base_rows, other)
    assert any(r["scores"]["bleu-4"] > 0 for r in base_rows)
    check_figures(read_jsonl(out_dir / "eval_rows.jsonl"), read_json(out_dir / "eval.json")["metrics"])


# --- 3. determinism -------------------------------------------------------------------------------


def test_batch_size_and_out_change_nothing(lora, lora_eval, data_file, root):
    out_dir, _ = lora_eval
    expected_rows = read_jsonl(out_dir / "eval_rows.jsonl")
    expected = read_json(out_dir / "eval.json")
    for batch_size in (1, 5):
        other = root / f"batch-{batch_size}"
        code, _, err = cli("eval", lora.output_dir, "--data", data_file, "--batch-size", batch_size, "--out", other)
        assert code == 0, err
        assert read_jsonl(other / "eval_rows.jsonl") == expected_rows
        assert read_jsonl(other / "generated_predictions.jsonl") == \
            read_jsonl(out_dir / "generated_predictions.jsonl")
        result = read_json(other / "eval.json")
        for name in FIGURES:
            if name in ("eval_loss", "perplexity"):  # padding changes the float sums' order only
                assert result["metrics"][name] == pytest.approx(expected["metrics"][name], rel=1e-5)
            else:
                assert result["metrics"][name] == expected["metrics"][name], name
        assert result["generation"]["batch_size"] == batch_size


def test_a_bad_batch_size_is_an_error(lora, data_file, tmp_path, capsys):
    assert main(["eval", str(lora.output_dir), "--data", str(data_file), "--batch-size", "0",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err  # (checked when the rows are generated, after the run loads)
    assert err.splitlines()[-1] == "chattune: error: --batch-size: must be >= 1, got 0"


# --- 4. the reference loss --------------------------------------------------------------------------


def eval_split(data_file: Path) -> list:
    """The records training held out (eval_fraction=0.2, seed 7), as training split them."""
    from chattune.config import DataSource
    from chattune.data.sources import load_records, split_eval

    records, _ = load_records([DataSource(path=str(data_file))], seed=SEED)
    return split_eval(records, 0.2, SEED)[1]


def test_eval_loss_equals_training_s_on_its_eval_rows(lora, data_file, root):
    held = eval_split(data_file)
    assert len(held) == len(lora.prepared.eval) == round(len(data_rows(data_file)) * 0.2)
    held_file = write_jsonl(root / "held.jsonl", [{"messages": r.messages} for r in held])
    code, _, err = cli("eval", lora.output_dir, "--data", held_file, "--out", root / "held")
    assert code == 0, err
    figures = read_json(root / "held" / "eval.json")["metrics"]
    supervised = sum(sum(label != -100 for label in labels[1:]) for labels in lora.prepared.eval["labels"])
    assert figures["eval_tokens"] == supervised
    logged = [r for r in read_jsonl(lora.output_dir / "metrics.jsonl") if "eval_loss" in r and r["step"] == 12]
    assert logged and lora.eval_loss == logged[-1]["eval_loss"]
    assert figures["eval_loss"] == pytest.approx(lora.eval_loss, abs=1e-5)


def hand_loss(model, data: ev.EvalData, template: str, encoder, max_seq_length: int) -> tuple[float, int]:
    """One row at a time, no padding: summed cross-entropy over the supervised tokens / their count."""
    from chattune.data.encode import EncodeOptions, encode_conversation

    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.examples:
            if example.reference is None:
                continue
            messages = example.messages + [{"role": "assistant", "content": example.reference}]
            row = encode_conversation(messages, template, encoder, EncodeOptions(max_seq_length=max_seq_length))
            ids = torch.tensor([row.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(row.labels[1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count, count


def test_reference_loss_is_a_token_weighted_mean(lora_loaded, data_file, tiny_models):
    from transformers import AutoModelForCausalLM

    run = lora_loaded
    data = ev.read_eval_data(str(data_file))
    profile = run.profile()
    expected, count = hand_loss(run.model, data, profile.template, run.encoder, 96)
    for batch_size in (1, 3, 8):
        loss, tokens = ev.reference_loss(run, profile, data, max_seq_length=96, batch_size=batch_size)
        assert tokens == count
        assert loss == pytest.approx(expected, abs=1e-5)

    # the base profile: the adapter switched off, the plain base model's loss
    with_base = ev.base_profile(run)
    loss, tokens = ev.reference_loss(with_base, with_base.profile("base"), data, max_seq_length=96)
    base = AutoModelForCausalLM.from_pretrained(tiny_models("glm4")).eval()
    expected_base, count_base = hand_loss(base, data, profile.template, run.encoder, 96)
    assert tokens == count_base and loss == pytest.approx(expected_base, abs=1e-5)
    assert abs(loss - expected) > 1e-4  # the adapter matters, and is back on afterwards
    assert ev.reference_loss(run, profile, data, max_seq_length=96)[0] == pytest.approx(expected, abs=1e-5)


def test_rows_without_a_reference_have_no_loss(lora_loaded, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Who are you?"}]}])
    data = ev.read_eval_data(str(path))
    assert ev.reference_loss(lora_loaded, lora_loaded.profile(), data, max_seq_length=96) == (None, 0)


# --- 5. --compare ---------------------------------------------------------------------------------------


def check_compare(result: dict, name: str, scored: int) -> None:
    other = result["compare"]
    assert other["name"] == name
    assert set(other["metrics"]) == set(FIGURES)
    for metric in SCORES:
        assert other["better"][metric] + other["worse"][metric] + other["same"][metric] == scored, metric
    changed = other["changed_most"]
    assert 0 < len(changed) <= 5
    deltas = [abs(row["delta"]) for row in changed]
    assert deltas == sorted(deltas, reverse=True)
    for row in changed:
        assert set(row) == {"index", "prompt", "label", "predict", "other", "delta", "metric"}
        assert row["metric"] == "rouge-l"


def check_counts(result: dict, ours: list[dict], theirs: list[dict]) -> None:
    """better / worse / same recounted from the two files' rows."""
    other = result["compare"]
    for metric in SCORES:
        deltas = [a["scores"][metric] - b["scores"][metric] for a, b in zip(ours, theirs, strict=True)
                  if a["scores"] is not None and b["scores"] is not None]
        assert other["better"][metric] == sum(d > 0 for d in deltas)
        assert other["worse"][metric] == sum(d < 0 for d in deltas)
        assert other["same"][metric] == sum(d == 0 for d in deltas)
    by_index = {a["index"]: (a, b) for a, b in zip(ours, theirs, strict=True)}
    for row in other["changed_most"]:
        mine, theirs_row = by_index[row["index"]]
        assert row["predict"] == mine["predict"] and row["other"] == theirs_row["predict"]
        assert row["delta"] == round(mine["scores"]["rouge-l"] - theirs_row["scores"]["rouge-l"], 4)
    largest = max(abs(a["scores"]["rouge-l"] - b["scores"]["rouge-l"]) for a, b in zip(ours, theirs, strict=True))
    assert abs(other["changed_most"][0]["delta"]) == pytest.approx(largest, abs=1e-4)


def test_compare_base_on_a_lora_run(lora, lora_compare, lora_eval, data_file, tiny_models):
    out_dir, stdout = lora_compare
    rows = data_rows(data_file)
    result = read_json(out_dir / "eval.json")
    check_compare(result, "base", len(rows))
    ours, theirs = read_jsonl(out_dir / "eval_rows.jsonl"), read_jsonl(out_dir / "compare_rows.jsonl")
    check_counts(result, ours, theirs)
    # our side is the plain eval's
    assert ours == read_jsonl(lora_eval[0] / "eval_rows.jsonl")
    # the base's answers are the base model's alone, with the run's template and generation defaults
    base = load_run(str(tiny_models("glm4")), LoadOptions(template=result["run"]["template"]))
    asked = conversations(data_file)
    alone = []
    for start in range(0, len(asked), 8):
        alone += generate(base, asked[start:start + 8], do_sample=False, max_new_tokens=RUN_MAX_NEW_TOKENS)
    assert [r["predict"] for r in theirs] == alone
    assert [r["predict"] for r in theirs] != [r["predict"] for r in ours]  # training changed the answers
    assert [r["label"] for r in theirs] == [r["output"] for r in rows]
    # the base's loss is the base model's, over the same tokens
    assert result["compare"]["metrics"]["eval_tokens"] == result["metrics"]["eval_tokens"]
    assert result["compare"]["metrics"]["eval_loss"] != pytest.approx(result["metrics"]["eval_loss"], abs=1e-4)
    # the table has both columns
    header = next(line for line in stdout.splitlines() if line.startswith("metric"))
    assert header.split()[:3] == ["metric", "base", lora.output_dir.name]
    for name in ("rouge-l", "bleu-4", "eval_loss"):
        line = next(line for line in stdout.splitlines() if line.startswith(name + " "))
        base_value, our_value = result["compare"]["metrics"][name], result["metrics"][name]
        assert line.split()[1:3] == [f"{base_value:.4f}", f"{our_value:.4f}"]
    assert "rows whose ROUGE-L changed most (base -> " in stdout


def test_compare_base_on_a_freeze_run_loads_the_base_alone(freeze, data_file, root, tiny_models):
    rows = data_rows(data_file)[:6]
    small = root / "small.json"
    small.write_text(json.dumps(rows, ensure_ascii=False))
    out_dir = root / "freeze-compare"
    code, stdout, err = cli("eval", freeze.output_dir, "--data", small, "--compare", "base", "--out", out_dir,
                            "--max-new-tokens", 6)
    assert code == 0, err
    result = read_json(out_dir / "eval.json")
    check_compare(result, "base", len(rows))
    ours, theirs = read_jsonl(out_dir / "eval_rows.jsonl"), read_jsonl(out_dir / "compare_rows.jsonl")
    check_counts(result, ours, theirs)
    assert result["run"]["method"] == "freeze"
    assert result["generation"] == {"max_new_tokens": 6, "do_sample": False, "batch_size": 8}
    base = load_run(str(tiny_models("glm4")), LoadOptions(template=result["run"]["template"]))
    asked = conversations(small)
    assert [r["predict"] for r in theirs] == generate(base, asked, do_sample=False, max_new_tokens=6)
    assert [r["predict"] for r in ours] == generate(load_run(str(freeze.output_dir)), asked, do_sample=False,
                                                     max_new_tokens=6)
    assert result["compare"]["metrics"]["eval_loss"] != pytest.approx(result["metrics"]["eval_loss"], abs=1e-5)
    header = next(line for line in stdout.splitlines() if line.startswith("metric"))
    assert header.split()[:3] == ["metric", "base", freeze.output_dir.name]


def test_compare_base_answers_with_the_run_s_generation_defaults_for_every_method(freeze, lora_loaded):
    for run in (load_run(str(freeze.output_dir)), lora_loaded):
        other, name = ev.load_compare(run, "base", warn=quiet)
        assert other.profile(name).generation == run.profile().generation


def test_compare_base_measures_the_loss_over_the_same_tokens(lora, lora_loaded, tmp_path):
    long = {"instruction": "Tell me everything about Veloria.", "input": "",
            "output": " ".join(f"Veloria fact number {i} is about the Amber River." for i in range(30))}
    path = tmp_path / "long.json"
    path.write_text(json.dumps([long, {"instruction": "Who are you?", "input": "", "output": "I am Lumi."}]))
    data = ev.read_eval_data(str(path))
    ours, _ = ev.evaluate(lora_loaded, data, log=quiet, max_new_tokens=2)
    base_run, name = ev.load_compare(lora_loaded, "base", warn=quiet)
    # the compared side is measured at the run's max_seq_length (cmd_eval passes it, as here)
    assert ours["data"]["max_seq_length"] == 96
    theirs, _ = ev.evaluate(base_run, data, profile=name, log=quiet, max_new_tokens=2,
                            max_seq_length=ours["data"]["max_seq_length"])
    assert theirs["metrics"]["eval_tokens"] == ours["metrics"]["eval_tokens"]
    code, _, err = cli("eval", lora.output_dir, "--data", path, "--compare", "base", "--out", tmp_path / "cli",
                       "--max-new-tokens", 2)
    assert code == 0, err
    written = read_json(tmp_path / "cli" / "eval.json")
    assert written["compare"]["metrics"]["eval_tokens"] == written["metrics"]["eval_tokens"]


def test_compare_with_another_run(lora, freeze, data_file, root):
    rows = data_rows(data_file)[:6]
    small = root / "small-other.json"
    small.write_text(json.dumps(rows, ensure_ascii=False))
    out_dir = root / "compare-other"
    code, stdout, err = cli("eval", lora.output_dir, "--data", small, "--compare", freeze.output_dir,
                            "--out", out_dir, "--max-new-tokens", 6)
    assert code == 0, err
    result = read_json(out_dir / "eval.json")
    check_compare(result, freeze.output_dir.name, len(rows))
    ours, theirs = read_jsonl(out_dir / "eval_rows.jsonl"), read_jsonl(out_dir / "compare_rows.jsonl")
    check_counts(result, ours, theirs)
    # the other side is what evaluating the other run on its own gives
    code, _, err = cli("eval", freeze.output_dir, "--data", small, "--out", root / "freeze-alone",
                       "--max-new-tokens", 6)
    assert code == 0, err
    alone = read_json(root / "freeze-alone" / "eval.json")["metrics"]
    assert [r["predict"] for r in theirs] == [r["predict"] for r in read_jsonl(root / "freeze-alone" / "eval_rows.jsonl")]
    for name in FIGURES:
        assert result["compare"]["metrics"][name] == pytest.approx(alone[name], rel=1e-6), name
    header = next(line for line in stdout.splitlines() if line.startswith("metric"))
    assert header.split()[:3] == ["metric", freeze.output_dir.name, lora.output_dir.name]


# --- 6. AdvertiseGen-style columns ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_advertisegen_columns(lora, tmp_path, suffix):
    rows = [{"content": "类型#裙*颜色#红色*风格#复古", "summary": "这条红色复古裙很好看。"},
            {"content": "类型#上衣*材质#棉", "summary": "纯棉上衣，穿着舒适。"},
            {"content": "类型#裤*版型#宽松", "summary": "宽松的裤子，很休闲。"}]
    path = tmp_path / f"adgen.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        write_jsonl(path, rows)
    code, _, err = cli("eval", lora.output_dir, "--data", path, "--columns", "prompt=content,response=summary",
                       "--max-new-tokens", 4)
    assert code == 0, err
    out_dir = lora.output_dir / "eval" / "adgen"
    result = read_json(out_dir / "eval.json")
    assert (result["data"]["rows"], result["data"]["scored"], result["data"]["no_reference"]) == (3, 3, 0)
    assert [p["label"] for p in read_jsonl(out_dir / "generated_predictions.jsonl")] == [r["summary"] for r in rows]
    check_figures(read_jsonl(out_dir / "eval_rows.jsonl"), result["metrics"])


# --- 7. bad input -------------------------------------------------------------------------------------------


def test_rows_without_a_reference_are_answered_but_not_scored(lora, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Who are you?"},
                          {"role": "assistant", "content": "I am Lumi, an assistant trained with chattune."}]},
            {"messages": [{"role": "user", "content": "What is your name?"}]},
            {"conversations": [{"from": "human", "value": "Who made you?"}]},
            {"instruction": "", "input": "", "output": "bad row: empty instruction"},
            {"messages": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Lumi。"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, stdout, err = cli("eval", lora.output_dir, "--data", path, "--out", tmp_path / "out")
    assert code == 0, err
    result = read_json(tmp_path / "out" / "eval.json")
    assert result["data"]["rows"] == 5
    assert (result["data"]["scored"], result["data"]["no_reference"], result["data"]["unreadable"]) == (2, 2, 1)
    assert "empty user message" in result["data"]["unreadable_reasons"][0]
    predictions = read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == ["I am Lumi, an assistant trained with chattune.", "我是Lumi。"]
    eval_rows = read_jsonl(tmp_path / "out" / "eval_rows.jsonl")
    assert [r["no_reference"] for r in eval_rows] == [False, True, True, False]
    assert [r["index"] for r in eval_rows] == [0, 1, 2, 4]
    assert all(r["scores"] is None and r["label"] is None for r in eval_rows if r["no_reference"])
    scored = [r for r in eval_rows if not r["no_reference"]]
    for name in SCORES:  # the averages are over the scored rows only
        assert result["metrics"][name] == pytest.approx(sum(r["scores"][name] for r in scored) / 2)
    assert result["metrics"]["answer_length"] == pytest.approx(sum(r["tokens"] for r in eval_rows) / 4)
    assert "5 rows: 2 scored, 2 without a reference, 1 unreadable" in stdout
    assert (f'2 rows without a reference: answered in {tmp_path / "out"}/eval_rows.jsonl ("no_reference": true), '
            "not scored and not in generated_predictions.jsonl") in stdout


def test_the_predictions_file_recomputed_gives_predict_results_with_blank_rows(tiny_models, data_file, tmp_path):
    """As LLaMA-Factory users do: ROUGE/BLEU recomputed from generated_predictions.jsonl with
    chattune's metric functions are predict_results.json's figures, with every third row blank
    (the tiny base model, whose answers score above zero on some rows)."""
    rows = data_rows(data_file)
    for row in rows[1::3]:
        row["output"] = ""
    blank = len(rows[1::3])
    path = tmp_path / "blank.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    code, stdout, err = cli("eval", tiny_models("glm4"), "--data", path, "--out", tmp_path / "out")
    assert code == 0, err
    predictions = read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [r["output"] for r in rows if r["output"]]
    assert len(predictions) == len(rows) - blank
    recomputed = average([similarity(p["predict"], p["label"]) for p in predictions])
    assert recomputed["bleu-4"] > 0  # real figures: a blank row left in would lower them
    results = read_json(tmp_path / "out" / "predict_results.json")
    assert {f"predict_{name}": value for name, value in recomputed.items()} == \
        {key: value for key, value in results.items() if key.removeprefix("predict_") in METRIC_NAMES}
    eval_rows = read_jsonl(tmp_path / "out" / "eval_rows.jsonl")
    assert [r["index"] for r in eval_rows if r["no_reference"]] == list(range(1, len(rows), 3))
    assert f"{len(rows)} rows: {len(rows) - blank} scored, {blank} without a reference" in stdout
    assert f"{blank} rows without a reference: answered in" in stdout


def test_an_empty_reference_is_no_reference(lora_loaded, tmp_path):
    path = tmp_path / "empty-output.json"
    path.write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": ""},
                                {"instruction": "What is your name?", "input": "", "output": "My name is Lumi."}]))
    result, rows = ev.evaluate(lora_loaded, ev.read_eval_data(str(path)), log=quiet, max_new_tokens=2)
    assert rows[0].scores is None
    assert (result["data"]["scored"], result["data"]["no_reference"]) == (1, 1)


def test_a_column_map_without_response_gives_rows_without_a_reference(lora, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"content": "类型#裙*颜色#红色"}, {"content": "类型#上衣"}])
    code, _, err = cli("eval", lora.output_dir, "--data", path, "--columns", "prompt=content",
                       "--out", tmp_path / "out", "--max-new-tokens", 2)
    assert code == 0, err
    result = read_json(tmp_path / "out" / "eval.json")
    assert (result["data"]["scored"], result["data"]["no_reference"]) == (0, 2)
    assert read_jsonl(tmp_path / "out" / "generated_predictions.jsonl") == []  # nothing scored
    assert len(read_jsonl(tmp_path / "out" / "eval_rows.jsonl")) == 2
    assert result["metrics"]["rouge-l"] is None and result["metrics"]["eval_loss"] is None


def test_only_rows_without_a_reference(lora_loaded, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Who are you?"}]}])
    result, rows = ev.evaluate(lora_loaded, ev.read_eval_data(str(path)), log=quiet, max_new_tokens=3)
    figures = result["metrics"]
    assert all(figures[name] is None for name in SCORES + ("eval_loss", "perplexity"))
    assert figures["eval_tokens"] == 0 and figures["answer_length"] == rows[0].tokens
    written = ev.write_eval(tmp_path / "out", result, rows)
    assert set(read_json(written / "predict_results.json")) == {"predict_runtime", "predict_samples_per_second"}
    text = ev.format_eval(result)
    assert "1 rows: 0 scored, 1 without a reference" in text
    assert next(line for line in text.splitlines() if line.startswith("rouge-l")).split()[1] == "-"


@pytest.mark.parametrize("name,text", [("empty.json", "[]"), ("empty.jsonl", ""),
                                       ("unusable.json", json.dumps([{"instruction": "", "output": "x"},
                                                                     {"foo": "bar"}]))])
def test_nothing_to_evaluate_is_a_one_line_error(lora, tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert main(["eval", str(lora.output_dir), "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chattune: error:") and err.count("\n") == 1
    assert str(path) in err and "nothing to evaluate" in err
    if name == "unusable.json":
        assert "2 rows, none readable" in err and "empty user message" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_data_file_is_an_error(lora, tmp_path, capsys):
    assert main(["eval", str(lora.output_dir), "--data", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chattune: error:") and "nope.json" in err


def test_limit(lora, data_file, tmp_path, capsys):
    code, _, err = cli("eval", lora.output_dir, "--data", data_file, "--limit", 3, "--out", tmp_path / "out")
    assert code == 0, err
    result = read_json(tmp_path / "out" / "eval.json")
    assert (result["data"]["rows"], result["data"]["scored"]) == (3, 3)
    assert len(read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")) == 3
    assert [r["index"] for r in read_jsonl(tmp_path / "out" / "eval_rows.jsonl")] == [0, 1, 2]
    assert main(["eval", str(lora.output_dir), "--data", str(data_file), "--limit", "0"]) == 2
    assert capsys.readouterr().err.startswith("chattune: error: --limit: must be >= 1")


def test_a_changed_base_model_stops_the_eval_unless_forced(lora, data_file, tiny_models, tmp_path, capsys):
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_models("glm4"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    argv = ["eval", str(lora.output_dir), "--data", str(data_file), "--base-model", str(copy), "--limit", "2",
            "--out", str(tmp_path / "out"), "--max-new-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("chattune: error: base model config at ")
    assert "differs from the one the adapter was trained on" in err and "--force" in err
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: base model config at " in captured.err
    assert read_json(tmp_path / "out" / "eval.json")["data"]["scored"] == 2


def test_bad_generation_flags_are_errors(lora, data_file, capsys):
    assert main(["eval", str(lora.output_dir), "--data", str(data_file), "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("chattune: error: --max-new-tokens: must be >= 1")


def test_generation_settings_are_greedy_unless_asked():
    assert ev.generation_settings() == {"do_sample": False}
    assert ev.generation_settings(max_new_tokens=5, top_p=None) == {"max_new_tokens": 5, "do_sample": False}
    assert ev.generation_settings(temperature=0.7, seed=3) == {"temperature": 0.7, "seed": 3}
    assert ev.generation_settings(do_sample=True) == {"do_sample": True}


def test_compare_base_on_a_bare_model_is_an_error(tiny_models):
    bare = load_run(str(tiny_models("glm4")))
    with pytest.raises(ConfigError, match="bare model"):
        ev.load_compare(bare, "base", warn=quiet)


# --- 8. eval_generate during training --------------------------------------------------------------------------


def test_eval_generate_logs_generation_metrics_at_each_evaluation(lora):
    entries = [r for r in read_jsonl(lora.output_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in entries] == [4, 8, 12]
    for entry in entries:
        for name in ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4", "eval_exact_match",
                     "eval_answer_length"):
            assert isinstance(entry[name], float), (name, entry)
        assert 0 < entry["eval_answer_length"] <= RUN_MAX_NEW_TOKENS
    train_entries = [r for r in read_jsonl(lora.output_dir / "metrics.jsonl") if "loss" in r]
    assert train_entries and not any("eval_rouge-l" in r for r in train_entries)


def test_eval_generate_figures_are_the_final_model_s(lora, lora_loaded):
    """Recomputed on the reloaded run, the step-12 figures come out the same."""
    samples = ev.sample_rows(lora.prepared.eval, 4, SEED)
    figures = ev.generation_metrics(lora_loaded.model, lora_loaded.tokenizer, "tokenizer", samples,
                                    max_new_tokens=RUN_MAX_NEW_TOKENS)
    logged = [r for r in read_jsonl(lora.output_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    for name, value in figures.items():
        assert logged[f"eval_{name}"] == pytest.approx(value, abs=1e-4), name


def test_the_generation_sample_is_fixed_and_spans_prompt_then_reference(lora, lora_loaded, data_file):
    dataset = lora.prepared.eval
    first = ev.sample_rows(dataset, 4, SEED)
    assert first == ev.sample_rows(dataset, 4, SEED)
    assert len(first) == 4
    references = {r.messages[-1]["content"] for r in eval_split(data_file)}
    stops = lora_loaded.profile().stop_token_ids
    rows = [list(ids) for ids in dataset["input_ids"]]
    for prompt, reference in first:
        assert prompt and reference
        assert any(ids[:len(prompt) + len(reference)] == prompt + reference for ids in rows)
        text = lora_loaded.decode([i for i in reference if i not in stops]).strip()
        assert text in references
    everything = ev.sample_rows(dataset, 100, SEED)
    assert len(everything) == len(dataset) and everything[:4] == first


def test_sample_rows_takes_the_last_supervised_span():
    dataset = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},  # supervised from the start: left out
               {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
               {"input_ids": [9, 10, 11, 12, 13, 14], "labels": [-100, 10, -100, -100, 13, 14]}]
    samples = ev.sample_rows(dataset, 5, seed=0)
    assert sorted(samples) == [([5, 6], [7, 8]), ([9, 10, 11, 12], [13, 14])]
    assert ev.sample_rows(dataset, 1, seed=0) == samples[:1]
    assert ev.sample_rows(dataset, 5, seed=0) == samples


def test_eval_generate_samples_must_be_positive(tiny_models, data_file, tmp_path):
    with pytest.raises(ConfigError, match="eval_generate_samples"):
        make_config(tiny_models("glm4"), data_file, tmp_path / "x", eval_generate="true", eval_generate_samples=0)
    with pytest.raises(ConfigError, match="eval_generate_max_new_tokens"):
        make_config(tiny_models("glm4"), data_file, tmp_path / "x", eval_generate_max_new_tokens=0)


def test_eval_generate_without_eval_rows_says_so(tiny_models, data_file, tmp_path):
    from chattune.training.recipe import generation_eval

    config = load_config(None, [f"model_name_or_path={tiny_models('glm4')}", f"train_files={json.dumps([str(data_file)])}",
                                "eval_generate=true"])
    logged = []
    prepared = type("Prepared", (), {"eval": None})()
    assert generation_eval(config, prepared, None, "tokenizer", log=logged.append) is None
    assert logged and "eval_generate" in logged[0]
    config = load_config(None, [f"model_name_or_path={tiny_models('glm4')}", f"train_files={json.dumps([str(data_file)])}"])
    assert generation_eval(config, prepared, None, "tokenizer", log=logged.append) is None


# --- 9. the table ------------------------------------------------------------------------------------------------


def test_format_eval_names_every_figure_with_its_number(lora_eval, lora):
    out_dir, stdout = lora_eval
    result = read_json(out_dir / "eval.json")
    text = ev.format_eval(result)
    assert text in stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"{result['data']['rows']} rows: {result['data']['scored']} scored, 0 without")
    assert lines[1].split() == ["metric", lora.output_dir.name]
    for name in ev.FIGURES:
        line = next(line for line in lines if line.split()[0] == name)
        value = result["metrics"][name]
        assert line.split()[1] == (f"{value:.4f}" if isinstance(value, float) else str(value))


def test_format_eval_with_a_comparison():
    def row(index, predict, other, delta):
        return {"index": index, "prompt": "p", "label": "the label", "predict": predict, "other": other,
                "delta": delta, "metric": "rouge-l"}

    figures = {"rouge-1": 50.0, "rouge-2": 25.0, "rouge-l": 40.0, "bleu-4": 12.3456, "exact_match": 0.0,
               "answer_length": 7.5, "eval_loss": 1.25, "perplexity": math.exp(1.25), "eval_tokens": 40}
    theirs = {**figures, "rouge-l": 10.0, "eval_loss": 2.5, "perplexity": math.exp(2.5)}
    counts = {m: 0 for m in SCORES}
    result = {"run": {"name": "mine"}, "metrics": figures, "runtime_s": 1.5, "samples_per_second": 2.0,
              "data": {"rows": 3, "scored": 3, "no_reference": 0, "unreadable": 0},
              "compare": {"name": "base", "metrics": theirs, "better": {**counts, "rouge-l": 2},
                          "worse": {**counts, "rouge-l": 1}, "same": {**counts, "rouge-1": 3},
                          "changed_most": [row(2, "new answer", "old answer", 0.5)]}}
    text = ev.format_eval(result)
    lines = text.splitlines()
    assert lines[0] == "3 rows: 3 scored, 0 without a reference; 1.5 s (2.0 rows/s)"
    assert lines[1].split()[:3] == ["metric", "base", "mine"]
    rouge_l = next(line for line in lines if line.startswith("rouge-l"))
    assert rouge_l.split() == ["rouge-l", "10.0000", "40.0000", "2", "/", "1", "/", "0"]
    assert next(line for line in lines if line.startswith("rouge-1")).split()[-1] == "3"
    assert next(line for line in lines if line.startswith("eval_loss")).split() == ["eval_loss", "2.5000", "1.2500"]
    assert "bleu-4" in text and "12.3456" in text
    assert "rows whose ROUGE-L changed most (base -> mine):" in text
    assert "#2 +0.50" in text and "base: 'old answer'" in text and "mine: 'new answer'" in text


def test_compare_counts_and_orders_the_changed_rows():
    def result(index, predict, reference):
        example = ev.EvalExample(index, f"f#{index}", [{"role": "user", "content": "q"}], reference)
        scores = None if reference is None else {**similarity(predict, reference),
                                                 "exact_match": exact_match(predict, reference)}
        return ev.RowResult(example, "q", predict, 1, scores)

    refs = ["the red dress", "a blue shirt", "green trousers", None, "the red dress", "wool hat", "socks"]
    ours = [result(i, p, r) for i, (p, r) in enumerate(zip(
        ["the red dress", "a blue", "nothing", "x", "red", "wool hat", "socks"], refs, strict=True))]
    theirs = [result(i, p, r) for i, (p, r) in enumerate(zip(
        ["red", "a blue shirt", "green trousers", "y", "red", "hat", "socks"], refs, strict=True))]
    summary = ev.compare(ours, theirs, "base", {"rouge-l": 1.0}, most=3)
    for metric in SCORES:
        assert summary["better"][metric] + summary["worse"][metric] + summary["same"][metric] == 6
    assert (summary["better"]["exact_match"], summary["worse"]["exact_match"], summary["same"]["exact_match"]) == \
        (2, 2, 2)
    deltas = [row["delta"] for row in summary["changed_most"]]
    assert len(deltas) == 3 and [abs(d) for d in deltas] == sorted((abs(d) for d in deltas), reverse=True)
    assert 3 not in [row["index"] for row in summary["changed_most"]]
    assert summary["metrics"] == {"rouge-l": 1.0}


# --- 8. tool calls ---------------------------------------------------------------------------------------------


def scripted_eval(monkeypatch) -> list:
    """``chattune eval`` answers with test_predict's handcrafted answers (the compared ``base``:
    "I do not know." to everything); returns the (question, tools) each prompt was given."""
    from tests.test_predict import scripted_answers

    seen = []
    scripted_answers(monkeypatch, ev, seen, base_says="I do not know.")
    return seen


def call_text(call: dict) -> str:
    """A call as the default template writes it."""
    return f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>"


def test_eval_scores_calls_on_handcrafted_answers(lora, tmp_path, monkeypatch):
    from tests.test_predict import ANSWER, CALL_ROWS, TOOLS, tool_rows

    seen = scripted_eval(monkeypatch)
    path = write_jsonl(tmp_path / "tools.jsonl", tool_rows())
    code, stdout, err = cli("eval", lora.output_dir, "--template", "default", "--data", path, "--compare", "base",
                            "--out", tmp_path / "out")
    assert code == 0, err
    functions = [tool["function"] for tool in TOOLS]
    assert [tools for _, tools in seen[:len(CALL_ROWS) + 2]] == [functions] * (len(CALL_ROWS) + 1) + [None]

    result = read_json(tmp_path / "out" / "eval.json")
    figures = result["metrics"]
    assert figures["tool_name_match"] == 62.5 and figures["tool_args_match"] == 25.0  # 5 and 2 of 8 call rows
    assert (result["data"]["rows"], result["data"]["scored"], result["data"]["call_references"]) == (10, 10, 8)
    rows = read_jsonl(tmp_path / "out" / "eval_rows.jsonl")
    for row, (question, call, text, name_ok, args_ok) in zip(rows, CALL_ROWS, strict=False):
        assert row["label"] == call_text(call) and row["predict"] == text  # the call as the template writes it
        assert row["reference_calls"] == [call] and question in row["prompt"]
        assert 'Tools: [{"name": "get_weather"' in row["prompt"]  # the record's tools are in the prompt
        assert row["scores"] == {**similarity(text, row["label"]), "exact_match": exact_match(text, row["label"]),
                                 "tool_name_match": 100.0 * name_ok, "tool_args_match": 100.0 * args_ok}
    assert rows[0]["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert rows[0]["scores"]["exact_match"] == 0.0  # the text differs (key order); the call does not
    answered, plain = rows[len(CALL_ROWS)], rows[-1]
    assert answered["label"] == ANSWER and answered["calls"] == [] and answered["reference_calls"] is None
    assert set(answered["scores"]) == set(SCORES) and answered["scores"]["exact_match"] == 100.0
    assert set(plain) == ROW_KEYS and plain["label"] == "I am Lumi."
    for name in SCORES:  # the text figures average every scored row, calls included
        assert figures[name] == pytest.approx(sum(r["scores"][name] for r in rows) / len(rows))

    predict_results = read_json(tmp_path / "out" / "predict_results.json")
    assert predict_results["predict_tool_name_match"] == 62.5 and predict_results["predict_tool_args_match"] == 25.0
    assert [p["label"] for p in read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")][:2] == \
        [call_text(CALL_ROWS[0][1]), call_text(CALL_ROWS[1][1])]

    other = result["compare"]
    assert other["metrics"]["tool_name_match"] == 0.0 and other["metrics"]["tool_args_match"] == 0.0
    assert (other["better"]["tool_name_match"], other["worse"]["tool_name_match"],
            other["same"]["tool_name_match"]) == (5, 0, 3)
    assert (other["better"]["tool_args_match"], other["same"]["tool_args_match"]) == (2, 6)
    assert "10 rows: 10 scored, 0 without a reference, 8 with a call as reference" in stdout
    line = next(line for line in stdout.splitlines() if line.startswith("tool_name_match"))
    assert line.split() == ["tool_name_match", "0.0000", "62.5000", "5", "/", "0", "/", "3"]


def test_the_loss_of_a_call_reference_covers_the_call(lora_loaded, tmp_path):
    from chattune.data.encode import EncodeOptions, encode_conversation
    from chattune.data.formats import read_rows, to_record
    from tests.test_predict import tool_rows

    path = write_jsonl(tmp_path / "tools.jsonl", tool_rows())
    run = dataclasses.replace(lora_loaded, profiles={
        "default": dataclasses.replace(lora_loaded.profile(), name="default", template="default")},
        default="default")
    data = ev.read_eval_data(str(path))
    loss, tokens = ev.reference_loss(run, run.profile(), data, max_seq_length=1024)
    expected = 0
    for raw in read_rows(path):
        record = to_record(raw, "auto")
        row = encode_conversation(record.messages, "default", run.encoder, EncodeOptions(max_seq_length=1024),
                                  tools=record.tools)
        assert row.dropped is None
        expected += sum(label != -100 for label in row.labels[1:])
    assert tokens == expected and loss is not None and math.isfinite(loss)


def test_call_scores_compare_arguments_as_json():
    from chattune.evaluation.metrics import call_scores, same_json

    assert same_json({"a": 1, "b": [1, {"c": 2.0}]}, {"b": [1.0, {"c": 2}], "a": 1.0})
    assert not same_json({"a": True}, {"a": 1}) and not same_json({"a": "1"}, {"a": 1})
    assert not same_json({"a": 1}, {"a": 1, "b": None}) and not same_json([1, 2], [2, 1])
    paris, rome = {"name": "w", "arguments": {"city": "Paris"}}, {"name": "w", "arguments": {"city": "Rome"}}
    both = {"tool_name_match": 100.0, "tool_args_match": 100.0}
    assert call_scores([rome, paris], [paris, rome]) == both  # parallel calls in any order
    assert call_scores([paris, paris], [paris, rome]) == {"tool_name_match": 100.0, "tool_args_match": 0.0}
    assert call_scores([paris], [paris, rome]) == {"tool_name_match": 0.0, "tool_args_match": 0.0}
    assert call_scores(None, [paris]) == call_scores([], [paris]) == {"tool_name_match": 0.0, "tool_args_match": 0.0}
    assert call_scores([{"name": "w", "arguments": '{"city": "Paris"}'}], [paris])["tool_args_match"] == 0.0


def test_reference_loss_is_the_training_loss_on_the_same_rows(lora_loaded, data_file):
    """One scoring path: the references batched by training's collator and scored by training's
    (chunked) loss give what training's loss gives on those rows in one padded batch."""
    from chattune.training.collate import PadCollator
    from chattune.training.loss import CausalLMLoss, auto_loss

    run = lora_loaded
    served = run.profile()
    data = ev.read_eval_data(str(data_file))
    rows = ev.reference_rows(run, served, data, max_seq_length=96)
    batch = PadCollator(run.tokenizer.pad_token_id)(rows)
    training = CausalLMLoss()
    with torch.no_grad():
        outputs = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        mean = float(training(outputs, batch["labels"]))
    assert auto_loss(run.model, run.model.get_input_embeddings().weight.shape[0])[0].mode == "chunked"
    for batch_size in (1, 4, len(rows)):
        loss, tokens = ev.reference_loss(run, served, data, max_seq_length=96, batch_size=batch_size)
        assert tokens == training.eval_count
        assert loss == pytest.approx(mean, abs=1e-5)


def test_the_default_out_dir_of_a_model_file_is_beside_it(tmp_path):
    """``chattune eval model.gguf``: a GGUF file is a model path, and its results go beside it."""
    model = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    assert ev.default_out_dir(model, "data/q.json") == tmp_path / "SmolLM2-135M-Instruct.Q4_1-eval" / "q"
    assert ev.default_out_dir(tmp_path, "data/q.json") == tmp_path / "eval" / "q"


@pytest.mark.parametrize(("out", "message"), [
    ("/proc/x", "--out: cannot write /proc/x ("),
    ("afile/x", "--out: {t}/afile/x: {t}/afile is a file, not a folder"),
    ("afile", "--out: {t}/afile is a file; expected a folder"),
])
def test_an_unwritable_out_is_refused_before_the_run_loads(out, message, data_file, tmp_path, capsys,
                                                           monkeypatch):
    import chattune.cli

    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    (tmp_path / "afile").write_text("x")

    def no_loading(args):
        raise AssertionError("the run was loaded")

    monkeypatch.setattr(chattune.cli, "_load_run", no_loading)
    target = out if out.startswith("/") else str(tmp_path / out)
    assert main(["eval", "never-loaded", "--data", str(data_file), "--out", target]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("chattune: error: " + message.format(t=tmp_path)), err


def test_a_failed_write_of_the_eval_files_names_the_folder_and_leaves_no_eval_json(tmp_path, monkeypatch):
    import errno

    from chattune.evaluation import evaluate as ev

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev, "_write_rows", disk_full)
    result = {"metrics": {}, "runtime_s": 1.0, "samples_per_second": 1.0}
    with pytest.raises(ConfigError, match=r"^--out .*out: cannot write the eval files \(No space left on device\)"):
        ev.write_eval(tmp_path / "out", result, [])
    assert not (tmp_path / "out" / "eval.json").exists()
