"""The ids a model can generate that its tokenizer cannot decode.

A model's output layer is often wider than its tokenizer: ChatGLM-6B has 130,528 logits for
fewer sentencepiece pieces, ChatGLM2/3 pad theirs to 65,024, many models round the
vocabulary up to a multiple of 64 or 128. An id past the tokenizer's pieces has no text:
decoding it raises or, worse, gives nothing, and the answer would be cut without a word.
The decoder never samples those ids (it sets the logits of
:attr:`chattune.inference.runs.LoadedRun.banned_ids` to -inf), and decoding one anyway raises
:class:`UndecodableToken`.
"""

from __future__ import annotations

from chattune.errors import ChattuneError


class UndecodableToken(ChattuneError):
    """Token ids were to be decoded that the tokenizer has no text for."""

    def __init__(self, ids: list[int], width: int, count: int):
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        super().__init__(f"the model generated token id{'s' if len(ids) > 1 else ''} {shown}, which its tokenizer "
                         f"cannot decode ({count} of the model's {width} logits have no token)")
        self.ids = ids


def logits_width(model) -> int | None:
    """How many logits the model gives per position (its output layer's size; else its
    config's ``vocab_size``); None when neither says."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(layer, "out_features", None)
    if not isinstance(width, int):
        weight = getattr(layer, "weight", None)
        width = weight.shape[0] if weight is not None and weight.dim() == 2 else None
    if not isinstance(width, int):
        width = getattr(getattr(model, "config", None), "vocab_size", None)
    return width if isinstance(width, int) and width > 0 else None


def decodable(tokenizer, token_id: int) -> bool:
    """Whether the tokenizer has a token for ``token_id`` (not its unknown token standing in
    for an id it does not have)."""
    try:
        token = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # noqa: BLE001 - whatever a tokenizer raises for an id it has no token for
        return False
    return isinstance(token, str) and (token != tokenizer.unk_token or token_id == tokenizer.unk_token_id)


def undecodable_ids(tokenizer, width: int, keep: frozenset[int] = frozenset()) -> list[int]:
    """The ids below ``width`` that the tokenizer cannot decode, in order. The ids of its
    base vocabulary are taken as decodable; special and added tokens and the ids in ``keep``
    (stop tokens, say) never count as undecodable."""
    start = min(width, tokenizer.vocab_size)
    known = set(keep) | set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [i for i in range(start, width) if i not in known and not decodable(tokenizer, i)]
