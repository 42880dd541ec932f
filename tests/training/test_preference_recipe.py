"""Preference stages end to end on a tiny model: DPO, ORPO, SimPO and KTO train as stages of
``chattune train``, log their rewards, write run folders that load like any other, resume
exactly, start from an SFT run, and are scored by ``chattune eval RUN --data PAIRS``."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.errors import ConfigError
from chattune.training.recipe import train


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(data)], "eval_fraction": 0.2, "stage": "dpo",
        "max_seq_length": 128, "lora_rank": 8, "lora_dropout": 0.0, "output_dir": str(out),
        "per_device_train_batch_size": 4, "max_steps": 4, "save_steps": 2, "logging_steps": 1, "eval_steps": 2,
        "learning_rate": 5e-3, "seed": 3, "report_to": ["tensorboard"], "max_new_tokens": 8,
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory) -> Path:
    """The first 30 pairs of dpo_en_demo.json."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(json.loads((shared_data / "dpo_en_demo.json").read_text())[:30]))
    return path


@pytest.fixture(scope="module")
def labelled(shared_data, tmp_path_factory) -> Path:
    """The first 30 rows of kto_en_demo.json."""
    path = tmp_path_factory.mktemp("kto") / "kto.json"
    path.write_text(json.dumps(json.loads((shared_data / "kto_en_demo.json").read_text())[:30]))
    return path


@pytest.fixture(scope="module")
def dpo_run(tiny_models, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "out"
    return train(make_config(tiny_models("llama"), pairs, out), log=lambda *_: None)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_dpo_logs_rewards_and_starts_at_ln2(dpo_run):
    rows = _metrics(dpo_run.output_dir)
    train_rows = [r for r in rows if "loss" in r]
    # at the first step the new adapter is zero: the model is its reference, every margin 0
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train_rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert all(key in r for r in train_rows), key
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_rewards/accuracies" in r and "eval_rewards/margins" in r for r in evals)
    assert list((dpo_run.output_dir / "runs").rglob("events.out.tfevents*"))


def test_dpo_run_folder_records_the_stage_and_loads_like_any_run(dpo_run):
    from chattune.inference.runs import load_run

    manifest = json.loads((dpo_run.output_dir / "chattune.json").read_text())
    assert manifest["stage"] == {"name": "dpo", "pref_beta": 0.1, "pref_loss": "sigmoid", "pref_label_smoothing": 0.0,
                                 "pref_ftx": 0.0, "reference": "adapter_off"}
    assert manifest["method"]["name"] == "lora"
    audit = json.loads((dpo_run.output_dir / "data_audit.json").read_text())
    assert audit["stage"] == "dpo" and audit["train"]["rows_out"] >= 1
    run = load_run(str(dpo_run.output_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = run.model(input_ids=ids).logits
        with run.model.disable_adapter():
            base = run.model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)


def _objective_batch(tiny_models, pairs, packing: str):
    from chattune.data.pair_encode import prepare_preference_data
    from chattune.methods import get_method
    from chattune.model import load_tokenizer
    from chattune.training import recipe

    config = make_config(tiny_models("llama"), pairs, Path("unused"), packing=packing, eval_fraction=0.0)
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    prepared = prepare_preference_data(config.data, tokenizer, "tokenizer", "dpo", 3)
    torch.manual_seed(0)
    model, _ = recipe.load_for_training(config, get_method("lora"))
    return config, tokenizer, prepared, model


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_packed_and_padded_pairs_give_the_log_probs_of_separate_forwards(tiny_models, pairs, packing):
    config, tokenizer, prepared, model = _objective_batch(tiny_models, pairs, packing)
    rows = [prepared.train[i] for i in range(3)]
    with ExitStack() as patches:
        batches, objective = recipe_setup(config, model, prepared, tokenizer, patches)
        assert batches.mode == ("pairs packed" if packing == "pack" else "pairs padded")
        patches.enter_context(objective.capturing())
        model.eval()
        with torch.no_grad():
            logps, tokens = objective.log_probs(model, batches.collator(rows), objective.capture)
    expected = []
    model.eval()
    with torch.no_grad():
        for name in ("chosen", "rejected"):
            for row in rows:
                ids = torch.tensor([row["prompt_ids"] + row[f"{name}_ids"]])
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                start = len(row["prompt_ids"])
                targets = ids[0, start:]
                expected.append(float(log_probs[start - 1:].gather(1, targets[:, None]).sum()))
    assert logps.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert tokens.tolist() == [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]


def recipe_setup(config, model, prepared, tokenizer, patches, reference="adapter_off"):
    from chattune.training.recipe import setup_preference

    return setup_preference(config, model, prepared, tokenizer.pad_token_id, patches, reference,
                            log=lambda *_: None)


def test_precomputed_reference_equals_the_adapter_switched_off(tiny_models, pairs):
    from chattune.training.preference import precompute_reference

    config, tokenizer, prepared, model = _objective_batch(tiny_models, pairs, "pack")
    with ExitStack() as patches:
        batches, objective = recipe_setup(config, model, prepared, tokenizer, patches)
        patches.enter_context(objective.capturing())
        with_ref = precompute_reference(objective, model, prepared.train.select(range(4)), batches.collator, 2,
                                        log=lambda *_: None)
        rows = [with_ref[i] for i in range(4)]
        model.eval()
        switched_off = objective.reference_log_probs(model, batches.collator(rows))
    precomputed = [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
    assert switched_off.tolist() == pytest.approx(precomputed, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("stage,reference", [("orpo", None), ("simpo", None), ("kto", "adapter_off")])
def test_each_stage_trains_and_records_itself(tiny_models, pairs, labelled, tmp_path, stage, reference):
    data = labelled if stage == "kto" else pairs
    result = train(make_config(tiny_models("llama"), data, tmp_path / stage, stage=stage, max_steps=2,
                               save_steps=2, eval_steps=2), log=lambda *_: None)
    manifest = json.loads((result.output_dir / "chattune.json").read_text())
    assert manifest["stage"]["name"] == stage and manifest["stage"]["reference"] == reference
    rows = _metrics(result.output_dir)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("eval_rewards/chosen" in r for r in rows)
    if stage == "kto":
        assert any("kl" in r for r in rows)


def test_full_method_precomputes_its_reference_and_refuses_adapter_off(tiny_models, pairs, tmp_path):
    logged: list[str] = []
    result = train(make_config(tiny_models("llama"), pairs, tmp_path / "full", method="full", max_steps=2,
                               learning_rate=1e-4), log=logged.append)
    assert json.loads((result.output_dir / "chattune.json").read_text())["stage"]["reference"] == "precompute"
    assert any("precomputed" in line for line in logged)
    with pytest.raises(ConfigError, match="pref_reference: adapter_off is not possible"):
        train(make_config(tiny_models("llama"), pairs, tmp_path / "refused", method="full",
                          pref_reference="adapter_off"), log=lambda *_: None)


def test_resume_gives_the_uninterrupted_adapter(tiny_models, pairs, dpo_run, tmp_path):
    copy = tmp_path / "resumed"
    copy.mkdir()
    shutil.copytree(dpo_run.output_dir / "checkpoint-2", copy / "checkpoint-2")
    train(make_config(tiny_models("llama"), pairs, copy, resume_from_checkpoint="true"), log=lambda *_: None)
    resumed = load_file(copy / "adapter_model.safetensors")
    whole = load_file(dpo_run.output_dir / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-6)


def test_dpo_starts_from_an_sft_run_and_trains_its_adapter_further(tiny_models, pairs, data_file, tmp_path):
    sft = train(make_config(tiny_models("llama"), data_file, tmp_path / "sft", stage="sft", max_steps=2,
                            eval_fraction=0.0, lora_rank=4), log=lambda *_: None)
    logged: list[str] = []
    dpo = train(make_config(str(sft.output_dir), pairs, tmp_path / "dpo", max_steps=2, lora_rank=8),
                log=logged.append)
    assert any("starting from" in line for line in logged)
    manifest = json.loads((dpo.output_dir / "chattune.json").read_text())
    assert manifest["stage"]["reference"] == "precompute"
    assert manifest["stage"]["started_from"] == str(sft.output_dir)
    assert manifest["method"]["lora_rank"] == 4  # the SFT run's adapter, trained further
    assert manifest["base_model"]["path"] == str(Path(tiny_models("llama")).resolve())
    before = load_file(sft.output_dir / "adapter_model.safetensors")
    after = load_file(dpo.output_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_eval_scores_pairs_against_the_base(dpo_run, pairs, tmp_path, capsys):
    from chattune.cli import main

    out = tmp_path / "eval"
    assert main(["eval", str(dpo_run.output_dir), "--data", str(pairs), "--compare", "base", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reward accuracy (chosen > rejected)" in printed and "likelihood accuracy (summed)" in printed
    result = json.loads((out / "preference.json").read_text())
    rows = [json.loads(line) for line in (out / "preference_rows.jsonl").read_text().splitlines()]
    assert len(rows) == result["data"]["pairs"]
    margins = [r["reward_margin"] for r in rows]
    assert result["metrics"]["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    expected = [0.1 * ((r["logps_chosen"] - r["base_logps_chosen"]) - (r["logps_rejected"] - r["base_logps_rejected"]))
                for r in rows]
    assert margins == pytest.approx(expected, abs=1e-6)
    base_acc = sum(r["base_logps_chosen"] > r["base_logps_rejected"] for r in rows) / len(rows)
    assert result["base"]["likelihood_accuracy"] == pytest.approx(base_acc)


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tiny_models, pairs, tmp_path):
    whole = train(make_config(tiny_models("llama"), pairs, tmp_path / "whole", max_steps=1, eval_fraction=0.0,
                              packing="pad"), log=lambda *_: None)
    halves = train(make_config(tiny_models("llama"), pairs, tmp_path / "halves", max_steps=1, eval_fraction=0.0,
                               packing="pad", per_device_train_batch_size=2, gradient_accumulation_steps=2),
                   log=lambda *_: None)
    assert _metrics(halves.output_dir)[0]["loss"] == pytest.approx(_metrics(whole.output_dir)[0]["loss"], rel=1e-4)
    one = load_file(whole.output_dir / "adapter_model.safetensors")
    two = load_file(halves.output_dir / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-6)


def test_a_run_started_from_an_sft_run_uses_its_template_and_is_scored_against_it(tiny_models, pairs, data_file,
                                                                                  tmp_path, capsys):
    from chattune.cli import main

    sft = train(make_config(tiny_models("llama"), data_file, tmp_path / "sft", stage="sft", max_steps=2,
                            eval_fraction=0.0, template="alpaca"), log=lambda *_: None)
    logged: list[str] = []
    dpo = train(make_config(str(sft.output_dir), pairs, tmp_path / "dpo", max_steps=2, eval_fraction=0.0),
                log=logged.append)
    assert f"template: alpaca, as {sft.output_dir} trained with" in logged
    assert json.loads((dpo.output_dir / "chattune.json").read_text())["template"]["name"] == "alpaca"
    out = tmp_path / "eval"
    assert main(["eval", str(dpo.output_dir), "--data", str(pairs), "--out", str(out)]) == 0
    assert f"rewards against the SFT run {sft.output_dir}" in capsys.readouterr().out
    assert json.loads((out / "preference.json").read_text())["reference"] == f"the SFT run {sft.output_dir}"


def test_eval_on_pairs_refuses_to_compare_with_another_run(dpo_run, pairs, tmp_path, capsys):
    from chattune.cli import main

    assert main(["eval", str(dpo_run.output_dir), "--data", str(pairs), "--compare", str(tmp_path),
                 "--out", str(tmp_path / "e")]) == 2
    assert "--compare" in capsys.readouterr().err
