"""TextStream: generated tokens to text that is safe to send."""

from __future__ import annotations

from chattune.inference.textstream import TextStream, first_stop, stop_prefix_length


def test_text_stream_holds_back_what_may_be_a_stop_string():
    stream = TextStream(lambda ids: "".join(map(chr, ids)), ["END", "\n\n"], strip=True)
    sent = [stream.update(list(map(ord, text))) for text in [" ab", " abE", " abEN", " abENx", " abENx\n"]]
    assert sent == ["ab", "", "", "ENx", ""]
    assert stream.update(list(map(ord, " abENx\n\nmore"))) == "" and stream.stopped
    assert stream.finish(list(map(ord, " abENx\n\nmore"))) == ""
    assert stream.text == "abENx"
    utf8 = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), [], strip=False)
    e_acute = list("é".encode())
    assert utf8.update([32]) == " " and utf8.update([32, e_acute[0]]) == ""  # half a character waits
    assert utf8.update([32, *e_acute]) == "é" and utf8.finish([32, *e_acute]) == ""


def test_stop_string_helpers():
    assert first_stop("abENDcd\n\n", ["\n\n", "END"]) == 2 and first_stop("abc", ["x", ""]) == -1
    assert stop_prefix_length("abEN", ["END"]) == 2 and stop_prefix_length("abc", ["END"]) == 0


def sentencepiece_like(pieces: list[str]):
    """A decode that drops every leading space, as sentencepiece does (``▁`` is a space)."""
    return lambda ids: "".join(pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_a_context_of_blanks_does_not_lose_the_spaces_after_it():
    """``]] ▁ ▁'`` decodes as ``"]]  '"``: the space of the lone ``▁`` must not be dropped as if it
    began the text (a window starting at it decodes as nothing)."""
    pieces = ["]]", "▁", "▁'", "!", "▁", "▁", "▁x"]
    decode = sentencepiece_like(pieces)
    ids = list(range(len(pieces)))
    stream = TextStream(decode, [], strip=False)
    sent = "".join(stream.update(ids[:n]) for n in range(1, len(ids) + 1)) + stream.finish(ids)
    assert sent == stream.text == decode(ids) == "]]  '!   x"


def test_a_reply_is_sent_up_to_where_it_can_no_longer_change():
    """With ChatGLM-6B's reply steps (the clean-up, then process_response's rewrite), nothing sent
    is ever taken back: ``,`` waits to see whether a Chinese character follows, a space before
    punctuation waits to see whether the clean-up drops it."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from chattune.chatglm import replies
    from chattune.inference.replytext import ReplyText, clean_up_separable

    reply = ReplyText((lambda text: PreTrainedTokenizerBase.clean_up_tokenization(None, text), replies.rewrite),
                      (clean_up_separable, replies.separable), cleans_up=True)
    stream = TextStream(lambda ids: "".join(map(chr, ids)), [], strip=True, reply=reply)
    text = "你好 , 世界!ok [[训练时间]]"
    sent = [stream.update(list(map(ord, text[:n]))) for n in range(1, len(text) + 1)]
    sent.append(stream.finish(list(map(ord, text))))
    assert "".join(sent) == stream.text == "你好， 世界！ok 2023年"
    assert sent[:5] == ["", "你", "", "", ""]  # "你好" waits for what follows it, " ," for the clean-up
