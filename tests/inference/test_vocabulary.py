"""Ids the tokenizer cannot decode: never sampled, and reported when one gets through anyway.

ChatGLM-6B has 130,528 logits for 130,088 pieces (the fixture's ``ice_text.model``) and its
tokenizer raises on the rest; ChatGLM2-6B pads 64,794 ids to 65,024 logits and its (fast)
tokenizer decodes the rest as nothing (ChatGLM3-6B likewise, from 64,798). On the tiny models of ``../shared/fixtures/chatglm``, an
output-layer bias makes the last (undecodable) id every step's argmax.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

import chattune.inference.decoding
from chattune.inference.generate import AnswerFailed, answer, stream
from chattune.inference.runs import LoadOptions, load_run
from chattune.inference.vocabulary import UndecodableToken, undecodable_ids

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm"
# family -> (the tokenizer's ids, the model's logits, its end token)
SIZES = {"chatglm-6b": (130088, 130528, 130005), "chatglm2-6b": (64794, 65024, 2), "chatglm3-6b": (64798, 65024, 2)}
ASK = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module", params=sorted(SIZES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def run(family, tmp_path_factory):
    """The THUDM folder of ``family`` with tiny random weights, loaded as chat/predict/serve load it."""
    from tests.chatglm.thudm_folder import build_thudm_folder

    if not (FIXTURES / family / "config.json").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES} (a clone without ../shared)")
    root = tmp_path_factory.mktemp(f"vocabulary-{family}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(root / "cache"))
        yield load_run(str(build_thudm_folder(root / family, FIXTURES / family)), LoadOptions())


@contextmanager
def biased(model, token: int):
    """An output-layer bias of 1e4 on ``token``: its logit is the largest at every step."""
    layer = model.get_output_embeddings()
    bias = torch.zeros(layer.out_features)
    bias[token] = 1e4
    handle = layer.register_forward_hook(lambda module, inputs, output: output + bias.to(output))
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def unmasked(monkeypatch):
    """The decoder's masking of undecodable ids switched off (as if a path bypassed it)."""
    monkeypatch.setattr(chattune.inference.decoding, "ban", lambda logits, seqs: None)


def test_the_undecodable_ids_are_the_logits_past_the_tokenizer(run, family):
    pieces, width, end = SIZES[family]
    assert len(run.tokenizer) == pieces
    assert run.undecodable_ids == frozenset(range(pieces, width))
    assert run.banned_ids.tolist() == list(range(pieces, width))
    keep = {end, *run.tokenizer.all_special_ids, *run.profile().stop_token_ids}
    assert not keep & run.undecodable_ids
    assert undecodable_ids(run.tokenizer, pieces) == []  # a model no wider than its tokenizer bans nothing


def test_an_undecodable_argmax_is_never_generated(run, family):
    """Greedy or sampled, the answer has only ids the tokenizer decodes, and no error."""
    bad = SIZES[family][1] - 1
    with biased(run.model, bad):
        with torch.no_grad():
            logits = run.model(input_ids=torch.tensor([run.prompt_ids(ASK)])).logits[0, -1]
        assert int(logits.argmax()) == bad  # the bias works: unmasked, greedy decoding would pick it
        (greedy,) = answer(run, [ASK], max_new_tokens=6, ignore_eos=True)
        (sampled,) = answer(run, [ASK], max_new_tokens=6, ignore_eos=True, temperature=1.0, top_k=2, seed=0)
    for seq in (greedy, sampled):
        assert len(seq.generated) == 6 and seq.error is None
        assert not run.undecodable_ids.intersection(seq.generated)
        assert seq.text.text == run.decode(seq.generated).strip()


def test_the_end_token_is_not_masked(run, family):
    end = SIZES[family][2]
    with biased(run.model, end):
        (seq,) = answer(run, [ASK], max_new_tokens=6)
    assert seq.generated == [end] and seq.error is None and seq.text.text == ""


def test_decoding_an_undecodable_id_raises_naming_it(run, family):
    """Not a silent nothing (ChatGLM2's fast tokenizer alone decodes it as ``""``)."""
    pieces, width, _ = SIZES[family]
    with pytest.raises(UndecodableToken, match=f"token id {width - 1}, which its tokenizer cannot decode "
                                               f"\\({width - pieces} of the model's {width} logits"):
        run.decode([*run.tokenizer.encode("你好", add_special_tokens=False), width - 1])


def test_an_undecodable_id_that_gets_through_is_reported(run, family, unmasked, tmp_path):
    """With the masking bypassed: the answer ends with an error naming the id; ``predict``
    writes it in the row's ``error``; the terminal chat says so, leaves the turn out of the
    history and goes on; ``stream`` raises after the text before it."""
    from chattune.chat import chat_loop
    from chattune.predict import predict_file

    bad = SIZES[family][1] - 1
    with biased(run.model, bad):
        (seq,) = answer(run, [ASK], max_new_tokens=6)
        assert seq.generated == [bad] and seq.text.text == ""
        assert f"token id {bad}, which its tokenizer cannot decode" in seq.error

        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"instruction": q, "output": "x"}) + "\n" for q in ("你好", "hi")))
        out = tmp_path / "pred.jsonl"
        assert predict_file(run, str(rows), str(out), max_new_tokens=6, log=lambda *_: None) == 2
        lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert all(f"token id {bad}" in line["error"] and line["prediction"] == "" for line in lines)

        with pytest.raises(AnswerFailed, match=f"token id {bad}"):
            list(stream(run, ASK, max_new_tokens=6))

        shown = io.StringIO()
        chat_loop(run, stdin=io.StringIO("你好\nhi\n/exit\n"), stdout=shown, max_new_tokens=6)
    text = shown.getvalue()
    assert text.count(f"chattune: error: decoding the answer failed: the model generated token id {bad}, "
                      "which its tokenizer cannot decode") == 2
    assert text.count("this turn is left out of the history") == 2 and text.count("Assistant: ") == 2


def test_a_failed_answer_offered_tools_is_written_with_its_error(run, family, unmasked, tmp_path):
    """``predict`` reads no calls from an answer that failed (ChatGLM3 reads them from the answer
    decoded again with ``<|assistant|>`` kept, which would meet the undecodable id again)."""
    from chattune.predict import predict_file
    from tests.test_predict import tool_rows

    if family != "chatglm3-6b":
        pytest.skip("of these templates, ChatGLM3's alone renders tools")
    bad = SIZES[family][1] - 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(tool_rows()[0]) + "\n")
    out = tmp_path / "pred.jsonl"
    with biased(run.model, bad):
        assert predict_file(run, str(rows), str(out), max_new_tokens=6, log=lambda *_: None) == 1
    (line,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert f"token id {bad}" in line["error"] and line["prediction"] == ""
    assert line["calls"] == [] and line["tool_name_match"] == 0.0


def test_the_server_reports_an_undecodable_id(run, family, unmasked):
    """Over HTTP the error is an OpenAI error body (500), or an error event in a stream."""
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from tests.serve.server_thread import ServerThread

    bad = SIZES[family][1] - 1
    engine = Engine(run.model, pad_token_id=run.tokenizer.pad_token_id)
    engine.start()
    server = ServerThread(create_app(run, engine, ui=False)).start()
    url = f"{server.url}/v1/chat/completions"
    body = {"model": run.default, "messages": ASK, "max_tokens": 6, "temperature": 0}
    try:
        with biased(run.model, bad):
            reply = httpx.post(url, json=body, timeout=60)
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
    finally:
        server.stop()
        engine.stop()
    assert reply.status_code == 500
    assert f"token id {bad}, which its tokenizer cannot decode" in reply.json()["error"]["message"]
    errors = [e["error"]["message"] for e in events if "error" in e]
    assert len(errors) == 1 and f"token id {bad}" in errors[0]
