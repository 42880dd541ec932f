"""A run config's data prepared as ``chattune data prepare`` does it: the tokenizer and template
the config names, its pre-training or conversation rows encoded (or read from the cache), the
audit as printed."""

from __future__ import annotations

from chattune.data.prepare import format_audit, prepare_data, stderr_log
from chattune.errors import ConfigError


def prepare_for_config(config, *, force: bool = False, log=stderr_log):
    """A run config's data encoded (or read back from the cache), as ``chattune data prepare``
    and the workbench's Audit button do it: (the prepared data, the audit as printed)."""
    from chattune.model import load_tokenizer

    if config.data.streaming:
        raise ConfigError("streaming: streamed data is read while training, not prepared; "
                          "set streaming=false to encode and cache it")
    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.model_name_or_path,
                               config.model.trust_remote_code)
    if config.preference.stage == "pretrain":
        from chattune.data.pretrain import format_pretrain_audit, prepare_pretrain_data

        prepared = prepare_pretrain_data(config.data, tokenizer, config.train.seed, force=force, log=log)
        return prepared, format_pretrain_audit(prepared.audit)
    from chattune.templates.registry import resolve_template_name
    from chattune.vision.processor import load_vision

    template = resolve_template_name(config.data.template, tokenizer)
    vision = load_vision(config.model.model_name_or_path, config.model.trust_remote_code)
    prepared = prepare_data(config.data, tokenizer, template, config.train.seed, force=force, vision=vision, log=log)
    return prepared, format_audit(prepared.audit)
