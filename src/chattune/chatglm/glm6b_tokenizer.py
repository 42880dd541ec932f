"""ChatGLM-6B's tokenizer (``ice_text.model``), ported to today's transformers.

THUDM's ``tokenization_chatglm.py`` fails on transformers >= 4.34 (its constructor
reads the sentencepiece model before creating it). This is the same tokenizer,
sentencepiece-backed so that the ids are the same by construction: before
sentencepiece sees a text, ``\\n`` becomes ``<n>``, a tab ``<|tab|>`` and a run of 2 to
80 spaces ``<|blank_N|>``; sentencepiece then normalises (NFKC: ``，`` → ``,``) and
adds its dummy prefix. Encoding appends ``[gMASK] <sop>``. Text is split as
transformers 4.27-4.33 split it for THUDM's tokenizer: at ``<sop> <eop> <unk> <pad>
[MASK]`` (its registered special tokens), the whitespace around them dropped, and each
text between them encoded on its own; ``[gMASK]`` is not one of them, sentencepiece
matches it (a user-defined piece) inside the text. Decoding cleans up the spaces before
punctuation (``"Hello , world"`` -> ``"Hello, world"``) as THUDM's tokenizer did on the
transformers it was written for (4.27-4.33: ``clean_up_tokenization_spaces`` on unless its
config says otherwise).
"""

from __future__ import annotations

import os
import re
import shutil

from transformers import PreTrainedTokenizer

MAX_BLANK = 80


def _encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for length in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * length, f"<|blank_{length}|>")
    return text


def _restore_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for length in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{length}|>", " " * length)
    return text


class ChatGLM6BTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B's sentencepiece tokenizer with THUDM's ids, text handling and specials."""

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<sop>", eos_token="<eop>", end_token="</s>", mask_token="[MASK]",
                 gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>", num_image_tokens=0,
                 padding_side="left", **kwargs):
        import sentencepiece

        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.end_token = str(end_token)
        self.gmask_token = str(gmask_token)
        kwargs.pop("do_lower_case", None)
        kwargs.pop("remove_space", None)
        kwargs.pop("auto_map", None)
        kwargs.pop("extra_special_tokens", None)
        kwargs.setdefault("clean_up_tokenization_spaces", True)  # THUDM's, on the transformers it was written for
        super().__init__(bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, padding_side=padding_side, end_token=end_token,
                         gmask_token=gmask_token, num_image_tokens=num_image_tokens, **kwargs)
        splits = sorted({str(t) for t in (bos_token, eos_token, unk_token, pad_token, mask_token)}, key=len,
                        reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in splits) + ")")

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of ``text``: split at the special tokens (whitespace around them dropped),
        each part between them through sentencepiece with its own dummy prefix."""
        parts = self._split.split(text)
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if part:
                tokens += [part] if i % 2 else self._tokenize(part)
        return tokens

    @property
    def vocab_size(self) -> int:
        """Pieces in the sentencepiece model, after the image tokens (0 in today's ChatGLM-6B)."""
        return self.num_image_tokens + self.sp.get_piece_size()

    @property
    def gmask_token_id(self) -> int:
        """The id of ``[gMASK]``."""
        return self._convert_token_to_id(self.gmask_token)

    def get_vocab(self) -> dict[str, int]:
        """Every piece and its id."""
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode_as_pieces(_encode_whitespace(text))

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces back to text, whitespace tokens restored."""
        return _restore_whitespace(self.sp.decode_pieces(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
                **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [i for i in ids if i != self.pad_token_id]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        # every token is a sentencepiece piece (the specials too): one decode, as THUDM's did
        text = self.convert_tokens_to_string([self._convert_id_to_token(i) for i in ids])
        if self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``A [gMASK] <sop>``, or ``A [gMASK] <sop> B <eop>`` for a pair (THUDM's layout)."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        """1 for the tokens :meth:`build_inputs_with_special_tokens` adds."""
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy ``ice_text.model`` into ``save_directory``."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
