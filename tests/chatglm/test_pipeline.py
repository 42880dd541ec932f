"""What a user runs on THUDM's ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B, end to end, on tiny models.

For each family a folder as downloaded from THUDM (remote code, tokenizer, a tiny config and random
weights in ``pytorch_model.bin``, built by :func:`tests.chatglm.thudm_folder.build_thudm_folder` from
``../shared/fixtures/chatglm``) goes through the whole pipeline with its real tokenizer:
``chattune data prepare`` (the audit, the template ``auto`` picks, the encoded ids and labels),
training with LoRA, freeze and P-Tuning v2 on the THUDM path, reloading the run folders, chat with
history (the decoder against the model's own greedy decoding, batched against alone, the terminal
chat loop), predict, serve with the official ``openai`` client, and the stop tokens.

Every family's THUDM folder is built and its three runs trained once per module; converted native
folders (and encoded data sets) live in one cache for the whole module (``CHATTUNE_CACHE``).
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chattune.chatglm import native_model_path, thudm_family
from chattune.inference.generate import answer, generate
from chattune.inference.runs import LoadOptions, load_run

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "chatglm"
FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
METHODS = ("lora", "freeze", "ptuning")
TEMPLATES = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}
STOP_IDS = {"chatglm-6b": {130005}, "chatglm2-6b": {2}, "chatglm3-6b": {2, 64795, 64797}}
GLM6B_GMASK, GLM6B_SOP, GLM6B_EOP = 130001, 130004, 130005
GLM_GMASK, GLM_SOP, GLM_EOS = 64790, 64792, 2
GLM2_EOP, GLM3_USER, GLM3_ASSISTANT = 64793, 64795, 64796
IGNORE = -100

HISTORY = [{"role": "user", "content": "你好"},
           {"role": "assistant", "content": "你好！我是一个人工智能助手。"},
           {"role": "user", "content": "What are the three primary colors?"}]
CONVERSATIONS = [  # three lengths, with and without a system message and history
    [{"role": "user", "content": "Who are you?"}],
    HISTORY,
    [{"role": "system", "content": "You are brief."},
     {"role": "user", "content": "中国的首都是哪里？请详细说明一下，谢谢。"}],
]
QUESTION, ANSWER = "What are the three primary colors?", "Red, blue and yellow."
PREPARE_ROWS = [
    {"instruction": QUESTION, "input": "", "output": ANSWER},
    {"instruction": "中国的首都是哪里？", "input": "", "output": "北京。"},
    {"instruction": "And the capital of France?", "input": "", "output": "Paris.",
     "history": [["Who are you?", "I am an assistant."]]},
    {"instruction": "Summarise.", "input": "A long text.", "output": "A summary.", "system": "You are brief."},
    {"instruction": "", "input": "", "output": "a bad row: no instruction"},  # skipped when read
    {"instruction": QUESTION, "input": "", "output": ANSWER},  # a duplicate
    {"instruction": "Hi", "input": "", "output": "Hello.",  # its system text alone fills max_seq_length
     "system": " ".join(["the quick brown fox jumps over the lazy dog"] * 30)},
]
MAX_SEQ_LENGTH = 96


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """One CHATTUNE_CACHE for the module: the converted native folders and encoded data sets."""
    path = tmp_path_factory.mktemp("chatglm-pipeline-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _isolated_cache(native_cache, monkeypatch):
    """(Overrides conftest's per-test cache.) Every test of this module uses the module's cache,
    so a THUDM folder is converted once, not once per test."""
    monkeypatch.setenv("CHATTUNE_CACHE", str(native_cache))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def thudm_folder(family, native_cache, tmp_path_factory) -> Path:
    """A folder as downloaded from THUDM/<family>, with tiny random weights."""
    from tests.chatglm.thudm_folder import build_thudm_folder

    source = FIXTURES / family
    if not (source / "config.json").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {source} (a clone without ../shared)")
    return build_thudm_folder(tmp_path_factory.mktemp(f"thudm-{family}") / family, source)


@pytest.fixture(scope="module")
def base(thudm_folder):
    """The bare THUDM model, loaded the way chat/predict/serve load a base model."""
    return load_run(str(thudm_folder), LoadOptions())


@pytest.fixture(scope="module")
def trained(thudm_folder, data_file, tmp_path_factory) -> dict:
    """method -> TrainResult: LoRA, freeze and P-Tuning v2, four steps each, on the THUDM path."""
    from chattune.training.recipe import train
    from tests.training.test_recipe import make_config

    root = tmp_path_factory.mktemp(f"runs-{thudm_folder.name}")
    results = {}
    for method in METHODS:
        config = make_config(thudm_folder, data_file, root / method, method=method, max_steps=4, save_steps=4,
                             logging_steps=1, eval_fraction=0.0, report_to=["none"], learning_rate=5e-3,
                             max_seq_length=MAX_SEQ_LENGTH)
        results[method] = train(config, log=lambda *_: None)
    return results


@pytest.fixture(scope="module")
def runs(trained) -> dict:
    """method -> the run folder reloaded as chat/predict/serve load it."""
    return {method: load_run(str(result.output_dir), LoadOptions()) for method, result in trained.items()}


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def greedy_without_cache(model, ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy decoding by running the whole sequence again for every token: the model's own
    forward pass as training computes it (no KV cache, no generation helpers)."""
    ids, out = list(ids), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def hf_greedy(run, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' ``generate``, greedy, stopping on the profile's stop tokens."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = run.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=sorted(run.profile().stop_token_ids),
                                 pad_token_id=run.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def boost_token(monkeypatch, model, token: int, from_call: int = 2) -> None:
    """Make ``model`` pick ``token`` from its ``from_call``-th forward pass on (1: the prefill),
    by adding 1e4 to that token's logit (the signature stays the model's own)."""
    original = model.forward
    calls = [0]

    @functools.wraps(original)
    def boosted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= from_call:
            out.logits[..., token] += 1e4
        return out

    monkeypatch.setattr(model, "forward", boosted)


# -- 1. data prepare with the real tokenizer ---------------------------------------------------

def expected_row(family: str, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the QUESTION/ANSWER row as THUDM's fine-tuning code builds it."""
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    if family == "chatglm-6b":  # ChatGLM-6B ptuning main.py: prompt + [gMASK] <sop> + answer + <eop>
        prompt, answer_ids = enc(QUESTION) + [GLM6B_GMASK, GLM6B_SOP], enc(ANSWER) + [GLM6B_EOP]
    elif family == "chatglm2-6b":  # ChatGLM2-6B: [gMASK] sop build_prompt(q) + answer + </s>
        prompt = [GLM_GMASK, GLM_SOP] + enc(f"[Round 1]\n\n问：{QUESTION}\n\n答：")
        answer_ids = enc(ANSWER) + [GLM_EOS]
    else:  # ChatGLM3-6B finetune demo: build_single_message per message, </s> at the end
        prompt = [GLM_GMASK, GLM_SOP, GLM3_USER] + enc("\n") + enc(QUESTION) + [GLM3_ASSISTANT]
        answer_ids = enc("\n") + enc(ANSWER) + [GLM_EOS]
    return prompt + answer_ids, [IGNORE] * len(prompt) + answer_ids


def test_data_prepare_audits_every_row_and_encodes_as_thudm(family, thudm_folder, base, tmp_path, capsys):
    from datasets import load_from_disk

    from chattune.cli import main

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(PREPARE_ROWS, ensure_ascii=False), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"model_name_or_path: {thudm_folder}\ntrain_files: [{data}]\n"
                      f"max_seq_length: {MAX_SEQ_LENGTH}\neval_fraction: 0.0\n", encoding="utf-8")
    assert main(["data", "prepare", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"template {TEMPLATES[family]}  max_seq_length {MAX_SEQ_LENGTH}" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("encoded and cached data set at ")
    cache = Path(last.rsplit(" at ", 1)[1])
    audit = json.loads((cache / "audit.json").read_text(encoding="utf-8"))

    assert audit["template"] == TEMPLATES[family]
    (read,) = audit["files"]
    assert (read["read"], read["converted"], read["skipped"], read["duplicated"], read["kept"]) == (7, 5, 1, 1, 5)
    assert read["read"] == read["converted"] + read["skipped"] + read["duplicated"]
    assert read["skipped_reasons"] == {"empty user message": 1}
    split = audit["train"]
    assert split["rows_in"] == read["kept"] == 5
    assert (split["rows_out"], split["rows_dropped"]) == (4, 1)
    assert split["rows_out"] + split["rows_dropped"] == split["rows_in"]
    assert split["dropped_reasons"] == {"prompt fills max_seq_length: no answer token would remain": 1}
    assert audit["eval"] is None

    rows = load_from_disk(str(cache / "train"))
    assert len(rows) == split["rows_out"]
    encoded = [(list(r["input_ids"]), list(r["labels"])) for r in rows]
    assert expected_row(family, base.tokenizer) in encoded
    assert sum(len(ids) for ids, _ in encoded) == split["tokens"]
    end = GLM6B_EOP if family == "chatglm-6b" else GLM_EOS
    for ids, labels in encoded:
        assert len(ids) == len(labels) <= MAX_SEQ_LENGTH
        assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))
        assert ids[-1] == labels[-1] == end and ids.count(end) == 1
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        if family == "chatglm-6b":
            sop = ids.index(GLM6B_SOP)
            assert ids[sop - 1] == GLM6B_GMASK and labels[sop] == IGNORE
            assert all(label != IGNORE for label in labels[sop + 1:])  # the last answer and <eop>
        else:
            assert ids[:2] == [GLM_GMASK, GLM_SOP] and labels[:2] == [IGNORE, IGNORE]
            assert GLM_GMASK not in ids[2:] and GLM_SOP not in ids[2:]
        if family == "chatglm3-6b":
            assert ids[first - 1] == GLM3_ASSISTANT and GLM3_USER in ids[:first]
            assert labels[ids.index(GLM3_USER)] == IGNORE
    if family == "chatglm3-6b":
        single, _ = expected_row(family, base.tokenizer)
        assert single.count(GLM3_USER) == 1 and single.count(GLM3_ASSISTANT) == 1
        assert "<|user|>" not in base.tokenizer.decode(single[3:], skip_special_tokens=True)


# -- 2. training on the THUDM path --------------------------------------------------------------

def test_training_writes_run_folders_that_name_both_folders(family, thudm_folder, trained):
    native = native_model_path(str(thudm_folder))
    assert thudm_family(thudm_folder) == family
    marker = json.loads((Path(native) / "chattune_native.json").read_text())
    assert marker["family"] == family and marker["template"] == TEMPLATES[family]
    assert marker["source"] == str(thudm_folder.resolve())
    for method, result in trained.items():
        folder = result.output_dir
        assert folder.is_dir() and result.global_step == 4
        manifest = json.loads((folder / "chattune.json").read_text())
        assert manifest["base_model"]["path"] == str(thudm_folder.resolve())
        assert manifest["base_model"]["native_path"] == native
        assert manifest["template"]["name"] == TEMPLATES[family]
        assert manifest["method"]["name"] == method
        assert manifest["max_seq_length"] == MAX_SEQ_LENGTH and manifest["global_step"] == 4
        losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    lora = json.loads((trained["lora"].output_dir / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA"
    if family == "chatglm-6b":  # THUDM's LoRA recipes: the fused QKV
        assert lora["target_modules"] == ["query_key_value"]
    else:  # transformers' GLM: every linear projection of every block
        assert set(lora["target_modules"]) == {f"model.layers.{i}.{name}" for i in range(2) for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_up_proj", "mlp.down_proj")}
    prefix = json.loads((trained["ptuning"].output_dir / "adapter_config.json").read_text())
    assert prefix["peft_type"] == "PREFIX_TUNING" and prefix["num_virtual_tokens"] == 16
    frozen = json.loads((trained["freeze"].output_dir / "freeze_config.json").read_text())["trained_tensors"]
    mlp = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") if family == "chatglm-6b" else ("mlp.gate_up_proj", "mlp.down_proj")
    block = "transformer.layers" if family == "chatglm-6b" else "model.layers"
    kinds = ("weight", "bias") if family == "chatglm-6b" else ("weight",)
    assert set(frozen) == {f"{block}.{i}.{name}.{kind}" for i in range(2) for name in mlp for kind in kinds}


# -- 3. reloaded runs --------------------------------------------------------------------------

def test_reloaded_runs_are_the_trained_models_and_differ_from_the_base(family, base, runs, trained):
    assert base.default == "base" and base.profile().template == TEMPLATES[family]
    assert base.context_length == 512
    ids = base.prompt_ids(HISTORY)
    before = logits_of(base.model, ids)
    for method, run in runs.items():
        profile = run.profile()
        assert profile.name == method and profile.template == TEMPLATES[family]
        assert run.prompt_ids(HISTORY) == ids
        after = logits_of(run.model, ids)
        assert (after - before).abs().max() > 1e-3, f"{method}: the trained weights change nothing"
        torch.testing.assert_close(after, logits_of(trained[method].model, ids), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, method=method: f"{method}: reloaded != trained: {m}")


# -- 4. chat with history ------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_answer_with_history_is_the_models_greedy_decoding(runs, method):
    run = runs[method]
    ids = run.prompt_ids(HISTORY)
    (seq,) = answer(run, [HISTORY], max_new_tokens=8)
    assert seq.prompt_ids == ids and 1 <= len(seq.generated) <= 8
    assert seq.generated == greedy_without_cache(run.model, ids, 8, run.profile().stop_token_ids)
    if method != "ptuning":
        # (not for P-Tuning v2: with peft 0.21 on transformers 5, generate() loses the prefix, which
        # peft puts in past_key_values while generate passes its own empty cache as cache=)
        assert seq.generated == hf_greedy(run, ids, 8)


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_gives_each_conversation_its_tokens_alone(runs, method):
    run = runs[method]
    lengths = {len(run.prompt_ids(c)) for c in CONVERSATIONS}
    assert len(lengths) == 3
    together = answer(run, CONVERSATIONS, max_new_tokens=6)
    alone = [answer(run, [c], max_new_tokens=6)[0] for c in CONVERSATIONS]
    assert [s.generated for s in together] == [s.generated for s in alone]
    assert [s.text.text for s in together] == [s.text.text for s in alone]


def test_chat_loop_carries_the_history(runs, monkeypatch):
    import chattune.chat

    run = runs["lora"]
    seen = []
    original = chattune.chat.generate.stream

    def recording(loaded, messages, **kw):
        seen.append([dict(m) for m in messages])
        yield from original(loaded, messages, **kw)

    monkeypatch.setattr(chattune.chat.generate, "stream", recording)
    out = io.StringIO()
    chattune.chat.chat_loop(run, stdin=io.StringIO("你好\nWhat are the three primary colors?\n/exit\n"),
                            stdout=out, max_new_tokens=6)
    assert len(seen) == 2
    first = generate(run, [seen[0]], max_new_tokens=6)[0]
    assert seen[0] == [{"role": "user", "content": "你好"}]
    assert seen[1] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "What are the three primary colors?"}]
    second = generate(run, [seen[1]], max_new_tokens=6)[0]
    text = out.getvalue()
    assert f"Assistant: {first}\n" in text and f"Assistant: {second}\n" in text
    assert text.count("Assistant: ") == 2


# -- 5. predict --------------------------------------------------------------------------------

def test_predict_file_writes_one_prediction_per_row(runs, tmp_path):
    from chattune.predict import predict_file

    run = runs["lora"]
    questions = ["Who are you?", "中国的首都是哪里？", QUESTION]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "x"}, ensure_ascii=False) + "\n"
                            for q in questions), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    assert predict_file(run, str(data), str(out), max_new_tokens=6, log=lambda *_: None) == 3
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3
    assert [line["prompt"] for line in lines] == [[{"role": "user", "content": q}] for q in questions]
    assert all(line["reference"] == "x" and isinstance(line["prediction"], str) for line in lines)
    expected = generate(run, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=6)
    assert [line["prediction"] for line in lines] == expected


# -- 6. serve ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(trained):
    """``chattune serve`` on the LoRA run: its own loaded run and engine, on a loopback port."""
    from chattune.serve import set_threads
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from tests.serve.server_thread import ServerThread

    threads = torch.get_num_threads()
    set_threads(None)  # as chattune serve does
    served = load_run(str(trained["lora"].output_dir), LoadOptions())
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, use_adapters=served.uses_adapters)
    engine.start()
    thread = ServerThread(create_app(served, engine)).start()
    try:
        yield SimpleNamespace(url=thread.url, served=served, engine=engine)
    finally:
        thread.stop()
        engine.stop()
        torch.set_num_threads(threads)


def test_serve_answers_the_openai_client_with_history(server, runs, monkeypatch):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"lora", "base"}
    raw = client.chat.completions.with_raw_response.create(model="lora", messages=HISTORY, max_tokens=6,
                                                           temperature=0, extra_body={"ignore_eos": True})
    assert raw.http_response.status_code == 200
    reply = raw.parse()
    text = reply.choices[0].message.content
    assert reply.model == "lora" and reply.choices[0].message.role == "assistant"
    assert isinstance(text, str) and text.strip()
    expected = answer(runs["lora"], [HISTORY], max_new_tokens=6, ignore_eos=True)[0]
    assert text == expected.text.text
    assert reply.usage.prompt_tokens == len(runs["lora"].prompt_ids(HISTORY))
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(model="lora", messages=HISTORY, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]

    # the profile's stop token ends the answer over HTTP too, and is not in the text
    one = client.chat.completions.create(model="lora", messages=HISTORY, max_tokens=1, temperature=0)
    stop = min(server.served.profile("lora").stop_token_ids)
    boost_token(monkeypatch, server.served.model, stop)
    stopped = client.chat.completions.create(model="lora", messages=HISTORY, max_tokens=6, temperature=0)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == one.choices[0].message.content
    assert stopped.usage.completion_tokens == 2


# -- 7. stop tokens ------------------------------------------------------------------------------

def test_the_stop_tokens_are_the_familys(family, base, runs):
    assert set(base.profile().stop_token_ids) == STOP_IDS[family]
    for run in runs.values():
        assert set(run.profile().stop_token_ids) == STOP_IDS[family]
    tokenizer = base.tokenizer
    names = {"chatglm-6b": ["<eop>"], "chatglm2-6b": ["</s>"], "chatglm3-6b": ["</s>", "<|user|>", "<|observation|>"]}
    assert {tokenizer.convert_tokens_to_ids(name) for name in names[family]} == STOP_IDS[family]


def test_decoding_ends_on_each_stop_token(family, base):
    """Forced at the second step, each stop token ends the answer (finish reason ``stop``) and
    leaves the text of the first token alone."""
    import chattune.inference.generate

    (first,) = answer(base, [HISTORY], max_new_tokens=1)
    assert len(first.generated) == 1 and first.generated[0] not in STOP_IDS[family]
    for stop in sorted(STOP_IDS[family]):
        events = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(chattune.inference.generate, "_ignore", events.append)
            boost_token(patch, base.model, stop)
            (seq,) = answer(base, [HISTORY], max_new_tokens=6)
        assert seq.generated == [*first.generated, stop], stop
        done = [e for e in events if e.kind == "done"]
        assert len(done) == 1 and done[0].finish_reason == "stop" and done[0].completion_tokens == 2
        assert seq.text.text == first.text.text
        assert base.tokenizer.convert_ids_to_tokens(stop) not in seq.text.text


def test_a_special_token_that_is_not_a_stop_token_does_not_end_decoding(family, base, monkeypatch):
    import chattune.inference.generate

    other = {"chatglm-6b": GLM6B_SOP, "chatglm2-6b": GLM2_EOP, "chatglm3-6b": GLM3_ASSISTANT}[family]
    events = []
    monkeypatch.setattr(chattune.inference.generate, "_ignore", events.append)
    boost_token(monkeypatch, base.model, other)
    (seq,) = answer(base, [HISTORY], max_new_tokens=4)
    assert seq.generated[1:] == [other] * 3
    assert [e.finish_reason for e in events if e.kind == "done"] == ["length"]

