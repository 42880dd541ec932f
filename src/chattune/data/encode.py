"""Conversations to ``input_ids`` and ``labels`` (-100 where nothing is trained).

Every piece of a rendered conversation is tokenized on its own (batched, with
the fast tokenizer, cached), so that a piece's tokens never merge with its
neighbours: the boundary between prompt and answer is exact, and the prompt
tokens at inference are the same as in training.

A ``joined`` template (ChatGLM-6B, ChatGLM2: their code tokenized the whole prompt
as one string) tokenizes each run of neighbouring text pieces that are trained alike
as one text instead, which gives exactly the ids of the model's own code; the
prompt/answer boundary stays exact because trained and untrained text never join.
A row that has to be shortened is encoded piece by piece, as below.

Truncation keeps each row within ``max_seq_length`` tokens in total: it drops
the oldest turns first, then shortens the user's text, then cuts the answer
from the right. A row whose last answer would vanish is dropped and counted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from chattune.data.templates import Piece, TemplateError, get_template, render
from chattune.errors import ModelLoadError

IGNORE_INDEX = -100


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


class PieceEncoder:
    """Tokenizes text pieces with a cache, batching the ones not seen yet.

    Unbounded by default (one ``prepare`` run: every text once, as fast as possible). A
    long-lived process (the server, the terminal chat) passes ``max_entries`` and/or
    ``max_chars``: the cache then keeps the most recently used texts within those bounds
    (least recently used first out) and never a text longer than ``max_chars`` itself.

    Raises ModelLoadError for a tokenizer without an EOS token: every answer ends with it.
    """

    def __init__(self, tokenizer, *, max_entries: int | None = None, max_chars: int | None = None):
        if tokenizer.eos_token_id is None:
            name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
            raise ModelLoadError(
                f"tokenizer {name}: has no EOS token, which ends every trained answer; expected "
                "eos_token set in its tokenizer_config.json (e.g. \"eos_token\": \"</s>\")"
            )
        self.tokenizer = tokenizer
        self.max_entries, self.max_chars = max_entries, max_chars
        self.bounded = max_entries is not None or max_chars is not None
        self.cache: dict[str, list[int]] = OrderedDict() if self.bounded else {}
        self.cache[""] = []
        self.chars = 0  # of the texts cached (counted when bounded)
        self.specials = special_token_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.token_ids: dict[str, int | None] = {}

    def warm(self, texts: list[str]) -> None:
        """Tokenize every text not yet cached, in one batched call."""
        missing = list({t for t in texts if t not in self.cache})
        for start in range(0, len(missing), 1024):
            batch = missing[start:start + 1024]
            ids = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
            if not self.bounded:
                self.cache.update(zip(batch, ids, strict=True))
                continue
            for text, text_ids in zip(batch, ids, strict=True):
                self._keep(text, text_ids)

    def ids(self, piece: Piece) -> list[int]:
        """The token ids of one piece."""
        if piece.role == "eos":
            return [self.eos]
        if piece.role == "specials":
            return list(self.specials)
        if piece.role == "token":
            token_id = self._token_id(piece.text)
            if token_id is not None:
                return [token_id]
        text = piece.text
        found = self.cache.get(text)
        if found is None:
            found = self.tokenizer([text], add_special_tokens=False)["input_ids"][0]
            if self.bounded:
                self._keep(text, found)
            else:
                self.cache[text] = found
        elif self.bounded:
            self.cache.move_to_end(text)
        return list(found)

    def _token_id(self, token: str) -> int | None:
        """The id of a special token the tokenizer has (not its unknown token), else None."""
        found = self.token_ids.get(token, -1)
        if found == -1:
            found = self.tokenizer.convert_tokens_to_ids(token)
            unknown = self.tokenizer.unk_token_id
            if not isinstance(found, int) or (found == unknown and token != self.tokenizer.unk_token):
                found = None
            self.token_ids[token] = found
        return found

    def _keep(self, text: str, ids: list[int]) -> None:
        """Cache one text within the bounds, dropping the least recently used."""
        if self.max_chars is not None and len(text) > self.max_chars:
            return
        if text in self.cache:
            self.cache.move_to_end(text)
            return
        self.cache[text] = ids
        self.chars += len(text)
        while len(self.cache) > 1 and (
                (self.max_entries is not None and len(self.cache) > self.max_entries)
                or (self.max_chars is not None and self.chars > self.max_chars)):
            old, _ = self.cache.popitem(last=False)
            self.chars -= len(old)


@dataclass
class EncodeOptions:
    """How conversations are encoded."""

    max_seq_length: int = 512
    train_on_prompt: bool = False
    train_last_turn_only: bool = False


@dataclass
class Encoded:
    """One encoded row, or the reason it was dropped."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    truncated: bool = False
    turns_dropped: int = 0
    dropped: str | None = None


def _drop_oldest_turn(messages: list[dict]) -> list[dict]:
    start = 1 if messages[0]["role"] == "system" else 0
    return messages[:start] + messages[start + 2:]


def _user_turns(messages: list[dict]) -> int:
    return sum(1 for m in messages if m["role"] == "user")


_ATOMIC_ROLES = ("specials", "eos", "token")


def _trained(pieces: list[Piece], options: EncodeOptions) -> list[bool]:
    """Whether each piece is supervised under ``options``."""
    last_turn = max((p.turn for p in pieces if p.role == "assistant"), default=0)
    return [options.train_on_prompt or (piece.trained and (not options.train_last_turn_only or piece.turn == last_turn))
            for piece in pieces]


def join_pieces(pieces: list[Piece], trained: list[bool] | None = None) -> tuple[list[Piece], list[bool]]:
    """Merge each run of neighbouring text pieces with the same ``trained`` flag into one
    piece (special tokens and EOS stay apart), for a ``joined`` template. Without
    ``trained`` (a prompt for generation) every text run joins."""
    flags = trained if trained is not None else [False] * len(pieces)
    merged: list[Piece] = []
    merged_flags: list[bool] = []
    for piece, flag in zip(pieces, flags, strict=True):
        atomic = piece.role in _ATOMIC_ROLES
        if (merged and not atomic and merged[-1].role not in _ATOMIC_ROLES and merged_flags[-1] == flag):
            last = merged[-1]
            merged[-1] = Piece(last.text + piece.text, "assistant" if flag else "template", piece.turn)
        else:
            merged.append(piece)
            merged_flags.append(flag)
    return merged, merged_flags


def _assemble(pieces: list[Piece], piece_ids: list[list[int]], trained: list[bool]) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, flag in zip(piece_ids, trained, strict=True):
        input_ids += ids
        labels += ids if flag else [IGNORE_INDEX] * len(ids)
    return Encoded(input_ids=input_ids, labels=labels)


def _is_joined(template: str) -> bool:
    named = get_template(template)
    return bool(named and named.joined)


def encode_conversation(messages: list[dict], template: str, encoder: PieceEncoder,
                        options: EncodeOptions, pieces: list[Piece] | None = None) -> Encoded:
    """Encode a conversation that ends with an answer, truncating it to fit.

    ``pieces`` may carry the conversation already rendered (saves a render).
    """
    limit = options.max_seq_length
    if _is_joined(template):
        rendered = pieces if pieces is not None else render(template, messages, encoder.tokenizer)
        joined, flags = join_pieces(rendered, _trained(rendered, options))
        joined_ids = [encoder.ids(p) for p in joined]
        if sum(map(len, joined_ids)) <= limit:
            encoded = _assemble(joined, joined_ids, flags)
            if all(label == IGNORE_INDEX for label in encoded.labels):
                return Encoded(dropped="no token is supervised")
            return encoded
        pieces = rendered
    turns_dropped = 0
    while True:
        if pieces is None:
            pieces = render(template, messages, encoder.tokenizer)
        piece_ids = [encoder.ids(p) for p in pieces]
        total = sum(map(len, piece_ids))
        if total <= limit or _user_turns(messages) <= 1:
            break
        messages = _drop_oldest_turn(messages)
        pieces = None
        turns_dropped += 1
    excess = total - limit
    truncated = turns_dropped > 0 or excess > 0
    if excess > 0:
        last_answer_turn = max(p.turn for p in pieces if p.role == "assistant")
        user_indexes = [i for i, p in enumerate(pieces) if p.role == "user" and p.turn == last_answer_turn]
        for n, index in enumerate(reversed(user_indexes)):
            keep_at_least = 1 if n == len(user_indexes) - 1 else 0
            cut = min(excess, max(0, len(piece_ids[index]) - keep_at_least))
            if cut:
                piece_ids[index] = piece_ids[index][: len(piece_ids[index]) - cut]
                excess -= cut
    encoded = _assemble(pieces, piece_ids, _trained(pieces, options))
    encoded.truncated = truncated
    encoded.turns_dropped = turns_dropped
    if excess > 0:
        answer_start = len(encoded.input_ids) - _tail_length(pieces, piece_ids)
        if answer_start >= limit:
            return Encoded(truncated=True, turns_dropped=turns_dropped,
                           dropped="prompt fills max_seq_length: no answer token would remain")
        encoded.input_ids = encoded.input_ids[:limit]
        encoded.labels = encoded.labels[:limit]
    if all(label == IGNORE_INDEX for label in encoded.labels):
        return Encoded(truncated=truncated, turns_dropped=turns_dropped, dropped="no token is supervised")
    return encoded


def _tail_length(pieces: list[Piece], piece_ids: list[list[int]]) -> int:
    """Tokens from the start of the last answer's text to the end."""
    last = max(i for i, p in enumerate(pieces) if p.role == "assistant")
    return sum(len(ids) for ids in piece_ids[last:])


def encode_prompt(messages: list[dict], template: str, encoder: PieceEncoder,
                  max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of a conversation ending with the user's turn, ready for generation.

    Uses the same rendering and piece tokenization as training. When
    ``max_prompt_tokens`` is set, the oldest turns are dropped to fit, then the
    left of the prompt is cut.
    """
    joined = _is_joined(template)
    while True:
        pieces = render(template, messages, encoder.tokenizer)
        if joined:
            pieces, _ = join_pieces(pieces)
        ids = [i for p in pieces for i in encoder.ids(p)]
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens or _user_turns(messages) <= 1:
            break
        messages = _drop_oldest_turn(messages)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def _render_named(template: str, messages: list[dict], tokenizer, where: str) -> list[Piece]:
    """render(), with a template failure naming the conversation it failed on."""
    try:
        return render(template, messages, tokenizer)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}") from exc


def encode_all(conversations: list[list[dict]], template: str, encoder: PieceEncoder,
               options: EncodeOptions, sources: list[str] | None = None) -> list[Encoded]:
    """Encode many conversations: render each once, tokenize all pieces in batches.

    ``sources`` (each conversation's ``file:line``) names the row in a TemplateError.
    """
    rendered = [_render_named(template, messages, encoder.tokenizer,
                              sources[i] if sources else f"conversation {i}")
                for i, messages in enumerate(conversations)]
    if _is_joined(template):
        texts = [p.text for pieces in rendered for p in join_pieces(pieces, _trained(pieces, options))[0]]
    else:
        texts = [p.text for pieces in rendered for p in pieces]
    encoder.warm([text for text in texts if text])
    return [encode_conversation(messages, template, encoder, options, pieces)
            for messages, pieces in zip(conversations, rendered, strict=True)]
