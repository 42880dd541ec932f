"""The run folder's manifest: what it holds and what it was made from.

``chattune.json`` in every checkpoint and in the final run folder records the
base model (path and hashes of its config and tokenizer), the template (name,
source, and its rendering of a fixed probe conversation), the method and its
settings, the maximum length, the data fingerprint, chattune's version and the
generation defaults. ``chattune.yaml`` beside it is the resolved config.
Everything downstream reads these instead of asking the user again.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from chattune import __version__
from chattune.config import RunConfig
from chattune.data.templates import template_provenance
from chattune.errors import ManifestError
from chattune.methods import get_method
from chattune.model import base_model_fingerprint

MANIFEST_NAME = "chattune.json"
CONFIG_NAME = "chattune.yaml"


def build_manifest(config: RunConfig, base: dict, template_name: str, tokenizer,
                   data_fingerprint: str) -> dict:
    """The manifest of a run, as a JSON-ready dict."""
    return {
        "chattune_version": __version__,
        "base_model": base,
        "template": template_provenance(template_name, tokenizer),
        "method": get_method(config.method.method).manifest_settings(config.method),
        "max_seq_length": config.data.max_seq_length,
        "data_fingerprint": data_fingerprint,
        "generation": asdict(config.generate),
    }


def write_run_files(folder: str | Path, manifest: dict, config: RunConfig, extra: dict | None = None) -> None:
    """Write the manifest and the resolved config into a run folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = dict(manifest)
    if extra:
        data.update(extra)
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    flat = config.to_flat_dict()
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(flat, sort_keys=False, allow_unicode=True))


def read_manifest(folder: str | Path) -> dict:
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
    return json.loads(path.read_text(encoding="utf-8"))


def verify_base_model(manifest: dict, base_path: str, tokenizer=None) -> list[str]:
    """Compare the base model found at ``base_path`` with the manifest's; list the differences."""
    recorded = manifest["base_model"]
    found = base_model_fingerprint(base_path, recorded.get("trust_remote_code", False), tokenizer)
    problems = []
    if found["config_sha256"] != recorded["config_sha256"]:
        problems.append(
            f"base model config at {base_path} differs from the one the adapter was trained on "
            f"(sha256 {found['config_sha256'][:12]} != {recorded['config_sha256'][:12]})"
        )
    if found["tokenizer_sha256"] != recorded["tokenizer_sha256"]:
        problems.append(
            f"tokenizer at {base_path} differs from the one used in training "
            f"(sha256 {found['tokenizer_sha256'][:12]} != {recorded['tokenizer_sha256'][:12]})"
        )
    return problems


def verify_template(manifest: dict, tokenizer) -> list[str]:
    """Check that the template renders the probe conversation as it did in training."""
    recorded = manifest["template"]
    now = template_provenance(recorded["name"], tokenizer)
    if now["probe_rendering"] != recorded["probe_rendering"]:
        return [f"template {recorded['name']!r} now renders differently from training "
                f"(template drift):\n  trained: {recorded['probe_rendering']!r}\n  now:     "
                f"{now['probe_rendering']!r}"]
    return []
