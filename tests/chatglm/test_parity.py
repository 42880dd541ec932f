"""chattune's ChatGLM-6B / 2 / 3 against THUDM's own code.

The reference (``thudm_reference.py``, run in a second venv with transformers 4.33.3,
see ``conftest.py``) builds each family's tiny model from THUDM's remote code with
random weights, saves it as a downloaded folder would be, and records THUDM's token
ids, chat prompt ids, float32 logits, greedy tokens and ``chat()`` outputs. Here
chattune loads that same folder (converting it) and must give the same numbers.
"""

from __future__ import annotations

import json

import pytest
import torch

from chattune.chatglm import native_model_path, thudm_family
from chattune.data.encode import EncodeOptions, PieceEncoder, encode_conversation, encode_prompt
from chattune.inference.generate import answer
from chattune.inference.runs import LoadOptions, load_run

FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
TEMPLATES = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(tmp_path_factory.mktemp("chattune-cache")))
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def reference(thudm_reference, family, native_cache):
    out = thudm_reference(family)
    data = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    assert not data["errors"], data["errors"]
    return out, data


@pytest.fixture(scope="module")
def run(reference):
    out, _ = reference
    return load_run(str(out / "model"), LoadOptions())


def _messages(case: dict) -> list[dict]:
    messages = [{"role": "system", "content": case["system"]}] if case.get("system") else []
    for user, assistant in case["history"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": case["query"]}]


def test_the_downloaded_folder_is_recognised_and_converted(reference, family):
    out, _ = reference
    assert thudm_family(out / "model") == family
    native = native_model_path(str(out / "model"))
    marker = json.loads((__import__("pathlib").Path(native) / "chattune_native.json").read_text())
    assert marker["family"] == family and marker["template"] == TEMPLATES[family]
    assert native_model_path(str(out / "model")) == native  # converted once, then reused


def test_every_special_token_has_thudms_id(run, reference):
    _, data = reference
    tokenizer = run.tokenizer
    for token, token_id in data["special_tokens"].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token


def test_token_ids_equal_thudms_on_every_text(run, reference):
    """Chinese, English, mixed, code, whitespace runs, tabs, newlines, emoji, rare CJK, and the
    special tokens' strings inside text (which THUDM's ChatGLM2/3 keep as text)."""
    _, data = reference
    tokenizer = run.tokenizer
    assert len(data["encode"]) >= 40
    for entry in data["encode"]:
        assert "error" not in entry, entry
        text = entry["text"]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == entry["ids"], repr(text)
        assert tokenizer(text)["input_ids"] == entry["ids_with_specials"], repr(text)


def test_decoding_the_text_ids_gives_thudms_text(run, reference, family):
    _, data = reference
    for entry in data["decode"]:
        if "error" in entry:
            continue
        assert run.tokenizer.decode(entry["ids"]) == entry["decoded"], repr(entry["text"])


def test_templates_give_the_ids_of_thudms_chat_prompt(run, reference, family):
    """chatglm: ``chat()``'s prompt + tokenizer; chatglm2: ``build_prompt``; chatglm3:
    ``build_chat_input`` (with a system message too), with and without history."""
    _, data = reference
    assert run.profile().template == TEMPLATES[family]  # template auto picks it
    encoder = PieceEncoder(run.tokenizer)
    assert len(data["prompts"]) >= 4
    for case in data["prompts"]:
        assert encode_prompt(_messages(case), TEMPLATES[family], encoder) == case["ids"], case["name"]
        assert run.prompt_ids(_messages(case)) == case["ids"], case["name"]


def test_chatglm3_tool_calls_give_the_ids_and_labels_of_thudms_code(run, reference, family):
    """chatglm3 with tools: a prompt ending with a tool result gives the ids of THUDM's
    ``build_chat_input(result, history, role="observation")`` (tools in a first system message,
    a call as an assistant message with the function name as metadata, text before a call as
    its own message); a whole conversation gives the ids and labels of THUDM's
    finetune_chatmodel_demo ``format_conversation`` + MultiTurnDataset (calls and the
    <|observation|> after them trained, the result not)."""
    if family != "chatglm3-6b":
        pytest.skip("tool calling is ChatGLM3's")
    _, data = reference
    encoder = PieceEncoder(run.tokenizer)
    cases = {case["name"]: case for case in data["tool_prompts"]}
    assert set(cases) == {"tool_prompt", "tool_prompt_text_first", "tool_train"}
    for name in ("tool_prompt", "tool_prompt_text_first"):
        case = cases[name]
        assert encode_prompt(case["messages"], "chatglm3", encoder, tools=case["tools"]) == case["ids"], name
        assert run.prompt_ids(case["messages"], tools=case["tools"]) == case["ids"], name
    case = cases["tool_train"]
    encoded = encode_conversation(case["messages"], "chatglm3", encoder, EncodeOptions(4096), tools=case["tools"])
    assert encoded.input_ids == case["ids"]
    assert encoded.labels == case["labels"]
    assert encoded.supervised_call_tokens > 0 and encoded.tool_calls == 1


def _worst_logit_difference(model, out, data) -> tuple[float, float]:
    expected = torch.load(out / "logits.pt")
    worst, scale = 0.0, 0.0
    for case, want in zip(data["logits"], expected, strict=True):
        with torch.no_grad():
            got = model(input_ids=torch.tensor([case["input_ids"]]), use_cache=False).logits[0]
        assert got.shape == want.shape, case["name"]
        worst = max(worst, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return worst, scale


def test_logits_equal_thudms_in_float32(reference):
    """Eager attention (THUDM's arithmetic) within 1e-5; SDPA, chattune's default, within 1e-5
    of the logits' scale (it sums in another order)."""
    from transformers import AutoModelForCausalLM

    out, data = reference
    native = native_model_path(str(out / "model"))
    for attention, tolerance in (("eager", LOGIT_TOLERANCE), ("sdpa", None)):
        model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32, attn_implementation=attention)
        worst, scale = _worst_logit_difference(model.eval(), out, data)
        limit = tolerance if tolerance is not None else LOGIT_TOLERANCE * max(1.0, scale)
        assert worst <= limit, f"{attention}: max |logit difference| {worst:.3g} (logits up to {scale:.3g})"


def test_greedy_tokens_equal_thudms_generate(run, reference):
    """chattune's decoder (every prompt in one left-padded batch) gives THUDM's greedy
    tokens, up to the family's stop token, which it keeps as the last generated id."""
    _, data = reference
    stops = run.profile().stop_token_ids
    cases = {case["name"]: case for case in data["prompts"]}
    conversations = [_messages(cases[g["name"]]) for g in data["greedy"]]
    seqs = answer(run, conversations, max_new_tokens=12)
    for greedy, seq in zip(data["greedy"], seqs, strict=True):
        assert greedy["min_gap"] > 1e-4  # THUDM's argmax is unambiguous at every step
        expected = greedy["output_ids"]
        cut = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))
        assert seq.generated == expected[:cut], greedy["name"]


def test_chat_answers_like_thudms_chat(run, reference, family):
    """THUDM's ``chat()`` (its stop tokens, its history) against chattune's answer to the same
    conversation: the same token ids and the same text."""
    _, data = reference
    cases = {case["name"]: case for case in data["prompts"]}
    for greedy in data["greedy"]:
        chat = greedy["chat"]
        assert chat["input_ids_equal_prompt_ids"], greedy["name"]
        seq = answer(run, [_messages(cases[greedy["name"]])], max_new_tokens=12)[0]
        assert seq.generated == chat["output_ids"][:len(seq.generated)], greedy["name"]
        response = chat["response"]
        assert isinstance(response, str), greedy["name"]
        if family == "chatglm3-6b":  # its chat() drops the last generated token, eos or not
            assert run.decode(seq.generated[:-1]).strip() == response.strip(), greedy["name"]
        elif family == "chatglm-6b":  # process_response (tests/chatglm/test_replies.py) on both sides
            assert seq.text.text == response, greedy["name"]
        else:
            assert seq.text.text.strip() == response.strip(), greedy["name"]
