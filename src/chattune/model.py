"""Load a base model and its tokenizer with ``from_pretrained``, and fingerprint them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from chattune.config import ModelArgs
from chattune.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_commit_hash", "_attn_implementation_autoset", "use_cache"}


def _explain(path: str, exc: Exception) -> ModelLoadError:
    local = Path(path).expanduser()
    if not local.exists():
        return ModelLoadError(
            f"could not load {path!r}: it is not a local directory, and loading it as a Hugging Face "
            f"Hub id failed (offline or not cached?): {exc}. Download the model where the Hub is "
            "reachable and pass its local path."
        )
    return ModelLoadError(f"could not load {path!r}: {exc}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer (fast when available), with a pad token set."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, ...
        raise _explain(path, exc) from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
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


def load_model(args: ModelArgs, dtype: torch.dtype = torch.float32, **extra):
    """The base causal LM from a path (or cached hub id); ``extra`` goes to from_pretrained."""
    from transformers import AutoModelForCausalLM

    if not args.model_name_or_path:
        raise ModelLoadError("model_name_or_path: no base model given")
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code, **extra}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    try:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    except Exception as exc:
        raise _explain(args.model_name_or_path, exc) from exc


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
    """What a manifest records of a base model: its path and the two hashes."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _explain(path, exc) from exc
    tokenizer = tokenizer or load_tokenizer(path, trust_remote_code)
    resolved = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path
    return {
        "path": resolved,
        "model_type": model_config.model_type,
        "config_sha256": config_hash(model_config),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "trust_remote_code": trust_remote_code,
    }


def default_lora_targets(model_type: str) -> list[str] | str:
    """LoRA target modules by architecture: ChatGLM remote code fuses QKV in
    ``query_key_value``; otherwise every linear projection (peft's ``all-linear``)."""
    if model_type == "chatglm":
        return ["query_key_value"]
    return "all-linear"
