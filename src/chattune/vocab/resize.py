"""Embedding rows for new tokens: the model resized to its tokenizer, each new row the mean of
the rows of the pieces the base tokenizer split the token into.

A new token's row starts where the model already is: its input embedding is the mean of its
pieces' input embeddings, and (for an untied output layer) its output row the mean of their
output rows, so the extended model's first logits stay close to the base's. Random rows (or
the global mean) would start every new token as noise the training must first undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chattune.errors import ConfigError
from chattune.vocab.extend import read_extension


@dataclass
class NewRows:
    """New token ids and, per id, the base token ids whose rows it starts from."""

    ids: list[int]
    pieces: list[list[int]]


def new_token_rows(tokenizer, base_tokenizer, tokenizer_dir: str | None = None) -> NewRows:
    """The ids ``tokenizer`` has beyond ``base_tokenizer`` and their base pieces: from the
    extension record beside the tokenizer (:data:`chattune.vocab.extend.EXTENSION_NAME`) where it
    is, else by encoding each new token's text with the base tokenizer."""
    record = read_extension(tokenizer_dir) if tokenizer_dir else None
    if record is not None:
        return _recorded_rows(record)
    ids = list(range(len(base_tokenizer), len(tokenizer)))
    return NewRows(ids, [_base_pieces(tokenizer, base_tokenizer, token_id) for token_id in ids])


def _base_pieces(tokenizer, base_tokenizer, token_id: int) -> list[int]:
    """The base ids a new token stands for: its spelling split by the base's own tokenizer
    model (byte-level pieces of a partial character stay bytes), else its text encoded."""
    spelling = tokenizer.convert_ids_to_tokens(token_id)
    backend = getattr(base_tokenizer, "backend_tokenizer", None)
    if backend is not None and spelling:
        try:
            split = [t.id for t in backend.model.tokenize(spelling)]
        except Exception:  # a model without ``tokenize``, or a spelling it cannot take
            split = []
        if split:
            return split
    text = tokenizer.decode([token_id])
    split = base_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return split or [base_tokenizer.unk_token_id or 0]


def _recorded_rows(record: dict) -> NewRows:
    return NewRows([e["id"] for e in record["new_tokens"]], [e["base_ids"] for e in record["new_tokens"]])


def output_is_tied(model) -> bool:
    """Whether the output layer shares its weight with the input embedding."""
    output = model.get_output_embeddings()
    return output is None or output.weight is model.get_input_embeddings().weight


def add_rows(model, new: NewRows) -> dict:
    """Resize ``model``'s embeddings (and untied output layer) to hold every new id and set each
    new row to the mean of its pieces' rows; what was done, for the manifest."""
    embedding = model.get_input_embeddings()
    before = embedding.weight.shape[0]
    needed = max(new.ids) + 1
    too_large = [p for pieces in new.pieces for p in pieces if p >= before]
    if too_large:
        raise ConfigError(f"tokenizer: new tokens are made of ids the model has no rows for (e.g. {too_large[0]}, "
                          f"the model has {before}); expected a tokenizer extended from this model's own")
    if needed > before:
        model.resize_token_embeddings(needed, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    if not output_is_tied(model):
        weights.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in weights:
            for token_id, pieces in zip(new.ids, new.pieces, strict=True):
                weight[token_id] = weight[pieces].float().mean(0).to(weight.dtype)
    return {"base_rows": before, "rows": model.get_input_embeddings().weight.shape[0], "new_tokens": len(new.ids),
            "first_new_id": min(new.ids), "tied_output": output_is_tied(model),
            "init": "mean of the rows of the base pieces"}


def fit_to_tokenizer(model, tokenizer, base_tokenizer, tokenizer_dir: str | Path | None = None) -> dict | None:
    """Give ``model`` rows for every token ``tokenizer`` has beyond ``base_tokenizer`` (see
    :func:`add_rows`); None (nothing done) when it has none."""
    if len(tokenizer) <= len(base_tokenizer):
        return None
    return add_rows(model, new_token_rows(tokenizer, base_tokenizer, str(tokenizer_dir) if tokenizer_dir else None))


def resize_like_run(model, vocabulary: dict | None, run_dir: str | Path | None = None) -> None:
    """Give a freshly loaded base model the rows a run trained with (its manifest's
    ``vocabulary`` record), before the run's trained weights are loaded onto it. Where the run
    folder keeps the extension record, the new rows start as in training (the mean of their
    pieces), so that the model with the run's adapter switched off is the extended model before
    training (``chattune eval --compare base``)."""
    if not vocabulary or model.get_input_embeddings().weight.shape[0] >= vocabulary["rows"]:
        return
    record = read_extension(run_dir) if run_dir else None
    if record is not None:
        add_rows(model, _recorded_rows(record))
    if model.get_input_embeddings().weight.shape[0] < vocabulary["rows"]:
        model.resize_token_embeddings(vocabulary["rows"], mean_resizing=False)
