"""What a tokenizer adds by itself, and whether it has a special token: the two facts about
a tokenizer that rendering a template in another form needs."""

from __future__ import annotations


def special_token_ids(tokenizer) -> list[int]:
    """The tokens a tokenizer adds by itself when it encodes one text (e.g. BOS),
    except EOS, found by comparing encodings with and without special tokens."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    extra: list[int] = []
    if plain and len(full) > len(plain):
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                extra = full[:start] + full[start + len(plain):]
                break
    return [i for i in extra if i != tokenizer.eos_token_id]


def token_id(tokenizer, token: str) -> int | None:
    """The id of a special token the tokenizer has (not its unknown token), else None."""
    found = tokenizer.convert_tokens_to_ids(token)
    unknown = tokenizer.unk_token_id
    if not isinstance(found, int) or (found == unknown and token != tokenizer.unk_token):
        return None
    return found
