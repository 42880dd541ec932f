"""The page's training form: made from the config's documented keys, checked by ``chattune train``'s code.

:func:`schema` lists every key ``--help-config`` lists, in its groups, with the form control it
needs, its default and help text, the methods it belongs to and, for a path, the folder it is
picked from. :func:`read_form` turns what the form sent (``key: text``, read as ``key=value``
on ``chattune train``'s command line is) into a checked :class:`~chattune.config.RunConfig`,
with the page's names resolved inside their folders; every problem comes back as a
:class:`FormError` naming its key, so the page shows it beside its field before anything loads.
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from chattune.config import DataSource, RunConfig
from chattune.config_io import build_config, documented_keys, named_keys
from chattune.errors import ConfigError
from chattune.workbench.folders import Folders, PathRefused

LORA_METHODS = ["lora", "qlora"]
METHOD_KEYS: dict[str, list[str]] = {
    **{key: LORA_METHODS for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
                                     "use_rslora", "lora_init", "modules_to_save", "trainable_token_indices",
                                     "new_tokens_train")},
    "quantization_bit": ["qlora"],
    **{key: ["freeze"] for key in ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")},
    **{key: ["ptuning"] for key in ("pre_seq_len", "prefix_projection", "prefix_hidden_size")},
}
"""The keys that only one method reads: the form shows them for that method."""
FOLDER_KEYS = {"model_name_or_path": "models", "tokenizer_name_or_path": "models", "train_files": "data",
               "eval_files": "data", "output_dir": "runs"}
"""Path keys the page picks inside a configured folder."""
CLOSED_KEYS = {
    "cache_dir": "the page's runs cache their data in the default place",
    "deepspeed": "DeepSpeed config files are given on the command line (chattune train)",
    "resume_from_checkpoint": "a stopped run goes on with the job's Resume button",
}
"""Keys naming a path of the server's that the page does not set, and why."""
REQUIRED = ("model_name_or_path", "train_files", "output_dir")


class FormError(ConfigError):
    """The form's problems, each ``{"key": name or None, "message": text}``."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(error["message"] for error in errors))
        self.errors = errors


@dataclass
class CheckedForm:
    """A form that ``chattune train`` would accept: the config, and the values it was built from
    (paths resolved), as YAML and command lines."""

    config: RunConfig
    values: dict[str, Any]

    def yaml(self) -> str:
        """The config file the form amounts to (only the keys it set)."""
        return yaml.safe_dump(self.values, sort_keys=False, allow_unicode=True)

    def command(self, config_name: str = "config.yaml") -> str:
        """``chattune train config.yaml``."""
        return f"chattune train {shlex.quote(config_name)}"

    def overrides_command(self) -> str:
        """The same run as ``chattune train key=value ...``, without a file."""
        return "chattune train " + " ".join(shlex.quote(f"{key}={_text(value)}") for key, value in self.values.items())


def _text(value: Any) -> str:
    """A value as the command line and the form write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        if all(isinstance(item, (str, int, float)) for item in value):
            return ",".join(str(item) for item in value)
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _kind(annotation: Any) -> tuple[str, list | None, bool]:
    """(control, choices, may be empty) for a key's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        kind, choices, _ = _kind(inner[0])
        return kind, choices, True
    if origin is Literal:
        return "choice", list(args), False
    if origin is list:
        return ("data" if args and args[0] is DataSource else "list"), None, True
    if origin is dict:
        return "dict", None, True
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "str"), None, False


def _plain(value: Any) -> Any:
    """A default as JSON (a data source as its path)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def schema() -> dict:
    """The form: ``{"groups": [{"name", "keys": [...]}]}``, each key with ``type`` (str, bool,
    int, float, list, dict, data or choice), ``choices``, ``default``, ``default_text`` (what the
    field starts with), ``help``, ``methods`` (shown only for these methods; None: always),
    ``folder`` (models, data or runs: picked there) and ``required``. Keys the page does not
    set (:data:`CLOSED_KEYS`) are left out."""
    groups: dict[str, list[dict]] = {}
    for item in documented_keys():
        if item.key in CLOSED_KEYS:
            continue
        kind, choices, optional = _kind(item.annotation)
        default = _plain(item.default)
        groups.setdefault(item.group, []).append({
            "key": item.key, "type": kind, "choices": choices, "default": default,
            "default_text": "" if item.default in (None, "", []) else _text(default),
            "help": item.doc, "methods": METHOD_KEYS.get(item.key), "folder": FOLDER_KEYS.get(item.key),
            "required": item.key in REQUIRED, "optional": optional})
    return {"groups": [{"name": name, "keys": keys} for name, keys in groups.items()]}


def _names(text: Any, key: str) -> list[str]:
    if isinstance(text, list):
        return [str(item).strip() for item in text if str(item).strip()]
    if not isinstance(text, str):
        raise PathRefused(key, f"expected file names separated by commas, got {text!r}")
    return [part.strip() for part in text.split(",") if part.strip()]


def _resolve_paths(values: dict[str, Any], folders: Folders, errors: list[dict]) -> dict[str, Any]:
    """The form's values with each folder key's names made paths inside its folder."""
    resolved = dict(values)
    for key, folder in FOLDER_KEYS.items():
        text = values.get(key)
        if text is None or (isinstance(text, str) and not text.strip()) or text == []:
            resolved.pop(key, None)
            if key in REQUIRED:
                errors.append({"key": key, "message": f"{key}: required; pick one in the {folder} folder"})
            continue
        try:
            if folder == "data":
                names = _names(text, key)
                resolved[key] = [str(folders.inside("data", name, f"{key}[{i}]")) for i, name in enumerate(names)]
                if not names and key in REQUIRED:
                    errors.append({"key": key, "message": f"{key}: required; pick a file in the data folder"})
            elif folder == "runs":
                path = folders.inside("runs", str(text), key, must_exist=False)
                if path == folders.runs:
                    raise PathRefused(key, "expected a name for a new run folder inside the runs folder")
                if path.exists() and (not path.is_dir() or any(path.iterdir())):
                    raise PathRefused(key, f"{text!r} is already in the runs folder ({path}); choose a new name "
                                           "(a stopped run goes on with its job's Resume)")
                resolved[key] = str(path)
            else:
                resolved[key] = str(folders.inside("models", str(text), key))
        except PathRefused as exc:
            errors.append({"key": exc.key.partition("[")[0], "message": str(exc)})
            resolved.pop(key, None)
    return resolved


def read_form(values: Any, folders: Folders) -> CheckedForm:
    """The form's ``values`` ({key: text}) as a checked config, or :class:`FormError` listing
    every problem found with its key: unknown keys, keys the page may not set, names outside
    their folder, and then whatever ``chattune train`` itself refuses (types, ranges, methods,
    the machine). An empty text means the key's default; ``output_dir`` must be a new run folder."""
    if not isinstance(values, dict):
        raise FormError([{"key": None, "message": f"values: expected an object of key: text, got {type(values).__name__}"}])
    errors: list[dict] = []
    given: dict[str, Any] = {}
    for key, text in values.items():
        if not isinstance(key, str):
            errors.append({"key": None, "message": f"values: keys must be strings, got {key!r}"})
        elif key in CLOSED_KEYS:
            errors.append({"key": key, "message": f"{key}: not set from the page: {CLOSED_KEYS[key]}"})
        elif text is None or (isinstance(text, str) and not text.strip() and key not in FOLDER_KEYS):
            continue
        elif not isinstance(text, (str, int, float, bool, list)):
            errors.append({"key": key, "message": f"{key}: expected a text value, got {text!r}"})
        else:
            given[key] = text
    resolved = _resolve_paths(given, folders, errors)
    if errors:
        raise FormError(errors)
    from chattune.training.recipe import check_machine  # torch and transformers: not for the schema

    try:
        config = build_config(resolved)
        check_machine(config)
    except ConfigError as exc:
        keys = named_keys(str(exc))
        raise FormError([{"key": keys[0] if keys else None, "message": str(exc)}]) from exc
    plain = {key: _plain(_coerced(config, key)) for key in resolved}
    return CheckedForm(config, plain)


def _coerced(config: RunConfig, key: str) -> Any:
    """The value of ``key`` in ``config`` (a data source as its path when it sets nothing else)."""
    for group in (config.model, config.data, config.method, config.train, config.generate, config.preference, config.rl):
        if hasattr(group, key):
            value = getattr(group, key)
            if isinstance(value, list) and value and all(isinstance(v, DataSource) for v in value):
                return [v.path if v == DataSource(path=v.path) else dataclasses.asdict(v) for v in value]
            return value
    raise KeyError(key)  # pragma: no cover - build_config knows every key


def config_file(form: CheckedForm, folder: Path) -> Path:
    """Write the form's config as ``folder/config.yaml`` (for a job to train from)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(form.yaml(), encoding="utf-8")
    return path
