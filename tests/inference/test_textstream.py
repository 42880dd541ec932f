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
