"""Load a base model and its tokenizer with ``from_pretrained``, and fingerprint them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from chattune import chatglm, gguf_import
from chattune.config import ROPE_TYPES, ModelArgs, rope_scaling_settings
from chattune.errors import ConfigError, ModelLoadError

chatglm.register()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_commit_hash", "_attn_implementation_autoset", "use_cache"}


_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "config.json")
_SAVED_MODEL = "config.json, weights and tokenizer files, as save_pretrained writes them"


def _looks_local(path: str) -> bool:
    """Whether ``path`` can only be a filesystem path, not a Hub id (``name`` or ``org/name``)."""
    return (path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1
            or Path(path).suffix in (".json", ".bin", ".safetensors", ".gguf"))


def _json_problem(file: Path) -> str | None:
    """Why a JSON file of a model folder is unusable, or None."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON object"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected a JSON object"
    except (OSError, ValueError, RecursionError) as exc:
        return f"cannot be read ({exc}); expected a JSON object"
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    return None


def _is_tokenizer_file(name: str) -> bool:
    return (name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece")) or name == "merges.txt"
            or name.endswith((".model", ".tiktoken")))


def load_error(path: str, exc: Exception, what: str = "model") -> ModelLoadError:
    """A one-line ModelLoadError for a failed ``from_pretrained`` of ``what`` (``model``,
    ``config`` or ``tokenizer``) at ``path``: it says what is wrong with the folder
    (missing, a file, empty, a corrupt JSON file, no config or tokenizer files) when
    that can be seen, else passes on transformers' reason."""
    head = f"could not load the {what} {path!r}"
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    local = Path(path).expanduser()
    if not local.exists():
        if _looks_local(path):
            return ModelLoadError(f"{head}: no such folder; expected a model folder ({_SAVED_MODEL}) "
                                  "or a Hugging Face Hub id such as org/name")
        return ModelLoadError(
            f"{head}: it is not a local folder, and loading it as a Hugging Face Hub id failed "
            f"(offline or not cached?): {detail}. Download the model where the "
            "Hub is reachable and pass its local path."
        )
    if not local.is_dir():
        return ModelLoadError(f"{head}: it is a file; expected a model folder ({_SAVED_MODEL})")
    names = {child.name for child in local.iterdir()}
    if not names:
        return ModelLoadError(f"{head}: empty folder; expected {_SAVED_MODEL}")
    for name in _TOKENIZER_JSON_FILES if what == "tokenizer" else ("config.json",):
        problem = _json_problem(local / name) if name in names else None
        if problem:
            return ModelLoadError(f"{head}: {local / name}: {problem}")
    if what != "tokenizer" and "config.json" not in names:
        return ModelLoadError(f"{head}: no config.json in the folder; expected {_SAVED_MODEL}")
    if what == "tokenizer" and not any(_is_tokenizer_file(name) for name in names):
        return ModelLoadError(f"{head}: no tokenizer files in the folder (tokenizer.json, "
                              "tokenizer_config.json, tokenizer.model, vocab files); expected the "
                              "tokenizer saved beside the model (tokenizer.save_pretrained)")
    return ModelLoadError(f"{head}: {detail}")


def native_model_path(path: str) -> str:
    """The folder ``from_pretrained`` loads for a model path: ``path`` itself, or for a GGUF
    file (``gguf_import``) or a THUDM ChatGLM folder (``chatglm``) its converted native folder."""
    native = gguf_import.native_model_path(path)
    return native if native != path else chatglm.native_model_path(path)


def native_config(path: str):
    """The native config a GGUF file or a THUDM ChatGLM folder converts to (no weights
    read), or None for any other path."""
    return gguf_import.native_config(path) or chatglm.native_config(path)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer (fast when available), with a pad token set; an exported model's
    as its run's was (:func:`chattune.special_text.restore_run_tokenizer`).

    Raises ConfigError for an empty path and ModelLoadError (see :func:`load_error`)
    when the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    from chattune.special_text import restore_run_tokenizer

    if not path:
        raise ConfigError("model_name_or_path: no base model given; set it to a model folder")
    path = native_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, ...
        raise load_error(path, exc, "tokenizer") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    restore_run_tokenizer(tokenizer)
    return tokenizer


def resolve_dtype(dtype: str, fp16: bool = False, bf16: bool = False) -> torch.dtype:
    """The dtype to load base weights in: as given, else that of fp16/bf16 training, else float32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float32


VISION_TYPES = ("llava", "idefics3", "smolvlm")
"""The vision-language model types chattune reads images with (their inputs are ``input_ids``
plus the processor's pixels; tested end to end on tiny random models). A config of any other type
with a ``vision_config`` (Qwen2-VL's 3-D positions, Gemma 3's and PaliGemma's bidirectional image
attention, Mllama's cross-attention, remote code) loads as before, as a text model."""


def vision_model_type(config) -> str | None:
    """The config's model type when chattune reads images with it (:data:`VISION_TYPES`), else None."""
    if getattr(config, "vision_config", None) is None:
        return None
    model_type = getattr(config, "model_type", None)
    return model_type if model_type in VISION_TYPES else None


def text_config(config):
    """A config's language model part (the config itself for a text model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


POSITION_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length")
"""Where configs say how many positions the model was trained for."""


def trained_positions(config) -> int | None:
    """The positions the model's config says it was trained for (a vision-language model's: its
    language model's), before any RoPE scaling; None where the config names none."""
    config = text_config(config)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _rope(config) -> tuple[str, dict] | None:
    """The field holding a text config's RoPE settings and their value: ``rope_parameters``
    (transformers 5) or ``rope_scaling`` (transformers 4, beside ``rope_theta``); None for a model
    without RoPE settings transformers reads."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return "rope_parameters", params
    if "rope_parameters" not in vars(config) and getattr(config, "rope_theta", None) is not None:
        return "rope_scaling", dict(vars(config).get("rope_scaling") or {})
    return None


def context_length(config) -> int:
    """The most tokens (prompt and answer) the model's positions allow: the positions it was
    trained for, times the factor of a linear, dynamic or yarn RoPE scaling (2048 where the config
    names none)."""
    positions = trained_positions(config) or 2048
    found = _rope(text_config(config))
    params = found[1] if found else {}
    kind, factor = params.get("rope_type", params.get("type")), params.get("factor")
    if kind not in ROPE_TYPES or not isinstance(factor, (int, float)) or factor <= 1:
        return positions
    original = params.get("original_max_position_embeddings") or positions
    return max(positions, int(original * factor))


def apply_rope_scaling(config, scaling: dict | None) -> None:
    """Set ``scaling`` (``rope_scaling``: ``{type, factor}``) on a model config, in place, as the
    installed transformers reads it (``rope_parameters``, or ``rope_scaling`` before transformers 5),
    keeping the model's own RoPE base; nothing for None or a config that already scales so.

    Raises ConfigError naming the key for a model without RoPE settings, with RoPE settings per
    layer type, or already scaled another way."""
    settings = rope_scaling_settings(scaling)
    if settings is None:
        return
    text = text_config(config)
    model_type = getattr(text, "model_type", None) or type(text).__name__
    found = _rope(text)
    if found is None:
        raise ConfigError(f"rope_scaling: the model ({model_type}) has no rotary position embeddings that "
                          "transformers can scale (no rope_parameters or rope_theta in its config)")
    field_name, params = found
    if hasattr(text, "nested_rope_parameter_keys") and text.nested_rope_parameter_keys(params):
        raise ConfigError(f"rope_scaling: the model ({model_type}) has RoPE settings per layer type; "
                          "chattune scales only a model with one RoPE for all layers")
    kind, factor = params.get("rope_type", params.get("type", "default")), params.get("factor")
    if kind == settings["type"] and factor == settings["factor"]:
        return  # loaded from a folder saved scaled (a full fine-tune's, an export)
    if kind not in ("default", None):
        raise ConfigError(f"rope_scaling: the model ({model_type}) already scales its RoPE ({kind}, factor "
                          f"{factor}); scalings do not stack. Leave rope_scaling out to train with the model's "
                          "own, or start from a model without one")
    scaled = {k: v for k, v in params.items() if k != "type"}
    scaled.update(rope_type=settings["type"], factor=settings["factor"])
    setattr(text, field_name, scaled)
    if field_name == "rope_parameters" and hasattr(text, "standardize_rope_params"):
        text.standardize_rope_params()  # yarn: original_max_position_embeddings from the config


def load_config(args: ModelArgs, path: str | None = None):
    """The model config at ``path`` (default: the native folder of ``args.model_name_or_path``),
    with ``args.rope_scaling`` applied; ModelLoadError when it cannot be read, ConfigError for a
    scaling the model cannot take (:func:`apply_rope_scaling`)."""
    from transformers import AutoConfig

    path = path or native_model_path(args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, ...
        raise load_error(path, exc, "config") from exc
    apply_rope_scaling(config, args.rope_scaling)
    return config


def model_class(path: str, trust_remote_code: bool = False):
    """The transformers auto class that loads the model at ``path`` (native): image-text-to-text
    for a vision-language model chattune reads images with (:func:`vision_model_type`), else causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # from_pretrained below says what is wrong with the folder
        return AutoModelForCausalLM
    return AutoModelForImageTextToText if vision_model_type(config) else AutoModelForCausalLM


def load_model(args: ModelArgs, dtype: torch.dtype = torch.float32, **extra):
    """The base causal LM (or vision-language model) from a path (or cached hub id), its RoPE
    scaled by ``args.rope_scaling`` (:func:`apply_rope_scaling`); ``extra`` goes to from_pretrained.

    Raises ConfigError for an empty path and ModelLoadError (see :func:`load_error`)
    when the model cannot be loaded.
    """
    if not args.model_name_or_path:
        raise ConfigError("model_name_or_path: no base model given; set it to a model folder")
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code, **extra}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    path = native_model_path(args.model_name_or_path)
    if args.rope_scaling:
        kwargs["config"] = load_config(args, path)
    try:
        return model_class(path, args.trust_remote_code).from_pretrained(path, **kwargs)
    except Exception as exc:
        raise load_error(path, exc) from exc


REWARD_HEAD = "score"
"""The scalar reward head's module name in transformers' ``*ForSequenceClassification`` models."""


def load_reward_base(args: ModelArgs, pad_token_id: int | None, dtype: torch.dtype = torch.float32, *,
                     path: str | None = None, **extra):
    """The model at ``path`` (default ``args.model_name_or_path``) as a reward model: transformers'
    ``AutoModelForSequenceClassification`` with one label, a linear head (``score``) on the last
    hidden state, new (random, from torch's generator as it is) unless the folder holds one;
    ``pad_token_id`` is set on its config. ``extra`` goes to from_pretrained.

    Raises ConfigError for an empty path or an architecture transformers has no sequence
    classification model for, ModelLoadError when the model cannot be loaded."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    path = path or args.model_name_or_path
    if not path:
        raise ConfigError("model_name_or_path: no base model given; set it to a model folder")
    path = native_model_path(path)
    config = load_config(args, path)  # with the RoPE scaling asked for
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not args.trust_remote_code:
        raise ConfigError(f"stage: rm puts a reward head on the model, and transformers has no sequence-"
                          f"classification model for {path}'s architecture {config.model_type!r}; use a Llama, "
                          "Qwen, Gemma, Mistral or GLM model")
    config.num_labels, config.pad_token_id = 1, pad_token_id
    kwargs = {"config": config, "dtype": dtype, "trust_remote_code": args.trust_remote_code, **extra}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise load_error(path, exc) from exc


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def config_hash(model_config) -> str:
    """A hash of a model config's architecture fields (not paths or versions)."""
    data = {k: v for k, v in model_config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha256_json(data)


def tokenizer_hash(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary, special tokens and chat template."""
    return _sha256_json({
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def base_model_fingerprint(path: str, trust_remote_code: bool = False, tokenizer=None) -> dict:
    """What a manifest records of a base model: its path and the two hashes (for a GGUF file,
    also its sha256 and quantization type).

    Raises ModelLoadError when its config (or, without ``tokenizer``, its tokenizer) cannot be loaded.
    """
    from transformers import AutoConfig

    native = native_model_path(path)
    try:
        model_config = AutoConfig.from_pretrained(native, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise load_error(native, exc, "config") from exc
    tokenizer = tokenizer or load_tokenizer(native, trust_remote_code)
    resolved = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path
    record = {
        "path": resolved,
        "model_type": model_config.model_type,
        "config_sha256": config_hash(model_config),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "trust_remote_code": trust_remote_code,
    }
    if native != path:
        record["native_path"] = native
    record.update(gguf_import.gguf_record(native))
    return record


def default_lora_targets(model_type: str) -> list[str] | str:
    """LoRA target modules by architecture: ChatGLM-6B (THUDM's code and chattune's port)
    fuses QKV in ``query_key_value``, as THUDM's LoRA recipes target; otherwise every
    linear projection (peft's ``all-linear``)."""
    if model_type in ("chatglm", "chatglm6b"):
        return ["query_key_value"]
    return "all-linear"
