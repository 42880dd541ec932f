"""Embedding rows for new tokens (chattune.vocab.resize): the model grows to the extended
tokenizer, each new row is the mean of its base pieces' rows (input, and output when untied),
old rows stay bit for bit, a tied output layer stays tied; the ids and pieces come from the
extension record or, without it, from the base tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch

from chattune.errors import ConfigError
from chattune.vocab.extend import EXTENSION_NAME, learn_extension, read_extension, save_extended
from chattune.vocab.resize import (
    NewRows,
    add_rows,
    fit_to_tokenizer,
    new_token_rows,
    output_is_tied,
    resize_like_run,
)


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def base(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def extended(base, zh_train, tmp_path_factory):
    """(extended tokenizer, its folder with the extension record), 40 new tokens."""
    folder = tmp_path_factory.mktemp("extended")
    tokenizer = save_extended(base, learn_extension(base, zh_train, 40), folder, {})
    return tokenizer, folder


def untied_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not output_is_tied(model)
    return model


def tied_model(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert output_is_tied(model)
    return model


def test_new_token_rows_from_the_record(base, extended):
    tokenizer, folder = extended
    rows = new_token_rows(tokenizer, base, str(folder))
    record = read_extension(folder)
    assert rows.ids == [e["id"] for e in record["new_tokens"]] == list(range(len(base), len(tokenizer)))
    assert rows.pieces == [e["base_ids"] for e in record["new_tokens"]]


def test_add_rows_untied(model_dir, base, extended):
    tokenizer, folder = extended
    model = untied_model(model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert old_in.shape[0] == len(base)
    rows = new_token_rows(tokenizer, base, str(folder))

    result = add_rows(model, rows)

    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape == (len(tokenizer), old_in.shape[1])
    assert new_out.shape == (len(tokenizer), old_out.shape[1])
    assert torch.equal(new_in[:len(base)], old_in)
    assert torch.equal(new_out[:len(base)], old_out)
    for token_id, pieces in zip(rows.ids, rows.pieces, strict=True):
        assert torch.allclose(new_in[token_id], old_in[pieces].mean(0)), token_id
        assert torch.allclose(new_out[token_id], old_out[pieces].mean(0)), token_id
    assert not output_is_tied(model)
    assert result["base_rows"] == len(base)
    assert result["rows"] == len(tokenizer)
    assert result["new_tokens"] == len(tokenizer) - len(base)
    assert result["first_new_id"] == len(base)
    assert result["tied_output"] is False
    assert "mean" in result["init"]


def test_resized_model_runs_on_extended_ids(model_dir, base, extended, zh_held):
    tokenizer, folder = extended
    model = untied_model(model_dir)
    add_rows(model, new_token_rows(tokenizer, base, str(folder)))
    input_ids = torch.tensor([tokenizer(zh_held[0], add_special_tokens=False)["input_ids"][:32]])
    assert input_ids.max() >= len(base)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()


def test_add_rows_tied(model_dir, base, extended):
    tokenizer, folder = extended
    model = tied_model(model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    rows = new_token_rows(tokenizer, base, str(folder))

    result = add_rows(model, rows)

    weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    assert output is weight or output.data_ptr() == weight.data_ptr()
    assert weight.shape[0] == len(tokenizer)
    assert torch.equal(weight[:len(base)], old)
    for token_id, pieces in zip(rows.ids, rows.pieces, strict=True):
        assert torch.allclose(weight[token_id], old[pieces].mean(0)), token_id
    assert result["tied_output"] is True
    assert result["rows"] == len(tokenizer)


def test_new_token_rows_without_the_record(base, extended, tmp_path):
    tokenizer, folder = extended
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / EXTENSION_NAME).unlink()
    for where in (str(bare), None):
        rows = new_token_rows(tokenizer, base, where)
        assert rows.ids == list(range(len(base), len(tokenizer)))
        assert len(rows.pieces) == len(rows.ids)
        assert all(p and all(0 <= i < len(base) for i in p) for p in rows.pieces)
    # a whole-character token: its pieces are the base's encoding of its text
    record = {e["id"]: e for e in read_extension(folder)["new_tokens"]}
    whole = [(i, p) for i, p in zip(rows.ids, rows.pieces, strict=True) if "\ufffd" not in record[i]["text"]]
    assert whole
    for token_id, pieces in whole:
        assert base.decode(pieces) == record[token_id]["text"]


def test_new_token_rows_without_the_record_spell_partial_characters(base, extended, tmp_path):
    tokenizer, folder = extended
    record = {e["id"]: e for e in read_extension(folder)["new_tokens"]}
    if not any("\ufffd" in e["text"] for e in record.values()):
        pytest.skip("no new token is part of a character")
    rows = new_token_rows(tokenizer, base, None)
    for token_id, pieces in zip(rows.ids, rows.pieces, strict=True):
        assert "".join(base.convert_ids_to_tokens(pieces)) == record[token_id]["token"], record[token_id]


def test_fit_to_tokenizer(model_dir, base, extended):
    tokenizer, folder = extended
    model = untied_model(model_dir)
    assert fit_to_tokenizer(model, base, base, folder) is None
    assert model.get_input_embeddings().weight.shape[0] == len(base)

    result = fit_to_tokenizer(model, tokenizer, base, folder)
    assert result is not None and result["rows"] == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)


def test_fit_to_tokenizer_not_larger_does_nothing(model_dir, base, extended):
    tokenizer, _ = extended
    model = untied_model(model_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    assert fit_to_tokenizer(model, base, tokenizer) is None  # the "extended" one is the smaller here
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_resize_like_run(model_dir, base):
    model = untied_model(model_dir)
    resize_like_run(model, {"rows": len(base) + 7})
    assert model.get_input_embeddings().weight.shape[0] == len(base) + 7
    assert model.get_output_embeddings().weight.shape[0] == len(base) + 7

    model = untied_model(model_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    for vocabulary in ({}, None, {"rows": len(base)}, {"rows": len(base) - 5}):
        resize_like_run(model, vocabulary)
        assert torch.equal(model.get_input_embeddings().weight, before), vocabulary


def test_add_rows_refuses_pieces_beyond_the_model(model_dir, base):
    model = untied_model(model_dir)
    rows = NewRows([len(base)], [[5, len(base) + 100]])
    with pytest.raises(ConfigError, match=rf"^tokenizer: .*{len(base) + 100}.*the model has {len(base)}"):
        add_rows(model, rows)
    assert model.get_input_embeddings().weight.shape[0] == len(base)  # nothing resized
