"""Where a training run starts: a base model, or a run folder whose LoRA adapter trains further;
its tokenizer, and the settings that train the tokens it adds.

Shared by the training (:mod:`chattune.training.recipe`) and its memory plan
(:mod:`chattune.training.memory_plan`), so that ``--dry-run`` plans the model the run loads.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from chattune.config import RunConfig, rope_scaling_settings
from chattune.config_io import source_prefix
from chattune.errors import ConfigError
from chattune.lora_init import converted_settings
from chattune.manifest import is_run_folder, read_manifest
from chattune.methods import LORA_SETTINGS, Method, get_method
from chattune.model import context_length, load_tokenizer, trained_positions
from chattune.vocab.resize import NewRows, new_token_rows

PEFT_METHODS = ("lora", "qlora")
ADAPTER_METHODS = (*PEFT_METHODS, "ptuning")
"""Methods that add a new adapter (or prefix) to a frozen base: switched off, it gives the base."""


def _with_run_template(config: RunConfig, manifest, path: str, log) -> RunConfig:
    """``config`` with the run's template where it says ``template: auto`` (the run trained with
    it); a different explicit template is kept, and said."""
    recorded = manifest.template.name
    if config.data.template == "auto":
        log(f"template: {recorded}, as {path} trained with")
        return dataclasses.replace(config, data=dataclasses.replace(config.data, template=recorded))
    if config.data.template != recorded:
        log(f"template: {config.data.template} as set, although {path} trained with {recorded}")
    return config


def start_from_run(config: RunConfig, log=print) -> tuple[RunConfig, Path | None]:
    """Where a run starts when ``model_name_or_path`` is a run folder: a full fine-tune's folder is
    a model (loaded as any); a LoRA run's adapter is trained further on its base, with its LoRA
    settings and, unless set, its RoPE scaling (the returned config names that base; the second
    value is the run folder). Either way ``template: auto`` becomes the run's template. Any other
    pairing is a ConfigError saying how to start from a merged export instead."""
    path = config.model.model_name_or_path
    if not path or not is_run_folder(path):
        return config, None
    manifest = read_manifest(path)
    config = _with_run_template(config, manifest, path, log)
    if get_method(manifest.method).run_is_model:
        return config, None
    if manifest.method in PEFT_METHODS and config.method.method in PEFT_METHODS:
        # the adapter as saved: a run whose lora_init changed the base saved a plain LoRA of twice the rank
        settings = converted_settings({k: v for k, v in manifest.method_settings.items() if k in LORA_SETTINGS})
        # a run with its own tokenizer (new tokens) goes on with it: its folder holds it
        tokenizer = config.model.tokenizer_name_or_path or (path if manifest.vocabulary else None)
        started = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, model_name_or_path=manifest.base_model.path,
                                      trust_remote_code=manifest.base_model.trust_remote_code,
                                      tokenizer_name_or_path=tokenizer,
                                      rope_scaling=config.model.rope_scaling or manifest.rope_scaling or None),
            method=dataclasses.replace(config.method, **settings))
        log(f"starting from {path}: its {manifest.method} adapter trains further on its base "
            f"{manifest.base_model.path} (LoRA settings from the run: rank {settings.get('lora_rank')})")
        return started, Path(path)
    raise ConfigError(f"model_name_or_path: {path} is a {manifest.method} run; a {config.method.method} run can "
                      f"start from a LoRA run (with method=lora) or a full fine-tune's folder. Merge it first: "
                      f"chattune export {path} --out merged, then model_name_or_path=merged")


def load_tokenizers(config: RunConfig):
    """The tokenizer to train with (``tokenizer_name_or_path``, else the base model's), the base
    model's own, and the rows the model needs for the tokens the first has beyond the second
    (None when it has none)."""
    remote = config.model.trust_remote_code
    base_tokenizer = load_tokenizer(config.model.model_name_or_path, remote)
    path = config.model.tokenizer_name_or_path
    if not path:
        return base_tokenizer, base_tokenizer, None
    tokenizer = load_tokenizer(path, remote)
    if len(tokenizer) < len(base_tokenizer):
        raise ConfigError(f"{source_prefix(config, 'tokenizer_name_or_path')}tokenizer_name_or_path: {path} has "
                          f"{len(tokenizer):,} tokens, fewer than the base model's {len(base_tokenizer):,}; "
                          "expected the base's tokenizer or one extended from it (chattune tokenizer extend)")
    if len(tokenizer) == len(base_tokenizer):
        return tokenizer, base_tokenizer, None
    return tokenizer, base_tokenizer, new_token_rows(tokenizer, base_tokenizer, path)


def new_token_settings(config: RunConfig, method: Method, new_rows: NewRows | None):
    """The method settings with new tokens trained: for LoRA their rows (peft's trainable
    tokens) or the whole embedding and output layers (modules_to_save), by ``new_tokens_train``.
    freeze and ptuning cannot train new rows (ConfigError); full trains everything anyway."""
    args = config.method
    if new_rows is None or method.name == "full":
        return args
    if method.name not in ("lora", "qlora"):
        raise ConfigError(f"{source_prefix(config, 'method')}method: {method.name} cannot train the "
                          f"{len(new_rows.ids)} new tokens of tokenizer_name_or_path (their rows start untrained); "
                          "use method=lora (new_tokens_train rows or embeddings) or full")
    if args.new_tokens_train == "embeddings":
        return dataclasses.replace(args, modules_to_save=sorted({*(args.modules_to_save or []),
                                                                 "embed_tokens", "lm_head"}))
    return dataclasses.replace(args, trainable_token_indices=sorted({*(args.trainable_token_indices or []),
                                                                     *new_rows.ids}))


def context_note(config: RunConfig, model_config) -> str | None:
    """What ``max_seq_length`` means for the model's context (``model_config`` as loaded, RoPE
    scaling applied): with ``rope_scaling``, the context it extends from the trained positions to;
    without, a warning when max_seq_length is beyond the model's context, suggesting
    rope_scaling; None when it fits the model as it is."""
    length, scaling = config.data.max_seq_length, rope_scaling_settings(config.model.rope_scaling)
    context = context_length(model_config)
    if scaling:
        trained = trained_positions(model_config) or context
        note = (f"context: extended by RoPE scaling ({scaling['type']}, factor {scaling['factor']:g}) from "
                f"{trained:,} to {context:,} tokens; max_seq_length {length:,}")
        return note + (" is beyond even that" if length > context else "")
    if trained_positions(model_config) is None or length <= context:
        return None
    return (f"context: warning: max_seq_length {length:,} is beyond the {context:,} positions the model was "
            f"trained for; positions past them were never trained. To extend the context, set rope_scaling "
            f"(e.g. rope_scaling=linear:{math.ceil(length / context)})")
