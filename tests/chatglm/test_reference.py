"""The THUDM reference itself (thudm_reference.py run in the transformers-4.33 venv): it runs for every
family and writes what the parity tests read. Nothing of chattune is exercised here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
TEXTS = json.loads((Path(__file__).with_name("texts.json")).read_text(encoding="utf-8"))
VOCAB = {"chatglm-6b": 130528, "chatglm2-6b": 65024, "chatglm3-6b": 65024}
TOKENIZER_FILE = {"chatglm-6b": "ice_text.model", "chatglm2-6b": "tokenizer.model", "chatglm3-6b": "tokenizer.model"}
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
# the official ids (config.json of each official repo; chatglm2/3: 64789 sentencepiece pieces + specials)
KNOWN_IDS = {
    "chatglm-6b": {"[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005},
    "chatglm2-6b": {"[MASK]": 64789, "[gMASK]": 64790, "sop": 64792, "eop": 64793, "</s>": 2},
    "chatglm3-6b": {"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795,
                    "<|assistant|>": 64796, "<|observation|>": 64797, "</s>": 2},
}
SCHEMA = {
    "family": str, "transformers_version": str, "special_tokens": dict, "encode": list, "decode": list,
    "prompts": list, "logits": list, "greedy": list, "errors": list, "reload": dict, "init": dict,
    "save": dict, "tokenizer_attrs": dict, "timings": dict,
}


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


@pytest.fixture(params=FAMILIES)
def ref(request, thudm_reference):
    out = thudm_reference(request.param)
    return request.param, out, json.loads((out / "reference.json").read_text(encoding="utf-8"))


def test_reference_json_has_every_key(ref):
    family, _, data = ref
    for key, kind in SCHEMA.items():
        assert isinstance(data.get(key), kind), key
    assert data["family"] == family
    assert data["transformers_version"] == "4.33.3"
    assert data["errors"] == [], "a THUDM call failed on transformers 4.33.3"

    assert [e["text"] for e in data["encode"]] == TEXTS == [d["text"] for d in data["decode"]]
    for enc, dec in zip(data["encode"], data["decode"], strict=True):
        assert _is_ids(enc["ids"]) and _is_ids(enc["ids_with_specials"]), enc["text"]
        assert isinstance(dec["decoded"], str) and isinstance(dec["decoded_with_specials"], str)
        assert dec["ids"] == enc["ids"]

    names = [p["name"] for p in data["prompts"]]
    expected = ["zh_no_history", "en_no_history", "zh_one_turn", "en_two_turns"]
    assert names == expected + (["zh_system"] if family == "chatglm3-6b" else [])
    for p in data["prompts"]:
        assert _is_ids(p["ids"]) and p["ids"], p["name"]
        assert isinstance(p["query"], str) and isinstance(p["history"], list)
        assert all(isinstance(h, list) and len(h) == 2 for h in p["history"])
        assert (p["prompt_text"] is None) == (family == "chatglm3-6b")
    tool_names = [p["name"] for p in data["tool_prompts"]]
    assert tool_names == (["tool_prompt", "tool_prompt_text_first", "tool_train"] if family == "chatglm3-6b" else [])
    for p in data["tool_prompts"]:
        assert _is_ids(p["ids"]) and p["ids"] and isinstance(p["messages"], list), p["name"]
        if p["name"].endswith("_train"):  # the finetune demo's labels: -100 or the token itself
            assert len(p["labels"]) == len(p["ids"])
            assert all(label in (-100, i) for label, i in zip(p["labels"], p["ids"], strict=True))

    # the saved folder, loaded back with THUDM's code, reproduces the reference exactly
    assert data["reload"]["logits_max_abs_diff"] == [0.0, 0.0, 0.0]
    assert data["reload"]["tokenizer_encode_identical"] is True


def test_special_token_ids(ref):
    family, _, data = ref
    special = data["special_tokens"]
    assert all(isinstance(v, int) for v in special.values()), special
    for token, token_id in KNOWN_IDS[family].items():
        assert special[token] == token_id, token
    if family == "chatglm-6b":  # [gMASK] <sop> come after the text
        assert data["encode"][0]["ids_with_specials"][-2:] == [special["[gMASK]"], special["<sop>"]]
    else:  # [gMASK] sop before it
        assert data["encode"][0]["ids_with_specials"][:2] == [special["[gMASK]"], special["sop"]]


def test_logits_file_loads(ref):
    import torch

    family, out, data = ref
    tensors = torch.load(out / "logits.pt", weights_only=True)
    assert [e["name"] for e in data["logits"]] == ["prompt", "one_token", "mixed_20"]
    assert len(tensors) == len(data["logits"])
    assert data["logits"][0]["input_ids"] == data["prompts"][0]["ids"]
    for entry, logits in zip(data["logits"], tensors, strict=True):
        assert logits.dtype == torch.float32
        assert tuple(logits.shape) == (len(entry["input_ids"]), VOCAB[family]) == tuple(entry["shape"])
        assert torch.isfinite(logits).all()
    assert len(data["logits"][1]["input_ids"]) == (3 if family == "chatglm-6b" else 1)
    assert len(data["logits"][2]["input_ids"]) == 20


def test_greedy_is_robust_and_chat_matches(ref):
    _, _, data = ref
    assert [g["name"] for g in data["greedy"]] == [p["name"] for p in data["prompts"]]
    for g in data["greedy"]:
        assert 1 <= len(g["output_ids"]) <= 12 and _is_ids(g["output_ids"]), g["name"]
        assert len(g["gaps"]) == len(g["output_ids"])
        assert g["min_gap"] > 1e-4 and math.isclose(g["min_gap"], min(g["gaps"])), g["name"]
        assert len(set(g["output_ids"])) > 1, f"{g['name']}: degenerate greedy output"
        chat = g["chat"]
        assert "error" not in chat, chat.get("error")
        assert chat["input_ids_equal_prompt_ids"] is True
        # chat() is greedy too: what it generated starts like generate()'s output
        assert g["output_ids"][: len(chat["output_ids"])] == chat["output_ids"]
        assert isinstance(chat["response"], (str, dict)) and isinstance(chat["history"], list)
        assert chat["called_with"]["max_length"] == len(g["input_ids"]) + 12


def test_saved_model_folder_looks_downloaded(ref, fixture_dir):
    family, out, data = ref
    model = out / "model"
    src = fixture_dir(family)
    files = {p.name for p in model.iterdir()}
    expected = {"config.json", "tokenizer_config.json", TOKENIZER_FILE[family], *REMOTE_CODE}
    assert expected <= files, expected - files
    for name in expected:  # byte-identical to the published files (config.json: the tiny one)
        assert (model / name).read_bytes() == (src / name).read_bytes(), name
    assert "generation_config.json" not in files

    index_name = {"chatglm-6b": "pytorch_model.bin.index.json", "chatglm3-6b": "model.safetensors.index.json"}
    if family in index_name:  # sharded
        index = json.loads((model / index_name[family]).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and shards <= files
        suffix = ".bin" if family == "chatglm-6b" else ".safetensors"
        assert {f for f in files if f.endswith(suffix)} == shards
        if family == "chatglm-6b":  # both halves of the tied pair, as in the official checkpoint
            assert {"lm_head.weight", "transformer.word_embeddings.weight"} <= set(index["weight_map"])
    else:
        assert "pytorch_model.bin" in files
        assert not any(f.endswith(".safetensors") or f.endswith(".index.json") for f in files)
    assert sorted(files) == data["save"]["files"]
