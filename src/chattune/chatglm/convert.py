"""THUDM's ChatGLM folders (remote code) into native model folders, once, cached.

A folder downloaded from THUDM/chatglm-6b, chatglm2-6b or chatglm3-6b holds remote
code that transformers 5 cannot run. chattune converts it into a folder that needs
no remote code:

- ChatGLM2-6B / ChatGLM3-6B → transformers' own GLM (``GlmForCausalLM``, the GLM-4
  architecture they share): the fused ``query_key_value`` split into q/k/v (multi-query
  groups as key/value heads), ``dense_h_to_4h`` as the fused ``gate_up_proj``, RMSNorm,
  rotary over half of each head (interleaved, as THUDM's), the output layer as
  ``lm_head``; weights written as safetensors shard by shard; the sentencepiece
  tokenizer as a fast tokenizer with the same ids (``glm_tokenizer.py``).
- ChatGLM-6B → chattune's port (``glm6b.py``): same parameter names, so the weight
  files are linked, not copied; its tokenizer ported (``glm6b_tokenizer.py``).

The converted folder lives under ``$CHATTUNE_CACHE/native`` (default
``~/.cache/chattune/native``), named by the family and a hash of the source's config,
tokenizer and weight files (names, sizes, modification times): a changed source
converts again, an unchanged one is reused. ``chattune_native.json`` in it records the
source and the family. Run folders record both paths in their manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chattune.errors import ModelLoadError

CONVERTER_VERSION = 1
NATIVE_MARKER = "chattune_native.json"
FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
TEMPLATES = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({exc}); expected THUDM's file") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def thudm_family(path: str | os.PathLike) -> str | None:
    """Which of THUDM's ChatGLM models a local folder holds (``chatglm-6b``, ``chatglm2-6b``,
    ``chatglm3-6b``), judged by its ``config.json`` and tokenizer code; None for any other
    folder. Raises ModelLoadError for a ChatGLM folder chattune cannot convert (GLM-4's
    remote-code release: use its ``-hf`` release, which transformers loads natively)."""
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "chatglm":
        return None
    if config.get("position_encoding_2d") is not None or "inner_hidden_size" in config:
        return "chatglm-6b"
    if not (folder / "tokenizer.model").is_file() or config.get("padded_vocab_size", 65024) > 65024:
        raise ModelLoadError(
            f"{folder}: a ChatGLM remote-code folder that is not ChatGLM-6B, 2 or 3 (GLM-4's, with "
            f"padded_vocab_size {config.get('padded_vocab_size')}); expected one of {', '.join(FAMILIES)}. "
            "For GLM-4 use its -hf release (e.g. THUDM/glm-4-9b-chat-hf), which transformers loads natively")
    code = folder / "tokenization_chatglm.py"
    text = code.read_text(encoding="utf-8", errors="replace") if code.is_file() else ""
    name = str(config.get("_name_or_path", ""))
    return "chatglm3-6b" if "<|observation|>" in text or "chatglm3" in name else "chatglm2-6b"


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder (the shards an index names, or the single file)."""
    for index_name in _WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: names {missing[0]}, which is not in {folder} "
                                     f"({len(missing)} of {len(shards)} shards missing); download every shard")
            return [folder / s for s in shards]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    return []


def cache_root() -> Path:
    """Where converted folders are kept: ``$CHATTUNE_CACHE/native`` or ``~/.cache/chattune/native``."""
    base = os.environ.get("CHATTUNE_CACHE") or Path.home() / ".cache" / "chattune"
    return Path(base).expanduser() / "native"


def source_key(folder: Path, family: str) -> str:
    """A hash of what the conversion reads: config, tokenizer files, weight file stats."""
    digest = hashlib.sha256(f"{CONVERTER_VERSION}:{family}".encode())
    for name in ("config.json", "tokenizer_config.json", "tokenizer.model", "ice_text.model"):
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + file.read_bytes())
    for file in _weight_files(folder):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def native_model_path(path: str) -> str:
    """``path`` itself, or for a THUDM ChatGLM folder its converted native folder (made
    on first use, then reused). Raises ModelLoadError when the folder cannot be converted."""
    family = thudm_family(path) if path else None
    if family is None:
        return path
    source = Path(path).expanduser().resolve()
    target = cache_root() / f"{family}-{source_key(source, family)}"
    if (target / NATIVE_MARKER).is_file():
        return str(target)
    print(f"chattune: converting {family} at {source} into a native model folder at {target} "
          "(once; later runs reuse it)", file=sys.stderr)
    convert(source, target, family)
    return str(target)


def native_config(path: str):
    """The native config a THUDM ChatGLM folder converts to (no weights read), or None."""
    family = thudm_family(path) if path else None
    if family is None:
        return None
    config = _read_json(Path(path).expanduser() / "config.json")
    _check_supported(config, Path(path).expanduser() / "config.json")
    return _glm6b_config(config) if family == "chatglm-6b" else _glm_config(config, family)


@contextmanager
def native_folder(target: Path) -> Iterator[Path]:
    """A native folder written whole or not at all: the block writes into a ``tmp-`` folder
    beside ``target`` (its marker last), renamed to ``target`` when the block ends; another
    process's identical conversion that got there first is kept. On failure nothing is left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f"tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        try:
            work.rename(target)
        except OSError:
            if not (target / NATIVE_MARKER).is_file():  # not another process's identical conversion
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_marker(folder: Path, record: dict) -> None:
    """The marker that makes ``folder`` a finished native folder: what it was converted from."""
    (folder / NATIVE_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def convert(source: str | os.PathLike, target: str | os.PathLike, family: str | None = None) -> Path:
    """Convert the THUDM folder ``source`` into a native folder ``target`` (written under a
    ``tmp-`` name, then renamed: a failed conversion leaves nothing half-made). Returns ``target``."""
    source, target = Path(source).expanduser().resolve(), Path(target).expanduser()
    family = family or thudm_family(source)
    if family is None:
        raise ModelLoadError(f"{source}: not a THUDM ChatGLM folder (config.json with model_type \"chatglm\"); "
                             f"expected a download of one of {', '.join(FAMILIES)}")
    config = _read_json(source / "config.json")
    _check_supported(config, source / "config.json")
    files = _weight_files(source)
    if not files:
        raise ModelLoadError(f"{source}: no weights ({' or '.join(_WEIGHT_INDEXES + _WEIGHT_FILES)}); "
                             "download the whole model folder")
    if target.exists():
        raise ModelLoadError(f"{target}: already exists; expected a new folder to write the converted model to")
    with native_folder(target) as work:
        if family == "chatglm-6b":
            _convert_glm6b(source, work, config, files)
        else:
            _convert_glm(source, work, config, files, family)
        write_marker(work, {"source": str(source), "family": family, "template": TEMPLATES[family],
                            "converter_version": CONVERTER_VERSION,
                            "architecture": "chatglm6b (chattune)" if family == "chatglm-6b" else "glm (transformers)"})
    return target


def _check_supported(config: dict, where: Path) -> None:
    if config.get("quantization_bit"):
        raise ModelLoadError(f"{where}: quantization_bit: {config['quantization_bit']}: THUDM's int4/int8 "
                             "checkpoints hold packed weights chattune cannot convert; expected the float16 "
                             "release (quantize with method=qlora instead)")
    if config.get("pre_seq_len"):
        raise ModelLoadError(f"{where}: pre_seq_len: {config['pre_seq_len']}: this folder carries THUDM's "
                             "P-Tuning v2 prefix settings; expected the base model's config.json (train "
                             "P-Tuning v2 with chattune's method=ptuning)")
    expected = {"rmsnorm": True, "add_bias_linear": False, "post_layer_norm": True,
                "apply_residual_connection_post_layernorm": False, "original_rope": True}
    if "position_encoding_2d" in config:
        expected = {"position_encoding_2d": True}
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise ModelLoadError(f"{where}: {key}: {config[key]!r}; chattune converts the published "
                                 f"architecture, which has {key}={value!r}")


def _dtype_name(config: dict) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "float16"
    return name if name in ("float16", "bfloat16", "float32") else "float16"


def _glm_config(config: dict, family: str):
    from transformers import GlmConfig

    heads = config["num_attention_heads"]
    groups = config.get("multi_query_group_num", heads) if config.get("multi_query_attention") else heads
    eos = [config.get("eos_token_id", 2)]
    if family == "chatglm3-6b":
        eos += [64795, 64797]  # <|user|>, <|observation|>: its chat() stops on them too
    return GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=heads, num_key_value_heads=groups,
        head_dim=config.get("kv_channels", config["hidden_size"] // heads),
        max_position_embeddings=config.get("seq_length", 8192), rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(config.get("rope_ratio", 1)),
                         "partial_rotary_factor": 0.5},
        attention_bias=bool(config.get("add_qkv_bias", True)), hidden_act="silu",
        pad_token_id=config.get("pad_token_id", 0), eos_token_id=eos, bos_token_id=None,
        tie_word_embeddings=False, dtype=_dtype_name(config),
    )


def _glm6b_config(config: dict):
    from chattune.chatglm.glm6b import ChatGLM6BConfig

    keys = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
            "layernorm_epsilon", "max_sequence_length", "bos_token_id", "eos_token_id", "mask_token_id",
            "gmask_token_id", "pad_token_id")
    return ChatGLM6BConfig(**{k: config[k] for k in keys if k in config}, dtype=_dtype_name(config))


def _load_tensors(file: Path) -> dict:
    import torch

    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def glm_tensors(tensors: dict, config) -> dict:
    """THUDM ChatGLM2/3 parameter names and layouts to transformers' GLM ones."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = tensor
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("transformer.encoder.layers."):
            layer, rest = name[len("transformer.encoder.layers."):].split(".", 1)
            prefix = f"model.layers.{layer}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part.clone()
            else:
                renamed = {"self_attention.dense.weight": "self_attn.o_proj.weight",
                           "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                           "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
                           "input_layernorm.weight": "input_layernorm.weight",
                           "post_attention_layernorm.weight": "post_attention_layernorm.weight"}.get(rest)
                if renamed is None:
                    raise ModelLoadError(f"ChatGLM checkpoint: unexpected parameter {name}; "
                                         "expected the published ChatGLM2/3 layout")
                out[prefix + renamed] = tensor
        elif name.startswith("transformer.prefix_encoder."):
            raise ModelLoadError(f"ChatGLM checkpoint: {name} is a THUDM P-Tuning v2 prefix; expected the base model")
        else:
            raise ModelLoadError(f"ChatGLM checkpoint: unexpected parameter {name}; "
                                 "expected the published ChatGLM2/3 layout")
    return out


def _convert_glm(source: Path, work: Path, config: dict, files: list[Path], family: str) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from chattune.chatglm.glm_tokenizer import build_glm_tokenizer

    native = _glm_config(config, family)
    native.save_pretrained(work)
    weight_map, total = {}, 0
    for i, file in enumerate(files, start=1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in glm_tensors(_load_tensors(file), native).items()}
        save_file(tensors, str(work / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    (work / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    tokenizer = build_glm_tokenizer(source / "tokenizer.model", family, template=TEMPLATES[family],
                                    max_length=native.max_position_embeddings)
    tokenizer.save_pretrained(work)
    GenerationConfig(eos_token_id=native.eos_token_id, pad_token_id=native.pad_token_id).save_pretrained(work)


def _convert_glm6b(source: Path, work: Path, config: dict, files: list[Path]) -> None:
    from transformers import GenerationConfig

    from chattune.chatglm.glm6b_tokenizer import ChatGLM6BTokenizer

    native = _glm6b_config(config)
    native.save_pretrained(work)
    for file in files:
        (work / file.name).symlink_to(file)
    for index_name in _WEIGHT_INDEXES:
        if (source / index_name).is_file():
            shutil.copyfile(source / index_name, work / index_name)
    vocab = source / "ice_text.model"
    if not vocab.is_file():
        raise ModelLoadError(f"{source}: no ice_text.model; expected ChatGLM-6B's tokenizer file beside its config")
    tokenizer_config = {}
    if (source / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(source / "tokenizer_config.json")
    tokenizer = ChatGLM6BTokenizer(str(vocab), num_image_tokens=tokenizer_config.get("num_image_tokens", 0),
                                   model_max_length=native.max_sequence_length, chattune_template="chatglm")
    tokenizer.save_pretrained(work)
    GenerationConfig(eos_token_id=native.eos_token_id, pad_token_id=native.pad_token_id,
                     bos_token_id=native.bos_token_id).save_pretrained(work)
