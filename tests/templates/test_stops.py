"""Every named template's stop strings and stop tokens end generation (chat and predict decode
through the same path, the server through the same Decoder and profile)."""

from __future__ import annotations

import functools

import pytest

import chattune.inference.generate
from chattune.inference.generate import answer, stream
from chattune.inference.runs import LoadOptions, load_run
from chattune.templates.registry import NAMED_TEMPLATES

QUESTION = [{"role": "user", "content": "Who are you?"}]


def force(monkeypatch, model, tokens: list[int]) -> list[int]:
    """From the prefill on, the model picks ``tokens`` one by one (then the last one again);
    returns the call counter (set it to 0 to start over)."""
    original = model.forward
    calls = [0]

    @functools.wraps(original)
    def forced(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[..., tokens[min(calls[0], len(tokens) - 1)]] += 1e4
        calls[0] += 1
        return out

    monkeypatch.setattr(model, "forward", forced)
    return calls


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models("glm4")


def _cases():
    for name, template in sorted(NAMED_TEMPLATES.items()):
        for stop in template.stop_strings:
            yield name, "string", stop
        for stop in template.stop_tokens:
            yield name, "token", stop


@pytest.mark.parametrize(("name", "kind", "stop"), list(_cases()))
def test_generation_stops_at_the_templates_stop(base, name, kind, stop, monkeypatch):
    run = load_run(str(base), LoadOptions(template=name))
    tokenizer = run.tokenizer
    if kind == "token":
        stop_id = tokenizer.convert_tokens_to_ids(stop)
        if not isinstance(stop_id, int) or stop_id == tokenizer.unk_token_id:
            pytest.skip(f"the tiny tokenizer has no {stop} token")
        assert stop_id in run.profile().stop_token_ids
        tail = [stop_id]
    else:
        assert stop in run.profile().stop_strings
        tail = tokenizer(stop, add_special_tokens=False)["input_ids"]
    words = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    more = tokenizer(" and more", add_special_tokens=False)["input_ids"]
    events = []
    monkeypatch.setattr(chattune.inference.generate, "_ignore", events.append)
    calls = force(monkeypatch, run.model, words + tail + more)
    (seq,) = answer(run, [QUESTION], max_new_tokens=len(words + tail + more) + 4)
    assert seq.text.text.strip() == "Hello there", (name, stop, seq.text.text)
    assert [e.finish_reason for e in events if e.kind == "done"] == ["stop"]
    assert len(seq.generated) <= len(words + tail)  # nothing decoded after the stop
    calls[0] = 0
    streamed = "".join(stream(run, QUESTION, max_new_tokens=len(words + tail + more) + 4))
    assert streamed.strip() == "Hello there"


def test_every_template_with_its_own_end_marker_names_a_stop():
    """A template whose answers end with text of its own (not only EOS) stops on that text."""
    for name, template in NAMED_TEMPLATES.items():
        ends = [p for p in template.render([*QUESTION, {"role": "assistant", "content": "A"}])
                if p.role == "answer_end"]
        if ends:
            assert template.stop_strings or template.stop_tokens, name
