"""ChatGLM-6B's replies are the text THUDM's ``chat()`` returns for the same answer ids.

THUDM's ``chat()`` decodes the answer (its tokenizer cleans up spaces before punctuation)
and passes it through ``process_response`` (``, ! : ; ?`` next to a Chinese character full
width, ``[[训练时间]]`` -> ``2023年``). The golden is THUDM's own code: its ``process_response``
read out of the fixture's ``modeling_chatglm.py`` (no second venv needed), and for answer ids
``thudm_reference.py``'s record of its tokenizer's ``decode`` and the model's
``process_response`` (run with transformers 4.33, see ``conftest.py``). chattune's reply must
equal it finished, streamed (the pieces join to it), and through chat, predict and serve.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import random
import re
import warnings
from pathlib import Path

import httpx
import pytest

from chattune.chatglm import replies
from chattune.chatglm.replies import process_response
from chattune.inference.generate import answer, sequence, stream
from chattune.inference.replytext import ReplyText, clean_up_separable, reply_text
from chattune.inference.runs import LoadOptions, load_run
from chattune.inference.sampling import SamplingParams
from chattune.inference.textstream import TextStream

FAMILY = "chatglm-6b"
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm" / FAMILY
ALPHABET = ["你", "好", "中", "国", "年", ",", "!", ":", ";", "?", ".", "'", " ", "  ", "\n", "\t", "a", "b", "n",
            "t", "m", "s", "r", "e", "v", "1", "，", "。", "[[", "]]", "[[训练时间]]", "[[训练", "时间]]", "训练",
            "🙂", "한"]
HOSTILE = [" ", " ", "'", "?", ".", ",", "!", ":", ";", "n", "t", "s", "v", "e", "r", "m", "中", "中", "\n",
           "[[", "训练", "时间", "]]", "[[训练时间]]", "n't", " '", "' "]
"""Few symbols, all of them ones the clean-up or process_response rewrite: every mix of them comes up."""
ASK = [{"role": "user", "content": "你好"}]
FORCED = ["你好,我是助手!", "Hello , world ! How are you ?", "[[训练时间]],我被训练。",
          "第一行,\n第二行!\n\n第三行:内容;结束?", "I 'm here , you 're there . don 't ! it 's ' ok ' ? we 've"]


@functools.cache
def thudm_process_response():
    """THUDM's ``process_response``, compiled from the fixture's ``modeling_chatglm.py`` (the
    method alone: it uses ``re`` and nothing of ``self``)."""
    path = FIXTURES / "modeling_chatglm.py"
    if not path.is_file():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES} (a clone without ../shared)")
    with warnings.catch_warnings():  # its "\?" is an invalid escape in a plain string (Python keeps it)
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found = [node for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.name == "process_response"]
        assert len(found) == 1, "THUDM's modeling_chatglm.py should define process_response once"
        code = compile(ast.Module(body=found, type_ignores=[]), str(path), "exec")
    namespace = {"re": re}
    exec(code, namespace)  # noqa: S102
    return functools.partial(namespace["process_response"], None)


def transformers_clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (what THUDM's decode applied)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    return PreTrainedTokenizerBase.clean_up_tokenization(None, text)


def random_texts(count: int, seed: int = 0, alphabet: list[str] = ALPHABET, longest: int = 16) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) for _ in range(count)]


def feed(text_stream: TextStream, ids: list[int]) -> tuple[list[str], str]:
    """Ids given to a text stream one more at a time, as the decoder does, then finished:
    (the pieces sent, the final text)."""
    pieces = [text_stream.update(ids[:n]) for n in range(1, len(ids) + 1)]
    pieces.append(text_stream.finish(ids))
    return pieces, text_stream.text


# -- without THUDM's venv: process_response and the stream on strings ----------------------------

def test_process_response_is_thudms():
    thudm = thudm_process_response()
    texts = ["你好,我是助手!", "a,b!c:d;e?f", "中,a a,中 中,中 ,中 中, ,,中", "[[训练时间]],好", " 你好?  ", "",
             "结尾,!?:;", "!?:;,开头", "中\\?中", *random_texts(2000)]
    for text in texts:
        assert process_response(text) == thudm(text), repr(text)


def test_a_streamed_reply_joins_to_thudms_text_at_every_step():
    """Character by character (each id one character), what is sent never has to be taken back:
    the pieces join to THUDM's ``process_response`` of the cleaned-up text."""
    thudm = thudm_process_response()
    reply = ReplyText((transformers_clean_up, replies.rewrite), (clean_up_separable, replies.separable),
                      cleans_up=True)
    texts = random_texts(2000, seed=1) + random_texts(6000, seed=2, alphabet=HOSTILE, longest=12)
    streamed_early = 0
    for text in texts:
        text_stream = TextStream(lambda ids: "".join(map(chr, ids)), [], strip=True, reply=reply)
        pieces, final = feed(text_stream, list(map(ord, text)))
        assert final == thudm(transformers_clean_up(text)), repr(text)
        assert "".join(pieces) == final, repr(text)
        streamed_early += any(pieces[:-1])
    assert streamed_early > len(texts) / 2  # most answers are not held to the end


# -- THUDM's decode and chat text for answer ids (the reference venv) ------------------------------

@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(tmp_path_factory.mktemp("chattune-cache")))
        yield


@pytest.fixture(scope="module")
def reference(thudm_reference, native_cache):
    out = thudm_reference(FAMILY)
    data = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    assert not data["errors"], data["errors"]
    assert len(data["replies"]) > 300
    return out, data


@pytest.fixture(scope="module")
def run(reference):
    out, _ = reference
    return load_run(str(out / "model"), LoadOptions())


def test_the_reply_steps_are_chatglm6b_s_chat_answers_only(run, char_tokenizer):
    """ChatGLM-6B's chat answers get the clean-up and process_response, whatever the template; its
    plain completions (``/v1/completions``) the clean-up alone; another model's neither."""
    chat, plain = reply_text(run.tokenizer, chat=True), reply_text(run.tokenizer, chat=False)
    assert chat.apply("你好 , 世界 !") == "你好， 世界！" and chat.cleans_up
    assert plain.apply("你好 , 世界 !") == "你好, 世界!" and plain.cleans_up
    assert reply_text(char_tokenizer, chat=True) is None


def test_decoding_answer_ids_gives_thudms_text(run, reference):
    """The tokenizer's decode (spaces before punctuation cleaned up) equals THUDM's."""
    _, data = reference
    for case in data["replies"]:
        assert run.tokenizer.decode(case["ids"]) == case["decoded"], case["ids"]


def test_every_reply_is_thudms_chat_text_finished_and_streamed(run, reference):
    """The reply text of each answer's ids, as the decoder makes it, is ``chat()``'s; the
    pieces streamed on the way join to it."""
    _, data = reference
    served = run.profile()
    assert served.template == "chatglm"
    differs = 0
    for case in data["replies"]:
        seq = sequence(run, served, [0], SamplingParams(max_tokens=len(case["ids"]) + 1))
        pieces, final = feed(seq.text, case["ids"])
        assert final == case["response"], (case["ids"], case["decoded"])
        assert "".join(pieces) == final, case["ids"]
        differs += case["response"] != case["decoded"].strip()
    assert differs > 50  # the cases do test process_response


def force(monkeypatch, model, ids: list[int]) -> None:
    """Make ``model`` answer ``ids`` (then ``<eop>``) whatever the prompt: each forward pass adds
    1e4 to the logit of the next id (the signature stays the model's own)."""
    original = model.forward
    script = [*ids, 130005]
    calls = [0]

    @functools.wraps(original)
    def forced(*args, **kwargs):
        out = original(*args, **kwargs)
        if calls[0] < len(script):
            out.logits[:, -1, script[calls[0]]] += 1e4
        calls[0] += 1
        return out

    monkeypatch.setattr(model, "forward", forced)


@pytest.mark.parametrize("text", FORCED)
def test_chat_predict_and_serve_reply_thudms_text(run, reference, text, tmp_path):
    """An answer the model writes, through every consumer: ``answer`` (predict and eval's
    batches), ``stream`` (the terminal chat), ``chattune predict``'s file, the chat loop and the
    server, streamed or not: each gives THUDM's ``chat()`` text for the answer's ids."""
    from chattune.chat import chat_loop
    from chattune.predict import predict_file
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from tests.serve.server_thread import ServerThread

    _, data = reference
    case = next(c for c in data["replies"] if c["text"] == text)
    expected, most = case["response"], len(case["ids"]) + 4
    assert expected != run.decode(case["ids"], clean_up=False).strip()  # the clean-up or process_response acts

    def answering(call, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            force(patch, run.model, case["ids"])
            return call(*args, **kwargs)

    (seq,) = answering(answer, run, [ASK], max_new_tokens=most)
    assert seq.generated == [*case["ids"], 130005] and seq.error is None
    assert seq.text.text == expected
    assert "".join(answering(lambda: list(stream(run, ASK, max_new_tokens=most)))) == expected

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "你好", "output": "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    answering(predict_file, run, str(rows), str(tmp_path / "pred.jsonl"), max_new_tokens=most, log=lambda *_: None)
    (line,) = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    assert line["prediction"] == expected and "error" not in line

    out = io.StringIO()
    answering(chat_loop, run, stdin=io.StringIO("你好\n/exit\n"), stdout=out, max_new_tokens=most)
    assert f"Assistant: {expected}\n" in out.getvalue()

    engine = Engine(run.model, pad_token_id=run.tokenizer.pad_token_id)
    engine.start()
    server = ServerThread(create_app(run, engine, ui=False)).start()
    url = f"{server.url}/v1/chat/completions"
    body = {"model": run.default, "messages": ASK, "max_tokens": most, "temperature": 0}

    def streamed() -> str:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    try:
        reply = answering(lambda: httpx.post(url, json=body, timeout=60).json())
        assert reply["choices"][0]["message"]["content"] == expected
        assert answering(streamed) == expected
    finally:
        server.stop()
        engine.stop()
