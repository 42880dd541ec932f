"""Reading a run configuration: flat YAML plus ``key=value`` overrides, typed and checked.

Values are coerced to each key's annotated type by the groups of :mod:`chattune.config`
(pydantic dataclasses; ``fp16=false`` is False, ``lora_target=q,v`` a list); unknown keys (with
a close match suggested), wrong types and impossible values raise :class:`ConfigError` naming
the key. ``describe_keys`` documents every key from the fields' own docstrings (pydantic's
field descriptions).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from chattune.config import (  # noqa: F401 (parse_bool, data_source: re-exported)
    _FALSE,
    _TRUE,
    GROUPS,
    GenerateArgs,
    RunConfig,
    data_source,
    parse_bool,
    rope_scaling_short_form,
    unchecked,
)
from chattune.errors import ConfigError
from chattune.methods import check_run_config

_KEY_TO_GROUP: dict[str, str] = {
    f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
}
_SHORT_FORMS = {"rope_scaling": rope_scaling_short_form}
"""Keys with a command-line short form: key -> what turns it into the key's type."""


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_KEY_TO_GROUP), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a mapping; values stay strings for typed coercion."""
    result: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        result[key.strip()] = value
    return result


def build_config(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a flat mapping of keys to values."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for key, value in values.items():
        if key not in _KEY_TO_GROUP:
            raise _unknown_key_error(key)
        grouped[_KEY_TO_GROUP[key]][key] = _SHORT_FORMS.get(key, lambda v: v)(value)
    config = RunConfig(**{name: GROUPS[name](**kw) for name, kw in grouped.items()})  # coerced and checked
    check_run_config(config)
    return config


COMMAND_LINE = "command line"
_LEADING_KEYS = re.compile(r"^(?:unknown config key '([^']+)'|([A-Za-z_]\w*)(?: and ([A-Za-z_]\w*))?)")


def named_keys(message: str) -> list[str]:
    """The config keys an error message starts with (``lora_rank: ...``, ``train_files[0]: ...``,
    ``fp16 and bf16: ...``)."""
    match = _LEADING_KEYS.match(message)
    return [key for key in match.groups() if key] if match else []


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file (may be None) and apply ``key=value`` overrides.

    An error names where the value at fault came from: ``<file>: key: ...`` for the file,
    ``command line: key: ...`` for an override given beside a file (without a file, just
    ``key: ...``). The config remembers each key's source for later errors
    (:func:`source_prefix`)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "expected a YAML config file") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}); expected a YAML config file") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values.update(loaded)
    sources = {str(key): str(path) for key in values}
    given = parse_overrides(overrides or [])
    sources.update({key: COMMAND_LINE for key in given})
    values.update(given)
    try:
        config = build_config(values)
    except ConfigError as exc:
        named = [sources.get(key) for key in named_keys(str(exc))]
        if path is None:
            where = ""
        elif COMMAND_LINE in named:
            where = f"{COMMAND_LINE}: "
        else:
            where = f"{path}: "
        raise ConfigError(f"{where}{exc}") from exc
    config.sources = sources if path is not None else {}
    return config


def source_prefix(config: RunConfig, key: str) -> str:
    """``"<file>: "`` or ``"command line: "`` for a key whose value came from there (as read
    by :func:`load_config` with a file), else ``""``: the start of an error about that key."""
    source = getattr(config, "sources", {}).get(key)
    return f"{source}: " if source else ""


def resume_setting(config: RunConfig) -> bool | str | None:
    """``resume_from_checkpoint`` as the user meant it: True (latest), a path, or None."""
    value = config.train.resume_from_checkpoint
    if value is None:
        return None
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return None
    return value


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as ``--help-config`` documents it."""

    group: str
    key: str
    annotation: Any
    default: Any
    doc: str


def documented_keys() -> list[KeyDoc]:
    """Every config key, group by group, with its type, default and docstring (the text under
    the field in :mod:`chattune.config`, pydantic's description of the field)."""
    found = []
    for group, cls in GROUPS.items():
        defaults, hints = cls(), typing.get_type_hints(cls)
        described = cls.__pydantic_fields__
        found += [KeyDoc(group, f.name, hints[f.name], getattr(defaults, f.name),
                         " ".join((described[f.name].description or "").split()))
                  for f in dataclasses.fields(cls)]
    return found


def describe_keys(markdown: bool = False) -> str:
    """Every config key with its default and docstring, for ``--help-config``
    (``markdown``: as the README's table)."""
    lines = ["| key | default | meaning |", "|---|---|---|"] if markdown else []
    group = None
    for item in documented_keys():
        if not markdown and item.group != group:
            lines.append(f"[{item.group}]")
        group = item.group
        if markdown:
            lines.append(f"| `{item.key}` | `{item.default!r}` | {item.doc.replace('|', '/')} ({item.group}) |")
        else:
            lines += [f"  {item.key} (default: {item.default!r})", f"      {item.doc}"]
    return "\n".join(lines)


def generation_defaults(folder: Path):
    """The run's generation defaults as ``chattune export`` wrote them (generation_config.json),
    as a :class:`chattune.config.GenerateArgs`; its defaults where a key is absent."""
    try:
        saved = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    names = {field.name for field in dataclasses.fields(GenerateArgs)}
    generation = unchecked(GenerateArgs, {name: saved[name] for name in names if saved.get(name) is not None})
    if "top_k" not in names and saved.get("top_k") is not None:
        generation.top_k = saved["top_k"]  # read by write_modelfile
    return generation
