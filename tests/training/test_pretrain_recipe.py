"""Stage pretrain and new tokens end to end on a tiny model: an extended tokenizer's rows are
added (mean of their pieces), trained (peft's trainable tokens, or whole embeddings), kept in a
run folder that loads, predicts, exports and trains on (SFT) without extra keys; raw text is
packed into blocks of whole steps, every token supervised; a streamed corpus trains too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.data.pretrain import prepare_pretrain_data
from chattune.errors import ConfigError
from chattune.inference.runs import load_run
from chattune.manifest import read_manifest
from chattune.model import load_model, load_tokenizer
from chattune.training.batching import build_batches
from chattune.training.recipe import train
from chattune.vocab.extend import learn_extension, save_extended
from chattune.vocab.resize import add_rows, new_token_rows


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(data)], "stage": "pretrain",
        "max_seq_length": 64, "lora_rank": 4, "lora_dropout": 0.0, "output_dir": str(out),
        "per_device_train_batch_size": 2, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
        "learning_rate": 1e-2, "seed": 3, "report_to": ["none"],
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def chinese(shared_data, tmp_path_factory) -> Path:
    """300 Chinese documents (alpaca_zh_demo's instructions and answers) as JSON Lines."""
    rows = json.loads((shared_data / "alpaca_zh_demo.json").read_text())[:300]
    path = tmp_path_factory.mktemp("zh") / "zh.jsonl"
    path.write_text("".join(json.dumps({"text": r["instruction"] + "\n" + r["output"]}, ensure_ascii=False) + "\n"
                            for r in rows))
    return path


@pytest.fixture(scope="module")
def extended(tiny_models, chinese, tmp_path_factory) -> Path:
    """The tiny llama's tokenizer with up to 200 Chinese tokens."""
    base = load_tokenizer(str(tiny_models("llama")))
    texts = [json.loads(line)["text"] for line in chinese.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("tok") / "extended"
    save_extended(base, learn_extension(base, texts, 200), folder, {"base": "tiny llama"})
    return folder


@pytest.fixture(scope="module")
def pretrain_run(tiny_models, chinese, extended, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "run"
    config = make_config(tiny_models("llama"), chinese, out, tokenizer_name_or_path=str(extended),
                         eval_fraction=0.1, eval_steps=2)
    return train(config, log=_quiet)


def test_the_run_keeps_the_extended_tokenizer_and_says_how_rows_were_made(pretrain_run, extended, tiny_models):
    folder = pretrain_run.output_dir
    size = len(load_tokenizer(str(extended)))
    assert len(load_tokenizer(str(folder))) == size
    manifest = read_manifest(folder)
    base = len(load_tokenizer(str(tiny_models("llama"))))
    assert manifest.vocabulary["rows"] == size and manifest.vocabulary["base_rows"] == base
    assert manifest.vocabulary["new_tokens"] == size - base and manifest.vocabulary["trained"] == "rows"
    assert manifest.stage["name"] == "pretrain"
    # the base model's own tokenizer is recorded as the base's: the run loads without --force
    assert manifest.base_model.tokenizer_sha256 != manifest.vocabulary["tokenizer_sha256"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert any("trainable_tokens_delta" in name for name in tensors)
    assert not any(name.endswith("embed_tokens.weight") for name in tensors)  # rows only, not the matrix


def test_new_rows_start_as_the_mean_of_their_pieces_and_train(pretrain_run, extended, tiny_models):
    base_path = str(tiny_models("llama"))
    fresh = load_model(load_config(None, [f"model_name_or_path={base_path}"]).model)
    old_rows = fresh.get_input_embeddings().weight.detach().clone()
    rows = new_token_rows(load_tokenizer(str(extended)), load_tokenizer(base_path), str(extended))
    add_rows(fresh, rows)
    start = fresh.get_input_embeddings().weight.detach()
    first_id, pieces = rows.ids[0], rows.pieces[0]
    assert torch.allclose(start[first_id], old_rows[pieces].mean(0), atol=1e-6)

    loaded = load_run(str(pretrain_run.output_dir))
    probe = torch.tensor([[1, 2, *rows.ids[:6]]])
    with torch.no_grad(), loaded.model.disable_adapter():  # adapter off: the extended model as it started
        assert torch.allclose(loaded.model(input_ids=probe).logits, fresh(input_ids=probe).logits, atol=1e-5)
    model = loaded.model.merge_and_unload()
    trained = model.get_input_embeddings().weight.detach()
    assert trained.shape == start.shape
    assert torch.equal(trained[:len(old_rows)], old_rows)  # old rows untouched (rows mode)
    moved = (trained[rows.ids] - start[rows.ids]).abs().amax(dim=1)
    assert (moved > 1e-4).float().mean() > 0.5  # the new rows that occur in the text moved


def test_pretrain_rows_are_packed_into_blocks_with_every_token_but_a_rows_first_supervised(
        tiny_models, chinese, char_tokenizer):
    config = make_config(tiny_models("llama"), chinese, Path("unused"), per_device_train_batch_size=3,
                         max_seq_length=32)
    prepared = prepare_pretrain_data(config.data, char_tokenizer, 0)
    batches = build_batches("pack", prepared, config, char_tokenizer.pad_token_id, flatten=False)
    plan = batches.summary["train"]
    assert plan["bin_length"] == 32 and plan["steps"] == pytest.approx(plan["bins"] / 3, rel=0.05)
    step = batches.train[0]
    batch = batches.collator([step])
    rows = [row for bin_rows in step["bins"] for row in bin_rows]
    assert int((batch["labels"] != -100).sum()) == sum(len(r["input_ids"]) for r in rows) - len(rows)
    assert int((batch["position_ids"] == 0).sum()) >= len(rows)  # positions restart at every row


def test_the_audit_counts_blocks_and_padding(pretrain_run):
    audit = json.loads((pretrain_run.output_dir / "data_audit.json").read_text())
    train_audit = audit["train"]
    assert train_audit["supervised_tokens"] == train_audit["tokens"] and train_audit["documents"] > 200
    assert train_audit["blocks"] == audit["batching"]["train"]["bins"] and 0 <= train_audit["padding_share"] < 0.2


def test_predict_and_export_need_no_extra_keys(pretrain_run, extended, tmp_path):
    from chattune.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"instruction": "你好", "output": "你好"}, ensure_ascii=False) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(pretrain_run.output_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert "prediction" in json.loads(out.read_text().splitlines()[0])
    exported = tmp_path / "export"
    assert main(["export", str(pretrain_run.output_dir), "--out", str(exported)]) == 0
    size = len(load_tokenizer(str(extended)))
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == size
    assert len(load_tokenizer(str(exported))) == size
    check = json.loads((exported / "export_check.json").read_text())
    assert check["passed"] and check["max_logit_difference"] <= check["bound"]


def test_sft_continues_from_the_pretrain_run_with_its_tokenizer(pretrain_run, shared_data, tmp_path, extended):
    rows = json.loads((shared_data / "alpaca_zh_demo.json").read_text())[300:320]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows, ensure_ascii=False))
    result = train(make_config(pretrain_run.output_dir, data, tmp_path / "sft", stage="sft", max_steps=2,
                               max_seq_length=128), log=_quiet)
    manifest = read_manifest(result.output_dir)
    assert manifest.vocabulary["rows"] == len(load_tokenizer(str(extended)))
    adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"]  # the new rows go on training
    assert len(load_tokenizer(str(result.output_dir))) == manifest.vocabulary["rows"]


def test_whole_embeddings_train_when_asked(tiny_models, chinese, extended, tmp_path):
    result = train(make_config(tiny_models("llama"), chinese, tmp_path / "emb", tokenizer_name_or_path=str(extended),
                               new_tokens_train="embeddings", max_steps=1), log=_quiet)
    tensors = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("embed_tokens" in name for name in tensors) and any("lm_head" in name for name in tensors)
    assert read_manifest(result.output_dir).vocabulary["trained"] == "embeddings"
    assert load_run(str(result.output_dir)).model is not None


def test_streamed_corpus_trains_the_steps_asked(tiny_models, chinese, tmp_path):
    result = train(make_config(tiny_models("llama"), chinese, tmp_path / "stream", streaming=True, max_steps=3,
                               eval_files=[str(chinese)], eval_steps=3, save_steps=3), log=_quiet)
    assert result.global_step == 3 and result.eval_loss is not None
    audit = json.loads((result.output_dir / "data_audit.json").read_text())
    assert audit["streaming"] is True and audit["batching"]["mode"] == "stream"


def test_methods_that_cannot_train_new_rows_are_refused(tiny_models, chinese, extended, tmp_path):
    with pytest.raises(ConfigError, match="method: freeze cannot train the .* new tokens"):
        train(make_config(tiny_models("llama"), chinese, tmp_path / "f", tokenizer_name_or_path=str(extended),
                          method="freeze"), log=_quiet)


def test_a_tokenizer_smaller_than_the_base_is_refused(tiny_models, chinese, char_tokenizer, tmp_path):
    char_tokenizer.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(ConfigError, match="tokenizer_name_or_path: .* fewer than the base model's"):
        train(make_config(tiny_models("llama"), chinese, tmp_path / "s",
                          tokenizer_name_or_path=str(tmp_path / "small")), log=_quiet)


def test_the_recipe_examples_parse_and_plan(pretrain_run, extended, tiny_models, capsys):
    from chattune.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "chinese_llama"
    pretrain = load_config(example / "pretrain.yaml")
    assert (pretrain.preference.stage, pretrain.method.new_tokens_train) == ("pretrain", "rows")
    assert main(["train", str(example / "pretrain.yaml"), f"model_name_or_path={tiny_models('llama')}",
                 f"tokenizer_name_or_path={extended}", "--dry-run"]) == 0
    assert main(["train", str(example / "sft.yaml"), f"model_name_or_path={pretrain_run.output_dir}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    size = len(load_tokenizer(str(extended)))
    trained_rows = (size - len(load_tokenizer(str(tiny_models("llama"))))) * 64  # hidden size 64, untied: x2
    plans = [int(line.split(":")[1].split()[0].replace(",", "")) for line in out.splitlines()
             if line.startswith("method     lora")]
    assert len(plans) == 2 and all(p > 2 * trained_rows for p in plans)  # the new rows are counted
