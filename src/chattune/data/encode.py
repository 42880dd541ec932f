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
from the right. A row whose last answer would vanish is dropped and counted. Every cut
keeps the start of a text, so no more than its first ``max_seq_length`` tokens can ever be
trained: an encoder made with ``head_tokens`` (data preparation) tokenizes a text far longer
than that (a 50 MB line) by its start only (:meth:`PieceEncoder.head`), in a fraction of a
second instead of minutes, and the row comes out the same. A truncated row counts the
characters the cuts left out (``Encoded.chars_cut``).

Tools: a turn is a user message and everything after it up to the next user message
(calls, results, the final answer), and turns are dropped whole. Tool calls are trained,
tool results never (not even with ``train_on_prompt``), the tools block only with
``train_on_prompt``. The right cut may only shorten the final answer: a row that would be
cut inside a tool call or result is dropped, so a half call is never trained on. A row whose
template cannot render its tools (see ``templates.ToolsNotSupportedError``) is dropped with
that reason.
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

from chattune.data.records import tool_call_count
from chattune.errors import ModelLoadError
from chattune.templates.pieces import CALL_ROLES, Piece, TemplateError, ToolsNotSupportedError
from chattune.templates.registry import get_template, render
from chattune.templates.tokens import special_token_ids, token_id

IGNORE_INDEX = -100
_SPACE = re.compile(r"\s+")
HEAD_FACTOR = 64
"""A text is only looked at for a head cut (:meth:`PieceEncoder.head`) when it has more than
this many characters per token that can be kept: below that, measuring costs more than it saves."""


def _visible(text: str) -> int:
    return len(_SPACE.sub("", text))


def visible_chars(texts: list[str]) -> int:
    """The non-space characters of ``texts``, each text counted in whichever of its given, NFC
    and NFKC forms has the fewest (a tokenizer that normalizes so sees no fewer)."""
    return sum(min(_visible(text), _visible(unicodedata.normalize("NFC", text)),
                   _visible(unicodedata.normalize("NFKC", text))) for text in texts)


class PieceEncoder:
    """Tokenizes text pieces with a cache, batching the ones not seen yet.

    Unbounded by default (one ``prepare`` run: every text once, as fast as possible). A
    long-lived process (the server, the terminal chat) passes ``max_entries`` and/or
    ``max_chars``: the cache then keeps the most recently used texts within those bounds
    (least recently used first out) and never a text longer than ``max_chars`` itself.

    ``head_tokens`` (training's ``max_seq_length``): no use of this encoder keeps more than a
    text's first ``head_tokens`` tokens, so a text far longer than that is tokenized by its
    start only (:meth:`head`; not for prompts, whose left cut keeps a text's end).

    Raises ModelLoadError for a tokenizer without an EOS token: every answer ends with it.
    """

    def __init__(self, tokenizer, *, max_entries: int | None = None, max_chars: int | None = None,
                 head_tokens: int | None = None):
        if tokenizer.eos_token_id is None:
            name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
            raise ModelLoadError(
                f"tokenizer {name}: has no EOS token, which ends every trained answer; expected "
                "eos_token set in its tokenizer_config.json (e.g. \"eos_token\": \"</s>\")"
            )
        self.tokenizer = tokenizer
        self.max_entries, self.max_chars = max_entries, max_chars
        self.head_tokens = head_tokens
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
            ids = self.tokenizer([self.head(text) for text in batch], add_special_tokens=False)["input_ids"]
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
        if piece.role in ("token", "call_token"):
            token_id = self._token_id(piece.text)
            if token_id is not None:
                return [token_id]
        text = piece.text
        found = self.cache.get(text)
        if found is None:
            found = self.tokenizer([self.head(text)], add_special_tokens=False)["input_ids"][0]
            if self.bounded:
                self._keep(text, found)
            else:
                self.cache[text] = found
        elif self.bounded:
            self.cache.move_to_end(text)
        return list(found)

    def ids_of(self, pieces: list[Piece]) -> list[int]:
        """The token ids of ``pieces`` in order, the texts not cached yet tokenized in one call."""
        self.warm([p.text for p in pieces if p.text and p.role not in _ATOMIC_ROLES])
        return [i for piece in pieces for i in self.ids(piece)]

    def head(self, text: str) -> str:
        """What of ``text`` to tokenize: all of it, or where it is far longer than ``head_tokens``
        tokens can be, its start: the first prefix (growing by doubling) holding twice the visible
        characters that ``head_tokens`` of the widest token hold (:func:`visible_chars`). The
        prefix is then more than ``2 * head_tokens`` tokens, and its first ``head_tokens`` tokens
        (all that a cut keeps) are the whole text's, however long the text is."""
        if self.head_tokens is None or len(text) <= HEAD_FACTOR * self.head_tokens:
            return text
        need = 2 * self.head_tokens * self.widest_token
        end = need
        while end < len(text):
            if visible_chars([text[:end]]) >= need:
                return text[:end]
            end *= 2
        return text

    @cached_property
    def widest_token(self) -> int:
        """The most non-space characters one token's text has (each token decoded on its own, once):
        a text of N such characters is at least N / widest_token tokens (see :func:`visible_chars`)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=False)
        return max(1, max(map(_visible, texts), default=1))

    def _token_id(self, token: str) -> int | None:
        """The id of a special token the tokenizer has (not its unknown token), else None."""
        found = self.token_ids.get(token, -1)
        if found == -1:
            found = self.token_ids[token] = token_id(self.tokenizer, token)
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
    tool_calls: int = 0  # the calls in the row as encoded (after dropped turns)
    supervised_call_tokens: int = 0  # supervised tokens of tool calls (their text and end tokens)
    chars_cut: int = 0  # characters of the rendered row that truncation left out


def _drop_oldest_turn(messages: list[dict]) -> list[dict]:
    """The conversation without its first turn: the first user message and everything after
    it up to the next user message (an answer, or calls, results and the answer)."""
    start = 1 if messages[0]["role"] == "system" else 0
    end = start + 1
    while end < len(messages) and messages[end]["role"] != "user":
        end += 1
    return messages[:start] + messages[end:]


def _user_turns(messages: list[dict]) -> int:
    return sum(1 for m in messages if m["role"] == "user")


_ATOMIC_ROLES = ("specials", "eos", "token", "call_token")
_ANSWER_ROLES = ("assistant", *CALL_ROLES)


def _last_answer_turn(pieces: list[Piece]) -> int:
    return max((p.turn for p in pieces if p.role in _ANSWER_ROLES), default=0)


def _trained(pieces: list[Piece], options: EncodeOptions) -> list[bool]:
    """Whether each piece is supervised under ``options``: a tool result never is;
    ``train_on_prompt`` supervises everything else."""
    last_turn = _last_answer_turn(pieces)
    return [piece.role != "observation" and (
                options.train_on_prompt
                or (piece.trained and (not options.train_last_turn_only or piece.turn == last_turn)))
            for piece in pieces]


def _call_tokens(pieces: list[Piece], piece_ids: list[list[int]], trained: list[bool]) -> int:
    return sum(len(ids) for piece, ids, flag in zip(pieces, piece_ids, trained, strict=True)
               if flag and piece.role in CALL_ROLES)


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


TOOLS_CUT = "max_seq_length would cut a tool call or result: no final answer token would remain"
"""The drop reason of a row whose right cut would fall inside its last turn's calls or results."""


def encode_conversation(messages: list[dict], template: str, encoder: PieceEncoder,
                        options: EncodeOptions, pieces: list[Piece] | None = None,
                        tools: list[dict] | None = None) -> Encoded:
    """Encode a conversation that ends with an answer, truncating it to fit.

    ``pieces`` may carry the conversation already rendered (saves a render); ``tools`` are
    the tools the conversation offers. A conversation whose tools the template cannot
    render comes back dropped with the reason.
    """
    try:
        return _encode_conversation(messages, template, encoder, options, pieces, tools)
    except ToolsNotSupportedError as exc:
        return Encoded(dropped=str(exc))


def _encode_conversation(messages: list[dict], template: str, encoder: PieceEncoder,
                         options: EncodeOptions, pieces: list[Piece] | None,
                         tools: list[dict] | None) -> Encoded:
    limit = options.max_seq_length
    if _is_joined(template):
        rendered = pieces if pieces is not None else render(template, messages, encoder.tokenizer, tools)
        pieces = rendered
        joined, flags = join_pieces(rendered, _trained(rendered, options))
        joined_ids = [encoder.ids(p) for p in joined]
        if sum(map(len, joined_ids)) <= limit:
            encoded = _assemble(joined, joined_ids, flags)
            if all(label == IGNORE_INDEX for label in encoded.labels):
                return Encoded(dropped="no token is supervised")
            return encoded
    turns_dropped = 0
    chars = None  # the characters of the conversation as first rendered
    while True:
        if pieces is None:
            pieces = render(template, messages, encoder.tokenizer, tools)
        if chars is None:
            chars = sum(len(p.text) for p in pieces)
        piece_ids = [encoder.ids(p) for p in pieces]
        total = sum(map(len, piece_ids))
        if total <= limit or _user_turns(messages) <= 1:
            break
        messages = _drop_oldest_turn(messages)
        pieces = None
        turns_dropped += 1
    excess = total - limit
    truncated = turns_dropped > 0 or excess > 0
    counts = [len(ids) for ids in piece_ids]  # each piece's tokens before the cuts below
    if excess > 0:
        last_answer_turn = _last_answer_turn(pieces)
        user_indexes = [i for i, p in enumerate(pieces) if p.role == "user" and p.turn == last_answer_turn]
        for n, index in enumerate(reversed(user_indexes)):
            keep_at_least = 1 if n == len(user_indexes) - 1 else 0
            cut = min(excess, max(0, len(piece_ids[index]) - keep_at_least))
            if cut:
                piece_ids[index] = piece_ids[index][: len(piece_ids[index]) - cut]
                excess -= cut
    trained = _trained(pieces, options)
    encoded = _assemble(pieces, piece_ids, trained)
    encoded.truncated = truncated
    encoded.turns_dropped = turns_dropped
    if excess > 0:
        answer = _final_answer_index(pieces)
        answer_start = sum(map(len, piece_ids[:answer])) if answer is not None else len(encoded.input_ids)
        if answer_start >= limit:
            return Encoded(truncated=True, turns_dropped=turns_dropped,
                           dropped=TOOLS_CUT if _cuts_tools(pieces, piece_ids, limit, answer)
                           else "prompt fills max_seq_length: no answer token would remain")
        encoded.input_ids = encoded.input_ids[:limit]
        encoded.labels = encoded.labels[:limit]
    if all(label == IGNORE_INDEX for label in encoded.labels):
        return Encoded(truncated=truncated, turns_dropped=turns_dropped, dropped="no token is supervised")
    encoded.tool_calls = tool_call_count(messages)
    encoded.supervised_call_tokens = _call_tokens(pieces, piece_ids, trained)
    if truncated:
        kept = _chars_kept(pieces, piece_ids, counts, len(encoded.input_ids), encoder.tokenizer)
        encoded.chars_cut = max(0, chars - kept)
    return encoded


def _chars_kept(pieces: list[Piece], piece_ids: list[list[int]], counts: list[int], kept: int, tokenizer) -> int:
    """The characters of ``pieces`` that a row of their first ``kept`` tokens holds: a piece's
    whole text where all of its ``counts`` tokens are in it, else what its kept tokens decode to."""
    chars = position = 0
    for piece, ids, count in zip(pieces, piece_ids, counts, strict=True):
        taken = max(0, min(len(ids), kept - position))
        position += len(ids)
        if taken == count:
            chars += len(piece.text)
        elif taken and piece.role not in _ATOMIC_ROLES:
            chars += min(len(piece.text), len(tokenizer.decode(ids[:taken], skip_special_tokens=False)))
    return chars


def _final_answer_index(pieces: list[Piece]) -> int | None:
    """The index of the last answer's text piece, or None when a tool call or result comes
    after it (the conversation ends with a call): the right cut may only shorten that answer."""
    last = max((i for i, p in enumerate(pieces) if p.role == "assistant"), default=None)
    if last is None or any(p.role in CALL_ROLES or p.role == "observation" for p in pieces[last:]):
        return None
    return last


def _cuts_tools(pieces: list[Piece], piece_ids: list[list[int]], limit: int, answer: int | None) -> bool:
    """Whether the first ``limit`` tokens end inside or before the last call or result, or
    the row ends with a call (no final answer: any cut shortens the call's turn)."""
    ends = [sum(map(len, piece_ids[: i + 1])) for i, p in enumerate(pieces)
            if p.role in CALL_ROLES or p.role == "observation"]
    return bool(ends) and (answer is None or limit < max(ends))


def prompt_pieces(messages: list[dict], template: str, tokenizer, tools: list[dict] | None = None) -> list[Piece]:
    """A prompt's pieces as :func:`encode_prompt` tokenizes them, one by one (a ``joined``
    template's text runs joined)."""
    pieces = render(template, messages, tokenizer, tools)
    return join_pieces(pieces)[0] if _is_joined(template) else pieces


def encode_prompt(messages: list[dict], template: str, encoder: PieceEncoder,
                  max_prompt_tokens: int | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation ending with the user's turn (or a tool result), ready
    for generation: the model continues as the assistant.

    Uses the same rendering and piece tokenization as training. When
    ``max_prompt_tokens`` is set, the oldest turns are dropped to fit, then the
    left of the prompt is cut.
    """
    while True:
        ids = [i for p in prompt_pieces(messages, template, encoder.tokenizer, tools) for i in encoder.ids(p)]
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens or _user_turns(messages) <= 1:
            break
        messages = _drop_oldest_turn(messages)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def _render_named(template: str, messages: list[dict], tokenizer, where: str,
                  tools: list[dict] | None) -> list[Piece] | str:
    """render(), with a template failure naming the conversation it failed on; the reason
    (a string) when the template cannot render the conversation's tools."""
    try:
        return render(template, messages, tokenizer, tools)
    except ToolsNotSupportedError as exc:
        return str(exc)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}") from exc


def encode_all(conversations: list[list[dict]], template: str, encoder: PieceEncoder,
               options: EncodeOptions, sources: list[str] | None = None,
               tools: list[list[dict] | None] | None = None) -> list[Encoded]:
    """Encode many conversations: render each once, tokenize all pieces in batches.

    ``sources`` (each conversation's ``file:line``) names the row in a TemplateError;
    ``tools`` (each conversation's tools, or None) are the tools each offers. A row whose
    tools the template cannot render is dropped with that reason.
    """
    offered = tools if tools is not None else [None] * len(conversations)
    rendered = [_render_named(template, messages, encoder.tokenizer,
                              sources[i] if sources else f"conversation {i}", offered[i])
                for i, messages in enumerate(conversations)]
    usable = [pieces for pieces in rendered if not isinstance(pieces, str)]
    if _is_joined(template):
        texts = [p.text for pieces in usable for p in join_pieces(pieces, _trained(pieces, options))[0]]
    else:
        texts = [p.text for pieces in usable for p in pieces]
    encoder.warm([text for text in texts if text])
    return [Encoded(dropped=pieces) if isinstance(pieces, str)
            else encode_conversation(messages, template, encoder, options, pieces, row_tools)
            for messages, pieces, row_tools in zip(conversations, rendered, offered, strict=True)]
