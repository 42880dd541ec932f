"""Loading a base model and its tokenizer, and the fingerprints a manifest records.

Every way a model folder can be unusable ends in one line naming the folder (or the
file in it) and what was expected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chattune.config import ModelArgs
from chattune.errors import ConfigError, ModelLoadError
from chattune.model import (
    base_model_fingerprint,
    config_hash,
    default_lora_targets,
    load_model,
    load_tokenizer,
    resolve_dtype,
    tokenizer_hash,
)


@pytest.fixture
def glm4_copy(tiny_models, tmp_path) -> Path:
    """A copy of the tiny GLM-4 model that a test may damage."""
    return Path(shutil.copytree(tiny_models("glm4"), tmp_path / "glm4"))


def message(info: pytest.ExceptionInfo) -> str:
    text = str(info.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- loading


class TestLoad:
    def test_tokenizer_and_model_of_a_good_folder(self, tiny_models):
        path = str(tiny_models("glm4"))
        tokenizer = load_tokenizer(path)
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None
        model = load_model(ModelArgs(path))
        assert model.config.model_type == "glm4" and model.dtype == torch.float32
        assert load_model(ModelArgs(path), dtype=torch.bfloat16).dtype == torch.bfloat16

    def test_pad_token_falls_back_to_eos(self, glm4_copy):
        config = json.loads((glm4_copy / "tokenizer_config.json").read_text())
        config.pop("pad_token")
        (glm4_copy / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = load_tokenizer(str(glm4_copy))
        assert tokenizer.pad_token == tokenizer.eos_token

    def test_an_exported_tokenizer_is_loaded_as_its_run_s(self, glm4_copy, tiny_models):
        """An export escapes special-token text for runtimes (export/escape.py); chattune
        loads it back without that, never reading special tokens from text, as its run did."""
        from transformers import AutoTokenizer

        from chattune.export.escape import escape_jinja
        from chattune.special_text import add_unescape, is_escaping

        exported = AutoTokenizer.from_pretrained(glm4_copy)
        add_unescape(exported)
        original = exported.chat_template
        exported.chat_template = escape_jinja(["<|user|>"]) + original
        exported.save_pretrained(glm4_copy)
        tokenizer = load_tokenizer(str(glm4_copy))
        assert not is_escaping(tokenizer) and tokenizer.backend_tokenizer.normalizer is None
        assert tokenizer.split_special_tokens and tokenizer.chat_template == original
        assert tokenizer("<|user|>", add_special_tokens=False)["input_ids"] != [tokenizer.convert_tokens_to_ids("<|user|>")]
        assert not load_tokenizer(str(tiny_models("glm4"))).split_special_tokens  # not an export: as it is

    def test_no_path_is_a_config_error(self):
        with pytest.raises(ConfigError, match="^model_name_or_path: no base model given"):
            load_tokenizer("")
        with pytest.raises(ConfigError, match="^model_name_or_path: no base model given"):
            load_model(ModelArgs(""))

    def test_a_file_instead_of_a_folder(self, tmp_path):
        path = tmp_path / "model.bin"
        path.write_bytes(b"xx")
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(str(path))
        assert message(info).startswith(f"could not load the tokenizer '{path}': it is a file; "
                                        "expected a model folder (config.json, weights and tokenizer files")
        with pytest.raises(ModelLoadError, match="could not load the model .*: it is a file"):
            load_model(ModelArgs(str(path)))

    def test_an_empty_folder(self, tmp_path):
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(str(tmp_path))
        assert message(info) == (f"could not load the tokenizer '{tmp_path}': empty folder; expected "
                                 "config.json, weights and tokenizer files, as save_pretrained writes them")
        with pytest.raises(ModelLoadError, match="could not load the model .*: empty folder"):
            load_model(ModelArgs(str(tmp_path)))

    def test_a_missing_local_path(self, tmp_path):
        path = tmp_path / "nope"
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(str(path))
        assert message(info).startswith(f"could not load the tokenizer '{path}': no such folder; expected a "
                                        "model folder")

    def test_a_hub_id_offline(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer("chattune-test/surely-not-cached")
        assert message(info).startswith("could not load the tokenizer 'chattune-test/surely-not-cached': it is "
                                        "not a local folder, and loading it as a Hugging Face Hub id failed")
        assert "Download the model where the Hub is reachable" in str(info.value)

    @pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    def test_a_corrupt_json_file_is_named(self, glm4_copy, name):
        (glm4_copy / name).write_text("{not json")
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(str(glm4_copy))
        assert message(info) == (f"could not load the tokenizer '{glm4_copy}': {glm4_copy / name}: not valid "
                                 "JSON (Expecting property name enclosed in double quotes at line 1 column 2); "
                                 "expected a JSON object")

    def test_a_corrupt_config_fails_the_model_too(self, glm4_copy):
        (glm4_copy / "config.json").write_text("[1, 2]")
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelArgs(str(glm4_copy)))
        assert message(info) == (f"could not load the model '{glm4_copy}': {glm4_copy / 'config.json'}: "
                                 "expected a JSON object, got list")

    def test_a_folder_without_tokenizer_files(self, glm4_copy):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (glm4_copy / name).unlink()
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(str(glm4_copy))
        assert message(info).startswith(f"could not load the tokenizer '{glm4_copy}': no tokenizer files in the "
                                        "folder (tokenizer.json, tokenizer_config.json")

    def test_a_folder_without_config(self, glm4_copy):
        (glm4_copy / "config.json").unlink()
        load_tokenizer(str(glm4_copy))  # the tokenizer does not need it
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelArgs(str(glm4_copy)))
        assert message(info) == (f"could not load the model '{glm4_copy}': no config.json in the folder; "
                                 "expected config.json, weights and tokenizer files, as save_pretrained writes them")
        with pytest.raises(ModelLoadError, match="could not load the config .*: no config.json"):
            base_model_fingerprint(str(glm4_copy))

    def test_a_folder_without_weights(self, glm4_copy):
        (glm4_copy / "model.safetensors").unlink()
        with pytest.raises(ModelLoadError, match=f"could not load the model '{glm4_copy}': .*model.safetensors"):
            load_model(ModelArgs(str(glm4_copy)))

    def test_corrupt_weights(self, glm4_copy):
        (glm4_copy / "model.safetensors").write_bytes(b"garbage")
        with pytest.raises(ModelLoadError, match=f"^could not load the model '{glm4_copy}': "):
            load_model(ModelArgs(str(glm4_copy)))

    def test_an_unknown_architecture(self, glm4_copy):
        config = json.loads((glm4_copy / "config.json").read_text())
        config["model_type"] = "no-such-architecture"
        (glm4_copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelArgs(str(glm4_copy)))
        assert "no-such-architecture" in message(info)


# --------------------------------------------------------------------------- fingerprints


class TestFingerprint:
    def test_base_model_fingerprint(self, tiny_models):
        path = tiny_models("qwen2")
        fingerprint = base_model_fingerprint(str(path))
        assert fingerprint["path"] == str(Path(path).resolve())
        assert fingerprint["model_type"] == "qwen2" and fingerprint["trust_remote_code"] is False
        assert len(fingerprint["config_sha256"]) == 64 and len(fingerprint["tokenizer_sha256"]) == 64
        assert base_model_fingerprint(str(path)) == fingerprint
        tokenizer = load_tokenizer(str(path))
        assert base_model_fingerprint(str(path), tokenizer=tokenizer)["tokenizer_sha256"] == tokenizer_hash(tokenizer)

    def test_a_copy_in_another_folder_has_the_same_hashes(self, tiny_models, glm4_copy):
        original = base_model_fingerprint(str(tiny_models("glm4")))
        copy = base_model_fingerprint(str(glm4_copy))
        assert copy["path"] != original["path"]
        assert (copy["config_sha256"], copy["tokenizer_sha256"]) == (
            original["config_sha256"], original["tokenizer_sha256"])

    def test_config_hash_ignores_volatile_keys(self, tiny_models):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(tiny_models("glm4"))
        before = config_hash(config)
        config._name_or_path = "/somewhere/else"
        config.transformers_version = "0.0.1"
        config.use_cache = not config.use_cache
        config.dtype = torch.bfloat16
        assert config_hash(config) == before

    @pytest.mark.parametrize("key,value", [("num_hidden_layers", 3), ("hidden_size", 128), ("vocab_size", 4096),
                                           ("rope_theta", 500.0)])
    def test_config_hash_changes_with_the_architecture(self, tiny_models, key, value):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(tiny_models("glm4"))
        before = config_hash(config)
        setattr(config, key, value)
        assert config_hash(config) != before

    def test_config_hash_differs_between_architectures(self, tiny_models):
        from transformers import AutoConfig

        hashes = {config_hash(AutoConfig.from_pretrained(tiny_models(arch))) for arch in ("glm4", "llama")}
        assert len(hashes) == 2

    def test_tokenizer_hash_follows_vocab_specials_and_chat_template(self, tiny_models):
        path = str(tiny_models("glm4"))
        tokenizer = load_tokenizer(path)
        before = tokenizer_hash(tokenizer)
        assert tokenizer_hash(load_tokenizer(path)) == before
        tokenizer.chat_template = "{{ messages }}"
        assert tokenizer_hash(tokenizer) != before
        other = load_tokenizer(path)
        other.add_tokens(["<new-token>"])
        assert tokenizer_hash(other) != before
        assert tokenizer_hash(load_tokenizer(str(tiny_models("qwen2")))) != before


class TestSmall:
    def test_resolve_dtype(self):
        assert resolve_dtype("auto") == torch.float32
        assert resolve_dtype("auto", fp16=True) == torch.float16
        assert resolve_dtype("auto", bf16=True) == torch.bfloat16
        assert resolve_dtype("float16", bf16=True) == torch.float16

    def test_default_lora_targets(self):
        assert default_lora_targets("chatglm") == ["query_key_value"]
        assert default_lora_targets("glm4") == "all-linear"
