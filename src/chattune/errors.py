"""chattune's errors: every one a :class:`ChattuneError`, printed by the CLI as one line.

Each stage keeps its own subclass beside its code (``RecordError`` and
``DataFileError`` in :mod:`chattune.data.formats`/``records``, ``TemplateError`` in
:mod:`chattune.templates.registry`); the ones several stages raise live here. A
message names the file, line, key or field at fault and what was expected.
"""

from __future__ import annotations


class ChattuneError(Exception):
    """Bad input or a setting this machine cannot honour; the message says which and why."""


class ConfigError(ChattuneError, ValueError):
    """A configuration key is unknown, mistyped or out of range."""


class DataError(ChattuneError, ValueError):
    """Data that cannot be trained on as configured (no rows left, rows too long to pack, ...)."""


class ModelLoadError(ChattuneError, RuntimeError):
    """The base model or tokenizer could not be loaded, or is unusable; the message says why."""


class ManifestError(ChattuneError, RuntimeError):
    """A run folder is missing its manifest, or does not match what it was made from."""


class TrainingError(ChattuneError, RuntimeError):
    """Training stopped: it diverged (a non-finite loss, gradient or weight), or the run folder
    could not be written (disk full, read-only, no permission); the message says which and
    what to do."""
