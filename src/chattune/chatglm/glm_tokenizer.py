"""ChatGLM2-6B / ChatGLM3-6B's sentencepiece tokenizer as a native fast tokenizer.

THUDM's ``tokenization_chatglm.py`` wraps a sentencepiece BPE model (byte fallback,
a dummy prefix ``▁`` per encoded text, no normalisation) and numbers its special
tokens after the model's pieces: ``[MASK] [gMASK] [sMASK] sop eop`` (ChatGLM2), then
``<|system|> <|user|> <|assistant|> <|observation|>`` (ChatGLM3). Every encoded text
starts with ``[gMASK] sop``. Its special tokens never come out of text: ``sop`` in a
sentence is the word, ``<|user|>`` typed by a user is text. The tokenizer built here
gives the same ids (``tests/chatglm`` checks them against THUDM's code): the
sentencepiece pieces and merges as a ``tokenizers`` BPE model, the specials appended in
THUDM's order, ``split_special_tokens`` so that text never turns into them.
"""

from __future__ import annotations

from pathlib import Path

GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def special_tokens(family: str) -> tuple[str, ...]:
    """The special tokens THUDM's tokenizer numbers after the sentencepiece pieces, in order."""
    return GLM2_SPECIALS + (GLM3_ROLES if family == "chatglm3-6b" else ())


def build_glm_tokenizer(sp_model: Path, family: str, *, template: str, max_length: int):
    """A ``PreTrainedTokenizerFast`` with THUDM's ids for the sentencepiece file ``sp_model``.

    ``template`` is recorded as the folder's chattune template (``auto`` picks it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(sp_model)).extract(models.BPE)
    vocab = extracted["vocab"]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=extracted["merges"], unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = special_tokens(family)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    ids = {token: len(vocab) + i for i, token in enumerate(specials)}
    for token, token_id in ids.items():
        if backend.token_to_id(token) != token_id:
            raise ValueError(f"{sp_model}: special token {token} got id {backend.token_to_id(token)}, "
                             f"expected {token_id} (pieces + its place in THUDM's list)")
    prefix = [("[gMASK]", ids["[gMASK]"]), ("sop", ids["sop"])]
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 sop:0 $A:0", pair="[gMASK]:0 sop:0 $A:0 $B:1", special_tokens=prefix)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<unk>",
        additional_special_tokens=list(specials), split_special_tokens=True, padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=max_length, chattune_template=template,
    )
