"""What a server serves: one base model, loaded once, with any number of LoRA adapters.

Every adapter is a run folder whose manifest names the base model; all must
name the same one (config and tokenizer hashes), else the server refuses to
start. Each adapter keeps its own template and generation defaults; the bare
base model is served too, as ``base``, with its tokenizer's chat template. A run
of another method (freeze, full) is served alone, through ``load_chat_model``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.config import ConfigError, GenerateArgs, MethodArgs, ModelArgs
from chattune.data.encode import encode_prompt
from chattune.data.templates import resolve_template_name
from chattune.generate import ChatModel, load_chat_model
from chattune.manifest import (
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    verify_base_model,
    verify_template,
)
from chattune.model import load_model, load_tokenizer
from chattune.serve.engine import BASE_ADAPTER

BASE_NAME = "base"
ADAPTER_METHODS = ("lora", "qlora")
ALONE_METHODS = ("freeze", "full", "ptuning")


@dataclass
class ServedModel:
    """One name a request's ``model`` field may pick: an adapter, or the bare base model."""

    name: str
    adapter: str
    chat: ChatModel
    run_dir: str | None = None
    method: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids: the run's template through training's own encoder, uncut."""
        return encode_prompt(messages, self.chat.template, self.chat.encoder)


@dataclass
class Served:
    """The loaded model, its tokenizer and the names it answers to."""

    model: object
    tokenizer: object
    models: dict[str, ServedModel]
    default: str
    context_length: int
    uses_adapters: bool
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


def context_length(config) -> int:
    """The most tokens (prompt and answer) the model's positions allow."""
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=RUN_DIR`` from the command line."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"--adapter: expected NAME=RUN_DIR, got {text!r}")
    return name.strip(), path.strip()


@dataclass
class _Run:
    name: str
    folder: Path
    manifest: dict

    @property
    def method(self) -> str:
        """The run's fine-tuning method."""
        return self.manifest["method"]["name"]


def _check_same_base(runs: list[_Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for key, what in (("config_sha256", "model config"), ("tokenizer_sha256", "tokenizer")):
            mine, theirs = run.manifest["base_model"][key], first.manifest["base_model"][key]
            if mine != theirs:
                raise ManifestError(
                    f"adapter {run.name!r} ({run.folder}) was trained on a different base model than "
                    f"{first.name!r} ({first.folder}): {what} sha256 {mine[:12]} != {theirs[:12]}. "
                    "One server holds one base model; serve these from separate processes."
                )


def _must_be_alone(run: _Run) -> bool:
    """Runs that replace base weights (freeze, full), change every layer's cache (ptuning),
    or that peft cannot mix in a batch (DoRA)."""
    return run.method in ALONE_METHODS or bool(run.manifest["method"].get("use_dora"))


def _check_methods(runs: list[_Run], alone_ok: bool) -> None:
    for run in runs:
        if run.method not in ADAPTER_METHODS + ALONE_METHODS:
            raise ManifestError(f"{run.folder}: method {run.method!r} is not supported by chattune serve")
        if _must_be_alone(run) and not alone_ok:
            kind = "a DoRA adapter" if run.method in ADAPTER_METHODS else f"a {run.method} run"
            raise ManifestError(f"{run.name!r} ({run.folder}) is {kind}, which cannot share a batch with "
                                "other adapters or the base model; serve it alone: chattune serve RUN_DIR")


def _unique_names(names: list[str]) -> None:
    seen = set()
    for name in names:
        if name == BASE_NAME or name in seen or not name or any(c.isspace() for c in name):
            raise ConfigError(f"adapter name {name!r}: names must be unique, without spaces, "
                              f"and not {BASE_NAME!r} (the bare base model's name)")
        seen.add(name)


def _served_alone(run: _Run, base_model, force, warn) -> Served:
    chat = load_chat_model(str(run.folder), base_model=base_model, force=force, warn=warn)
    model = ServedModel(run.name, BASE_ADAPTER, chat, str(run.folder), run.method)
    return Served(chat.model, chat.tokenizer, {run.name: model}, run.name,
                  context_length(chat.model.config), uses_adapters=False)


def load_served(target: str, adapters: list[tuple[str, str]] = (), *, name: str | None = None,
                base_model: str | None = None, force: bool = False, trust_remote_code: bool = False,
                warn=print) -> Served:
    """Load ``target`` (a run folder or a base model) and the named adapter run folders."""
    folder = Path(target)
    runs = []
    if (folder / MANIFEST_NAME).is_file():
        runs.append(_Run(name or folder.resolve().name, folder, read_manifest(folder)))
    elif not folder.exists() and base_model is None and (folder.is_absolute() or target.startswith(".")
                                                         or "/" not in target):
        raise ManifestError(f"{target}: no such run folder or model")
    runs += [_Run(n, Path(p), read_manifest(p)) for n, p in adapters]
    _unique_names([run.name for run in runs])
    alone_ok = len(runs) == 1 and not adapters
    _check_methods(runs, alone_ok)
    if alone_ok and _must_be_alone(runs[0]):
        return _served_alone(runs[0], base_model, force, warn)
    if runs:
        _check_same_base(runs)
        recorded = runs[0].manifest["base_model"]
        base_path, remote = base_model or recorded["path"], recorded.get("trust_remote_code", False)
        tokenizer_path = str(runs[0].folder) if (runs[0].folder / "tokenizer_config.json").is_file() else base_path
    else:
        base_path = tokenizer_path = base_model or target
        remote = trust_remote_code
    tokenizer = load_tokenizer(tokenizer_path, remote)
    problems = verify_base_model(runs[0].manifest, base_path) if runs else []
    for run in runs:
        problems += [f"{run.name}: {p}" for p in verify_template(run.manifest, tokenizer)]
    if problems:
        message = "\n".join(problems)
        if not force:
            raise ManifestError(f"{message}\n(use --force to load anyway)")
        warn(f"warning: {message}")
    model = _load_with_adapters(base_path, remote, runs)
    limit = context_length(model.config)
    models = {}
    for i, run in enumerate(runs):
        chat = ChatModel(model=model, tokenizer=tokenizer, template=run.manifest["template"]["name"],
                         generation=run.manifest["generation"], max_prompt_tokens=limit, run_dir=str(run.folder))
        models[run.name] = ServedModel(run.name, f"a{i}", chat, str(run.folder), run.method)
    base_chat = ChatModel(model=model, tokenizer=tokenizer, template=resolve_template_name("auto", tokenizer),
                          generation=vars(GenerateArgs()).copy(), max_prompt_tokens=limit)
    models[BASE_NAME] = ServedModel(BASE_NAME, BASE_ADAPTER, base_chat, None, None)
    return Served(model, tokenizer, models, runs[0].name if runs else BASE_NAME, limit, uses_adapters=bool(runs))


def _load_with_adapters(base_path: str, remote: bool, runs: list[_Run]):
    """The base model, once, with every run's adapter under its own peft name (``a0``, ``a1``, ...)."""
    extra = {}
    quantized = bool(runs) and runs[0].method == "qlora" and torch.cuda.is_available()
    if quantized:
        from chattune.methods import quantization_config

        settings = {k: v for k, v in runs[0].manifest["method"].items() if k in MethodArgs.__dataclass_fields__}
        extra["quantization_config"] = quantization_config(MethodArgs(**settings))
    model = load_model(ModelArgs(model_name_or_path=base_path, trust_remote_code=remote), **extra)
    if runs:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(runs[0].folder), adapter_name="a0", is_trainable=False)
        for i, run in enumerate(runs[1:], start=1):
            model.load_adapter(str(run.folder), adapter_name=f"a{i}", is_trainable=False)
    model.eval()
    if torch.cuda.is_available() and not quantized and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    return model
