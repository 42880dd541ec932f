"""GGUF export: llama.cpp's converter on tiny models of each supported architecture (every
tensor read back and compared with the Hugging Face weights, the vocabulary in id order),
and refusals (the Modelfile written beside it: tests/export/test_modelfile.py).

The slow test runs the GGUF in llama.cpp (``llama-cpp-python``, where installed) and compares
greedy tokens with transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chattune.config import GenerateArgs
from chattune.errors import ChattuneError, ConfigError
from chattune.export.gguf import (
    SUPPORTED,
    check_gguf_architecture,
    export_gguf,
    read_gguf_summary,
    write_gguf,
)
from chattune.export.modelfile import write_modelfile

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm"
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "glm4": "Glm4ForCausalLM",
           "glm": "GlmForCausalLM"}


def _hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32, in PyTorch's shape."""
    from gguf import GGUFReader, dequantize

    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        [int(n) for n in reversed(t.shape.tolist())]) for t in GGUFReader(str(path)).tensors}


def _llama_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for LLaMA's q/k rows: per head, the two halves interleaved."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _expected(arch: str, model_dir: Path) -> dict[str, torch.Tensor]:
    """The HF tensors under their GGUF names (the gguf package's name map), in llama.cpp's
    layout (LLaMA's q/k permuted)."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[SUPPORTED[HF_ARCH[arch]]]
    names = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    expected = {}
    for name, tensor in _hf_tensors(model_dir).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, f"{name}: no GGUF name"
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            tensor = _llama_permute(tensor, heads)
        expected[gguf_name] = tensor.float()
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm4", "glm"])
def test_f16_gguf_holds_the_weights_and_vocabulary(arch, ggufs):
    from transformers import AutoTokenizer

    model_dir, path = ggufs(arch)
    summary = read_gguf_summary(path)
    assert check_gguf_architecture(model_dir) == HF_ARCH[arch]
    assert summary["architecture"] == SUPPORTED[HF_ARCH[arch]]
    assert summary["file_type"] == 1  # MOSTLY_F16

    expected, stored = _expected(arch, model_dir), _gguf_tensors(path)
    assert sorted(stored) == sorted(expected) == sorted(summary["tensors"])
    for name in ("token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight",
                 "blk.1.ffn_down.weight"):
        assert name in stored
    for name, want in expected.items():
        info = summary["tensors"][name]
        assert info["shape"] == list(want.shape), name
        assert info["type"] == ("F16" if want.dim() == 2 else "F32"), name
        if info["type"] == "F16":
            want = want.half().float()
        np.testing.assert_array_equal(stored[name], want.numpy(), err_msg=name)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    assert summary["tokenizer"]["tokens"] == sorted(vocab, key=vocab.get)
    assert summary["tokenizer"]["model"] == "gpt2" and summary["tokenizer"]["pre"] == "gpt-2"
    assert summary["tokenizer"]["eos_id"] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def exported_q8_0(tiny_models, tmp_path_factory):
    """What ``chattune export --gguf q8_0`` does to an exported folder (a copy of the tiny GLM-4
    with a template and generation defaults): (the folder, the lines export_gguf yields, its log).
    One q8_0 conversion (5 s, the converter's start) for the q8_0 test and the export test."""
    import shutil

    folder = tmp_path_factory.mktemp("gguf-export") / "my-model"
    shutil.copytree(tiny_models("glm4"), folder)
    (folder / "chattune_export.json").write_text(json.dumps({"template": "chatglm3"}))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(max_new_tokens=64, do_sample=True, temperature=0.5, top_p=0.7, top_k=20)
    (folder / "generation_config.json").write_text(json.dumps(config))
    logs: list[str] = []
    lines = list(export_gguf(folder, "q8_0", log=logs.append))
    return folder, lines, logs


def test_q8_0_is_smaller_and_close(ggufs, exported_q8_0):
    model_dir, f16 = ggufs("glm4")
    folder, _, _ = exported_q8_0
    q8 = folder / "my-model.q8_0.gguf"  # written by write_gguf(folder, q8, "q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    assert not list(q8.parent.glob(".*partial"))
    summary = read_gguf_summary(q8)
    assert summary["architecture"] == "glm4" and summary["file_type"] == 7  # MOSTLY_Q8_0
    assert summary["tensors"]["blk.0.ffn_down.weight"]["type"] == "Q8_0"
    stored, expected = _gguf_tensors(q8), _expected("glm4", model_dir)
    assert sorted(stored) == sorted(expected)
    for name, want in expected.items():
        want = want.numpy()
        # Q8_0: blocks of 32 values, each a multiple of the block's max |w| / 127
        np.testing.assert_allclose(stored[name], want, rtol=0, atol=float(np.abs(want).max()) / 127 + 1e-6)


def test_outtype_and_architecture_refusals(ggufs, tmp_path):
    model_dir, _ = ggufs("llama")
    with pytest.raises(ConfigError, match=r"--gguf: expected one of f16, q8_0, got 'q4_0'"):
        write_gguf(model_dir, tmp_path / "m.gguf", "q4_0")
    with pytest.raises(ConfigError, match="no config.json"):
        check_gguf_architecture(tmp_path)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM"):
        write_gguf(other, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_chatglm6b_port_is_refused(tmp_path):
    from chattune.chatglm import native_model_path
    from tests.chatglm.thudm_folder import build_thudm_folder

    if not (FIXTURES / "chatglm-6b" / "config.json").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES}")
    native = native_model_path(str(build_thudm_folder(tmp_path / "m", FIXTURES / "chatglm-6b")))
    with pytest.raises(ConfigError, match=r"ChatGLM6BForCausalLM.*supported architectures: "
                                          r"LlamaForCausalLM, Qwen2ForCausalLM, Glm4ForCausalLM, GlmForCausalLM"):
        check_gguf_architecture(native)
    with pytest.raises(ConfigError, match="ChatGLM6BForCausalLM"):
        write_gguf(native, tmp_path / "m.gguf")


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm3-6b"])
def test_chatglm2_3_sentencepiece_tokenizer_is_refused(family, tmp_path):
    """chattune converts ChatGLM2/3 to transformers' GLM with their SentencePiece vocabulary,
    which llama.cpp's converter cannot write for GLM (it fails on it): refused up front."""
    from chattune.chatglm import native_model_path
    from tests.chatglm.thudm_folder import build_thudm_folder

    if not (FIXTURES / family / "config.json").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES}")
    native = native_model_path(str(build_thudm_folder(tmp_path / "m", FIXTURES / family)))
    with pytest.raises(ConfigError, match="GlmForCausalLM with ChatGLM2/3's SentencePiece tokenizer"):
        write_gguf(native, tmp_path / "m.gguf")


def test_export_gguf_writes_the_file_and_modelfile_into_the_export(exported_q8_0):
    """What ``chattune export --gguf`` calls on the exported folder: the template from
    chattune_export.json, the generation defaults from generation_config.json."""
    folder, lines, logs = exported_q8_0
    gguf_file = folder / "my-model.q8_0.gguf"
    assert gguf_file.is_file() and read_gguf_summary(gguf_file)["architecture"] == "glm4"
    assert lines[0].startswith(f"wrote {gguf_file} (") and "llama.cpp architecture glm4" in lines[0]
    assert lines[1].startswith(f"wrote {folder / 'Modelfile'} (template 'chatglm3')")
    assert logs and "q8_0" in logs[0]
    modelfile = (folder / "Modelfile").read_text().splitlines()
    for line in ("FROM ./my-model.q8_0.gguf", 'PARAMETER stop "<|user|>"', 'PARAMETER stop "<|observation|>"',
                 "PARAMETER temperature 0.5", "PARAMETER top_p 0.7", "PARAMETER top_k 20",
                 "PARAMETER num_predict 64"):
        assert line in modelfile


def test_stop_tokens_are_the_ones_chattune_stops_on(tiny_models, char_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    def stops(template, tokenizer, name):
        text = write_modelfile(tmp_path / name, "m.gguf", template, tokenizer, GenerateArgs()).read_text()
        return [line.removeprefix("PARAMETER stop ") for line in text.splitlines() if line.startswith("PARAMETER stop")]

    # a tokenizer without <|observation|>: chattune does not stop on that text, nor does Ollama
    assert stops("chatglm3", char_tokenizer, "a") == ['"<|user|>"', '"</s>"']
    qwen = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    assert stops("chatglm", qwen, "b") == ['"<eop>"', '"<|im_end|>"']
    qwen.add_special_tokens({"additional_special_tokens": ["eop"]})
    assert stops("chatglm", qwen, "c") == ['"<eop>"', '"<|im_end|>"']  # "eop" would cut "people"


def test_converter_failure_names_its_last_lines(ggufs, tmp_path):
    model_dir, _ = ggufs("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ChattuneError, match=r"(?s)converter failed on .*broken.*last lines:\n.+") as caught:
        write_gguf(broken, tmp_path / "out" / "m.gguf")
    assert not isinstance(caught.value, ConfigError)
    assert not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------- llama.cpp runs the GGUF

PROBES = ["The quick brown fox", "What are the three primary colors?", "你好，我是"]
LOGIT_TOLERANCE = 3e-3
"""llama.cpp on f16 weights against transformers on the float32 ones: the logits differ by
rounding (measured up to 7e-4 on these models); two HF logits closer than twice this are a tie."""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm4", "glm"])
def test_llama_cpp_greedy_tokens_match_transformers(arch, ggufs):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path = ggufs(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        for prompt in PROBES:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids, prompt
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                    pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
                hf_logits = model(torch.tensor([ids + hf])).logits[0].numpy()
            ours = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                ours.append(token)
                if len(ours) == len(hf):
                    break
            # the same logits along transformers' answer (teacher-forced) ...
            llm.reset()
            llm.eval(ids + hf)
            np.testing.assert_allclose(np.asarray(llm.scores[:len(ids) + len(hf)]), hf_logits,
                                       rtol=0, atol=LOGIT_TOLERANCE, err_msg=prompt)
            # ... and the same greedy tokens, up to a tie in transformers' own logits
            if ours != hf:
                at = next(i for i, (a, b) in enumerate(zip(ours, hf, strict=True)) if a != b)
                row = hf_logits[len(ids) + at - 1]
                assert abs(row[hf[at]] - row[ours[at]]) < 2 * LOGIT_TOLERANCE, (prompt, at, hf, ours)
    finally:
        llm.close()
