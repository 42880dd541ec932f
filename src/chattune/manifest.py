"""The run folder's manifest: what it holds and what it was made from.

``chattune.json`` in every checkpoint and in the final run folder records the
base model (path and hashes of its config and tokenizer), the template (name,
source, and its rendering of a fixed probe conversation), the method and its
settings, the maximum length, the data fingerprint, chattune's version, the
generation defaults and the RoPE scaling the base was loaded with. ``chattune.yaml``
beside it is the resolved config. Everything downstream reads a :class:`Manifest`
instead of asking the user again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chattune import __version__
from chattune.config import GenerateArgs, RunConfig, rope_scaling_settings
from chattune.errors import ChattuneError, ConfigError, ManifestError
from chattune.methods import get_method
from chattune.model import base_model_fingerprint
from chattune.templates.registry import template_provenance

MANIFEST_NAME = "chattune.json"
CONFIG_NAME = "chattune.yaml"
RESULT_KEYS = ("global_step", "train_loss", "eval_loss", "trainable_parameters")


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model a run was trained on."""

    path: str
    config_sha256: str
    tokenizer_sha256: str
    model_type: str | None = None
    trust_remote_code: bool = False
    native_path: str | None = None
    """The converted folder chattune loaded for a GGUF file or a THUDM ChatGLM folder at ``path``."""
    gguf_sha256: str | None = None
    """For a base model converted from a GGUF file: that file's sha256."""
    gguf_file_type: str | None = None
    """... and its quantization type (``general.file_type``: ``Q4_1``, ``Q4_K_M``, ``F16``, ...)."""


@dataclass(frozen=True)
class TemplateRecord:
    """The template a run was trained with, and its rendering of the probe conversation."""

    name: str
    probe_rendering: str
    source: str = ""
    chat_template: str | None = None
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A run folder's ``chattune.json``, typed."""

    base_model: BaseModelRecord
    template: TemplateRecord
    method: str
    method_settings: dict
    max_seq_length: int
    data_fingerprint: str
    generation: GenerateArgs
    chattune_version: str = __version__
    results: dict = field(default_factory=dict)
    """What training reported: global_step, train_loss, eval_loss, trainable_parameters."""
    stage: dict = field(default_factory=dict)
    """A pre-training or preference run's stage (pretrain, dpo, orpo, simpo, kto), its settings
    and the reference it used (``{}`` for supervised fine-tuning)."""
    vocabulary: dict = field(default_factory=dict)
    """A run trained with another tokenizer than its base's (``tokenizer_name_or_path``): that
    tokenizer, its hash, the model's embedding rows and how new rows were made and trained
    (``{}`` otherwise). Loading the run resizes the base to ``rows`` first."""
    vision: dict = field(default_factory=dict)
    """A vision-language run: the model type, its image token, and which of the vision tower and
    the projector trained (``{}`` for a text model)."""
    rope_scaling: dict = field(default_factory=dict)
    """The RoPE scaling the base was loaded with (``rope_scaling``: ``{type, factor}``; ``{}``
    for none): loading the run for inference or export scales the base the same way."""

    def to_json(self) -> dict:
        """The manifest as written to ``chattune.json``."""
        return {
            "chattune_version": self.chattune_version,
            "base_model": dataclasses.asdict(self.base_model),
            "template": {**dataclasses.asdict(self.template), "stop_strings": list(self.template.stop_strings),
                         "stop_tokens": list(self.template.stop_tokens)},
            "method": {"name": self.method, **self.method_settings},
            "max_seq_length": self.max_seq_length,
            "data_fingerprint": self.data_fingerprint,
            "generation": dataclasses.asdict(self.generation),
            **({"stage": self.stage} if self.stage else {}),
            **({"vocabulary": self.vocabulary} if self.vocabulary else {}),
            **({"vision": self.vision} if self.vision else {}),
            **({"rope_scaling": self.rope_scaling} if self.rope_scaling else {}),
            **self.results,
        }

    @classmethod
    def from_json(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        """A manifest from its JSON, or an error naming the key that is missing or wrong."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        method = dict(_section(data, "method", where))
        name = method.pop("name", None)
        if not isinstance(name, str):
            raise ManifestError(f"{where}: method.name: expected the method's name, got {name!r}")
        return cls(
            base_model=_record(BaseModelRecord, _section(data, "base_model", where), "base_model", where),
            template=_record(TemplateRecord, _section(data, "template", where), "template", where),
            method=name,
            method_settings=method,
            max_seq_length=_value(data, "max_seq_length", int, where),
            data_fingerprint=_value(data, "data_fingerprint", str, where),
            generation=_generation(_section(data, "generation", where), where),
            chattune_version=str(data.get("chattune_version", "unknown")),
            results={k: data[k] for k in RESULT_KEYS if k in data},
            stage=dict(_section(data, "stage", where)) if "stage" in data else {},
            vocabulary=dict(_section(data, "vocabulary", where)) if "vocabulary" in data else {},
            vision=dict(_section(data, "vision", where)) if "vision" in data else {},
            rope_scaling=_rope_scaling(data, where),
        )


def _rope_scaling(data: dict, where: str) -> dict:
    """The manifest's ``rope_scaling`` in its canonical form (``{}`` when absent), or an error naming it."""
    if "rope_scaling" not in data:
        return {}
    try:
        return rope_scaling_settings(_section(data, "rope_scaling", where)) or {}
    except ConfigError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {key}: expected an object, got {value!r}")
    return value


def _value(data: dict, key: str, kind: type, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
    return value


_JSON_TYPES = {"str": (str,), "str | None": (str, type(None)), "bool": (bool,), "int": (int,),
               "float": (int, float), "tuple[str, ...]": (list, tuple)}


def _typed(name: str, value, annotation: str, key: str, where: str):
    """``value`` if it has the field's JSON type, else an error naming ``key.name``."""
    kinds = _JSON_TYPES[annotation]
    wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if not wrong and annotation == "tuple[str, ...]":
        wrong = not all(isinstance(item, str) for item in value)
        value = tuple(value)
    if wrong:
        raise ManifestError(f"{where}: {key}.{name}: expected {annotation}, got {value!r}")
    return value


def _record(kind, values: dict, key: str, where: str):
    names = {f.name: f for f in dataclasses.fields(kind)}
    missing = [n for n, f in names.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in values]
    if missing:
        raise ManifestError(f"{where}: {key}.{missing[0]}: missing")
    return kind(**{k: _typed(k, v, names[k].type, key, where) for k, v in values.items() if k in names})


def _generation(values: dict, where: str) -> GenerateArgs:
    fields = {f.name: f for f in dataclasses.fields(GenerateArgs)}
    typed = {k: _typed(k, v, fields[k].type, "generation", where) for k, v in values.items() if k in fields}
    try:
        generation = GenerateArgs(**typed)  # checked as it is built
    except ConfigError as exc:
        raise ManifestError(f"{where}: generation.{exc}") from None
    return generation


def build_manifest(config: RunConfig, base: dict, template_name: str, tokenizer,
                   data_fingerprint: str, stage: dict | None = None, vocabulary: dict | None = None,
                   vision: dict | None = None) -> Manifest:
    """The manifest of a run about to train (``stage``: a pre-training or preference run's stage
    record; ``vocabulary``: its own tokenizer's record; ``vision``: a vision-language run's record)."""
    method = get_method(config.method.method)
    settings = method.manifest_settings(config.method)
    settings.pop("name")
    template = template_provenance(template_name, tokenizer)
    return Manifest(
        base_model=_record(BaseModelRecord, base, "base_model", "manifest"),
        template=_record(TemplateRecord, template, "template", "manifest"),
        method=method.name,
        method_settings=settings,
        max_seq_length=config.data.max_seq_length,
        data_fingerprint=data_fingerprint,
        generation=dataclasses.replace(config.generate),
        stage=dict(stage or {}),
        vocabulary=dict(vocabulary or {}),
        vision=dict(vision or {}),
        rope_scaling=dict(rope_scaling_settings(config.model.rope_scaling) or {}),
    )


def write_run_files(folder: str | Path, manifest: Manifest, config: RunConfig, extra: dict | None = None) -> None:
    """Write the manifest (with ``extra`` results) and the resolved config into a run folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = manifest.to_json()
    data.update(extra or {})
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    flat = config.to_flat_dict()
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(flat, sort_keys=False, allow_unicode=True))


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> Manifest:
    """Read a run folder's manifest, or explain what the folder is missing."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such run folder")
    if not path.is_file():
        raise ManifestError(
            f"{folder}: no {MANIFEST_NAME}; this is not a chattune run folder "
            "(pass a base model with --base-model to chat without an adapter)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    return Manifest.from_json(data, str(path))


def verify_base_model(manifest: Manifest, base_path: str, tokenizer=None) -> list[str]:
    """Compare the base model found at ``base_path`` with the manifest's; list the differences."""
    recorded = manifest.base_model
    found = base_model_fingerprint(base_path, recorded.trust_remote_code, tokenizer)
    problems = []
    if recorded.gguf_sha256 and found.get("gguf_sha256") != recorded.gguf_sha256:
        now = (f"the GGUF file with sha256 {found['gguf_sha256'][:12]} ({found.get('gguf_file_type')})"
               if found.get("gguf_sha256") else "not converted from a GGUF file")
        problems.append(
            f"base model at {base_path} is {now}; the run was trained on the GGUF file {recorded.path} "
            f"with sha256 {recorded.gguf_sha256[:12]} ({recorded.gguf_file_type}): other weights"
        )
    if found["config_sha256"] != recorded.config_sha256:
        problems.append(
            f"base model config at {base_path} differs from the one the adapter was trained on "
            f"(sha256 {found['config_sha256'][:12]} != {recorded.config_sha256[:12]})"
        )
    if found["tokenizer_sha256"] != recorded.tokenizer_sha256:
        problems.append(
            f"tokenizer at {base_path} differs from the one used in training "
            f"(sha256 {found['tokenizer_sha256'][:12]} != {recorded.tokenizer_sha256[:12]})"
        )
    return problems


RENAMED_TEMPLATES = {"alpaca": "tutorial-alpaca"}
"""Template names that meant another template before: old name -> the template it named then
(``alpaca`` was the tutorial's ``### Instruction: ... END`` variant until chattune 0.2; it is
now Stanford Alpaca's prompt)."""


def recorded_template(manifest: Manifest, tokenizer) -> str:
    """The template a run folder was trained with, by today's names: the recorded name, unless
    that name was given to another template since and the recorded rendering of the probe
    conversation is the renamed template's (an older run folder), then the new name."""
    recorded = manifest.template
    renamed = RENAMED_TEMPLATES.get(recorded.name)
    if renamed is None:
        return recorded.name
    try:
        if template_provenance(recorded.name, tokenizer)["probe_rendering"] == recorded.probe_rendering:
            return recorded.name
    except ChattuneError:
        pass
    if template_provenance(renamed, tokenizer)["probe_rendering"] == recorded.probe_rendering:
        return renamed
    return recorded.name


def verify_template(manifest: Manifest, tokenizer) -> list[str]:
    """Check that the template renders the probe conversation as it did in training."""
    recorded = manifest.template
    now = template_provenance(recorded_template(manifest, tokenizer), tokenizer)
    if now["probe_rendering"] != recorded.probe_rendering:
        return [f"template {recorded.name!r} now renders differently from training "
                f"(template drift):\n  trained: {recorded.probe_rendering!r}\n  now:     "
                f"{now['probe_rendering']!r}"]
    return []
