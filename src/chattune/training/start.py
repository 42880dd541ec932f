"""Where a training run starts: a base model, or a run folder whose LoRA adapter trains further.

Shared by the training (:mod:`chattune.training.recipe`) and its memory plan
(:mod:`chattune.training.memory_plan`), so that ``--dry-run`` plans the model the run loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chattune.config import RunConfig
from chattune.errors import ConfigError
from chattune.manifest import is_run_folder, read_manifest
from chattune.methods import LORA_SETTINGS, get_method

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
    settings (the returned config names that base; the second value is the run folder). Either way
    ``template: auto`` becomes the run's template. Any other
    pairing is a ConfigError saying how to start from a merged export instead."""
    path = config.model.model_name_or_path
    if not path or not is_run_folder(path):
        return config, None
    manifest = read_manifest(path)
    config = _with_run_template(config, manifest, path, log)
    if get_method(manifest.method).run_is_model:
        return config, None
    if manifest.method in PEFT_METHODS and config.method.method in PEFT_METHODS:
        settings = {k: v for k, v in manifest.method_settings.items() if k in LORA_SETTINGS}
        started = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, model_name_or_path=manifest.base_model.path,
                                      trust_remote_code=manifest.base_model.trust_remote_code),
            method=dataclasses.replace(config.method, **settings))
        log(f"starting from {path}: its {manifest.method} adapter trains further on its base "
            f"{manifest.base_model.path} (LoRA settings from the run: rank {settings.get('lora_rank')})")
        return started, Path(path)
    raise ConfigError(f"model_name_or_path: {path} is a {manifest.method} run; a {config.method.method} run can "
                      f"start from a LoRA run (with method=lora) or a full fine-tune's folder. Merge it first: "
                      f"chattune export {path} --out merged, then model_name_or_path=merged")
