"""The run configuration as pydantic dataclasses, one per group of keys, each checking itself.

A config is one flat mapping, as the tutorial's command-line flags were
(``lora_rank: 8``, ``per_device_train_batch_size: 6``, ...). Each key belongs to
exactly one group below; the docstring under each field is its pydantic description and
the documentation ``chattune train --help-config`` prints. Each group is a pydantic v2
dataclass (``extra="forbid"``): building one coerces every value given to its field's type
(``fp16="no"`` is False, ``lora_target="q,v"`` a list, strict boolean words only) and checks
the group (its ``validate``), so that a group is never built holding an impossible value; a
wrong value raises :class:`ConfigError` naming the key. They stay dataclasses
(``dataclasses.fields``/``asdict``/``replace`` work; ``replace`` checks again). Reading YAML
and ``key=value`` overrides into these is :mod:`chattune.config_io`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

import yaml
from pydantic import ConfigDict, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chattune.errors import ConfigError

CUDA_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit",
                   "paged_adamw_8bit", "paged_adamw_32bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
                   "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
                   "galore_adamw_8bit", "galore_adamw_8bit_layerwise")
"""transformers' optimizers built on bitsandbytes (CUDA)."""
OPTIMIZER_PACKAGES = {
    "galore_": ("galore_torch", "galore-torch"), "apollo_": ("apollo_torch", "apollo-torch"),
    "lomo": ("lomo_optim", "lomo-optim"), "adalomo": ("lomo_optim", "lomo-optim"),
    "grokadamw": ("grokadamw", "grokadamw"), "schedule_free_": ("schedulefree", "schedulefree"),
    "adamw_torch_4bit": ("torchao", "torchao"), "adamw_torch_8bit": ("torchao", "torchao"),
    "adamw_anyprecision": ("torchdistx", "torchdistx"), "stable_adamw": ("optimi", "torch-optimi"),
}
"""Optimizer name (prefix) -> (module, pip package) it needs beyond torch."""
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor", *CUDA_OPTIMIZERS,
              "galore_adamw", "galore_adafactor", "galore_adamw_layerwise", "galore_adafactor_layerwise",
              "apollo_adamw", "apollo_adamw_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
              "schedule_free_adamw", "schedule_free_sgd", "adamw_torch_4bit", "adamw_torch_8bit",
              "adamw_anyprecision", "stable_adamw")
"""transformers' optimizers (``optim``) that run on CPU or CUDA (not the XLA/NPU ones)."""
LOW_RANK_OPTIMIZERS = ("galore_", "apollo_")
"""Optimizers that project the gradients of ``optim_target_modules`` (GaLore, APOLLO)."""
MAX_LEARNING_RATE = 1e30
"""Above this, Adam's first step (learning_rate / (1 - beta1)) overflows float32."""
MAX_SEED = 2**32 - 1
"""numpy's (and so transformers' ``set_seed``) largest seed."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def parse_bool(value: Any, key: str) -> bool:
    """Parse a boolean the way a user means it: "false", "no", "0" are False."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")


def coerce_value(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for option in non_none:
            try:
                return coerce_value(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {non_none}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        return parse_bool(value, key)
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if value is None:
            raise ConfigError(f"{key}: expected a string, got null")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            value = [value]
        return [coerce_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        typed = args[1] is Any  # values kept as YAML typed them, else strings
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = yaml.safe_load(text)
            else:
                value = {k.strip(): yaml.safe_load(v) if typed else v
                         for k, v in (item.split("=", 1) for item in text.split(",") if "=" in item)}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v if typed else str(v) for k, v in value.items()}
    if annotation is DataSource:
        return data_source(value, key)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):  # a group of RunConfig
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return annotation(**value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def data_source(value: Any, key: str = "train_files") -> DataSource:
    """Build a DataSource from a path string or a mapping, checking its keys."""
    if isinstance(value, str):
        return DataSource(path=value)
    if isinstance(value, DataSource):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a path or a mapping with 'path', got {value!r}")
    hints = _hints(DataSource)
    known = set(hints)
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}: unknown key {name!r}; expected {sorted(known)}")
    if "path" not in value:
        raise ConfigError(f"{key}: missing 'path'")
    kwargs = {k: coerce_value(v, hints[k], f"{key}.{k}") for k, v in value.items()}
    try:
        return DataSource(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc}") from None


_MODEL_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)
"""Every group: unknown keys refused, the docstring under a field its description."""


def _config_error(exc: ValidationError, cls: type) -> ConfigError:
    """The ConfigError a group's validation raised (pydantic wraps it), or one naming the key
    of pydantic's own first complaint (an unknown or missing key)."""
    for error in exc.errors():
        raised = (error.get("ctx") or {}).get("error")
        if isinstance(raised, ConfigError):
            return raised
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=3)
        return ConfigError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if error["type"] in ("missing", "missing_argument"):
        return ConfigError(f"{key}: missing")
    return ConfigError(f"{key}: {error['msg']}" if key else error["msg"])


def config_model(cls):
    """Make ``cls`` a pydantic dataclass (:data:`_MODEL_CONFIG`) whose values are coerced by
    annotation (:func:`coerce_value`) and whose ``validate`` runs once it is built; failures
    raise :class:`ConfigError` naming the key, not pydantic's ValidationError."""

    def coerce_field(inner, value: Any, info) -> Any:
        return coerce_value(value, _hints(inner)[info.field_name], info.field_name)

    def check(self):
        self.validate()
        return self

    cls._coerce_field = field_validator("*", mode="before")(classmethod(coerce_field))
    cls._check = model_validator(mode="after")(check)
    model = pydantic_dataclass(cls, config=_MODEL_CONFIG)
    init = model.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise _config_error(exc, model) from None

    model.__init__ = __init__
    return model


def unchecked(cls, values: dict[str, Any]):
    """A group built from its defaults with ``values`` set as they are, neither coerced nor
    checked: for values a run did not choose (a generation_config.json as found)."""
    built = cls()
    for name, value in values.items():
        setattr(built, name, value)
    return built


@functools.cache
def _schedulers() -> list[str]:
    """transformers' scheduler names (imported only when a run names another than linear)."""
    from transformers import SchedulerType

    return [kind.value for kind in SchedulerType]


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


ROPE_TYPES = ("linear", "dynamic", "yarn")
"""The RoPE scalings ``rope_scaling`` offers (transformers' rope types of the same names)."""
_ROPE_EXAMPLE = "expected e.g. {type: linear, factor: 2.0} or rope_scaling=linear:2.0"


def rope_scaling_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``rope_scaling`` in its canonical form ``{"type": ..., "factor": float}`` (None for none or
    an empty mapping); ConfigError naming the key for an unknown setting or type, or a factor that
    is not a finite number above 1. ``rope_type`` is taken for ``type`` (transformers' name)."""
    if not value:
        return None
    _check(isinstance(value, dict), f"rope_scaling: expected a mapping, got {value!r}; {_ROPE_EXAMPLE}")
    for name in value:
        _check(name in ("type", "rope_type", "factor"),
               f"rope_scaling: unknown setting {name!r}; it takes type and factor ({_ROPE_EXAMPLE})")
    kind = value.get("type", value.get("rope_type"))
    _check(kind in ROPE_TYPES, f"rope_scaling: type: expected one of {list(ROPE_TYPES)}, got {kind!r}")
    factor = value.get("factor")
    if isinstance(factor, str):
        try:
            factor = float(factor)
        except ValueError:
            pass
    _check(isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
           and factor > 1, f"rope_scaling: factor: expected a number > 1 (the context becomes factor x the "
                           f"model's), got {factor!r}")
    return {"type": kind, "factor": float(factor)}


def rope_scaling_short_form(value: Any) -> Any:
    """``rope_scaling``'s command-line short form ``TYPE:FACTOR`` (``linear:2.0``) as a mapping;
    any other value as it is."""
    if isinstance(value, str):
        kind, colon, factor = value.strip().partition(":")
        if colon and kind.strip().isidentifier() and factor.strip():
            return {"type": kind.strip(), "factor": factor.strip()}
    return value


@config_model
class DataSource:
    """One data file and how to read it."""

    path: str
    """File path: JSON array, single JSON object, JSON Lines, CSV or Parquet."""
    format: Literal["auto", "alpaca", "sharegpt", "openai", "columns"] = "auto"
    """Record format; ``auto`` detects it from each record's keys."""
    columns: dict[str, str] | None = None
    """Column map for other layouts, e.g. ``{prompt: content, response: summary}``.
    Targets: prompt, query, response, system, history."""
    max_samples: int | None = None
    """Keep at most this many records from this file (seeded random subset)."""
    weight: float = 1.0
    """Sampling weight: 2.0 repeats the file twice, 0.5 keeps a seeded half."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(math.isfinite(self.weight) and self.weight > 0, f"weight: must be a finite number > 0, got {self.weight}")
        _check(self.max_samples is None or self.max_samples >= 1, f"max_samples: must be >= 1, got {self.max_samples}")


@config_model
class ModelArgs:
    """Which base model to load and how."""

    model_name_or_path: str = ""
    """Local path of a Hugging Face causal LM (or a hub id, offline only if cached)."""
    trust_remote_code: bool = False
    """Allow the model's own code (ChatGLM-6B/2/3 style repositories need it)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Dtype the base weights are loaded in; ``auto``: float16 with fp16, bfloat16 with bf16,
    else float32 (LoRA weights stay float32)."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (e.g. ``auto``); None keeps the model on one device."""
    attn_implementation: str | None = None
    """Attention kernel for training, passed to ``from_pretrained``: ``sdpa``, ``eager``,
    ``flash_attention_2`` (CUDA; packed rows then take its varlen path), ...; None: transformers' default."""
    tokenizer_name_or_path: str | None = None
    """A tokenizer folder to train with instead of the base model's, e.g. one written by
    ``chattune tokenizer extend``: the model gets an embedding (and output) row for every token
    beyond the base's, each starting as the mean of the rows of the pieces the base split it
    into; the run folder keeps the tokenizer, so chat, serve, eval and export need nothing more."""
    rope_scaling: dict[str, Any] | None = None
    """Stretch the model's rotary position embeddings (RoPE) so that max_seq_length may go beyond
    the context it was trained for (max_position_embeddings): ``{type: linear, factor: 2.0}``, or
    on the command line ``rope_scaling=linear:2.0``. Types: ``linear`` (position interpolation),
    ``dynamic`` (NTK-aware, changes nothing up to the trained context), ``yarn``; the context
    becomes factor x the trained one (factor > 1). Recorded with the run: chat, serve, eval and
    export load the base scaled the same way (an export's config.json carries it)."""

    def validate(self) -> None:
        """Reject impossible values, naming the key; ``rope_scaling`` is put in its canonical
        form ``{type, factor}`` (None for none)."""
        self.rope_scaling = rope_scaling_settings(self.rope_scaling)


@config_model
class DataArgs:
    """What to train on and how it is rendered and encoded."""

    train_files: list[DataSource] = field(default_factory=list)
    """Training data files (a path, or mappings with path/format/columns/max_samples/weight). A path
    may be a storage URL read through fsspec (``s3://``, ``gs://``, ``https://``, ``hf://datasets/...``)
    or ``hub:OWNER/NAME[:SPLIT]``, a hub data set through ``datasets.load_dataset``; either is copied
    into the cache folder and read like a local file."""
    eval_files: list[DataSource] = field(default_factory=list)
    """Evaluation data files; if empty, ``eval_fraction`` of the training data is held out."""
    eval_fraction: float = 0.0
    """Share of training records held out for evaluation (seeded by ``seed``)."""
    template: str = "auto"
    """Prompt template: ``auto`` (a converted ChatGLM folder's, else the tokenizer's chat
    template, else ``default``), ``tokenizer``, or a named one (``chattune templates`` lists
    them: alpaca, chinese-alpaca, chinese-alpaca-2, moss, gpt4all, vicuna, chatglm, chatglm2,
    chatglm3, tutorial-alpaca, chatglm-tuning, default)."""
    max_seq_length: int = 512
    """Maximum tokens per row, prompt and answer together."""
    packing: Literal["auto", "pack", "padding_free", "group_by_length", "pad"] = "auto"
    """How rows are batched for training: ``pack`` (rows packed into ``pack_length`` bins, no
    attention across rows), ``padding_free`` (each batch's rows in one sequence, best with
    flash-attention), ``group_by_length`` (padded batches of similar lengths), ``pad`` (padded
    to the longest row). ``auto``: pack where a probe on the model shows packed rows stay
    apart, else group_by_length. In every mode a step carries the tokens of
    per_device_train_batch_size rows on average."""
    pack_length: int | None = None
    """Tokens per packed bin (packing=pack); default max_seq_length. Bins are cut to a step's
    token budget when that is smaller, so that a step never carries more rows than asked."""
    train_on_prompt: bool = False
    """Also supervise the prompt tokens (usually off)."""
    train_last_turn_only: bool = False
    """Supervise only the last assistant turn of multi-turn records."""
    dedup: bool = True
    """Drop exact duplicate records (counted in the summary)."""
    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""
    cache_dir: str | None = None
    """Where encoded data sets are cached; default ``$CHATTUNE_CACHE`` or ``~/.cache/chattune``."""
    text_field: list[str] = field(default_factory=lambda: ["text"])
    """stage pretrain: the field of JSON/JSON Lines/Parquet rows holding a document's text;
    several fields (``[instruction, input, output]``) are joined by a newline."""
    text_documents: Literal["line", "paragraph"] = "line"
    """stage pretrain: in .txt/.md files, one document per line, or per block of lines
    separated by blank lines."""
    streaming: bool = False
    """stage pretrain and sft: read train_files lazily while training (flat memory, for corpora
    larger than memory) instead of encoding and caching them first; needs max_steps. sft: rows
    are read, converted and encoded in file order as training takes them (the files read again
    from the first when max_steps needs more rows), padded, not packed; eval_files are encoded
    up front; eval_fraction, max_samples, weight and interleaving need the whole file first."""
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    """How several train_files become one set (each file first sampled by its max_samples and
    weight): ``concat`` one after another; ``interleave_under`` a row from each in turn (or by
    interleave_probs) until the first runs out; ``interleave_over`` until every file has run
    out once, the smaller ones repeated. The audit gives each file's rows and tokens as drawn."""
    interleave_probs: list[float] | None = None
    """With an interleave mix_strategy: the chance of drawing from each train file, in order
    (weights, normalised), e.g. ``0.7,0.3``; none: strict turns."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(self.max_seq_length >= 8, "max_seq_length: must be >= 8")
        if self.interleave_probs is not None:
            _check(self.mix_strategy != "concat",
                   "interleave_probs: only with mix_strategy interleave_under or interleave_over")
            _check(len(self.interleave_probs) == len(self.train_files),
                   f"interleave_probs: {len(self.interleave_probs)} weights for {len(self.train_files)} train_files; "
                   "give one per file, in order")
            _check(all(math.isfinite(p) and p >= 0 for p in self.interleave_probs) and sum(self.interleave_probs) > 0,
                   f"interleave_probs: weights must be finite, >= 0 and not all 0, got {self.interleave_probs}")
        _check(bool(self.text_field) and all(isinstance(f, str) and f for f in self.text_field),
               "text_field: expected a field name or a list of field names")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction: must be in [0, 1)")
        _check(self.pack_length is None or self.pack_length >= self.max_seq_length,
               f"pack_length: must be >= max_seq_length ({self.max_seq_length}) so that every row fits a bin")


@config_model
class MethodArgs:
    """The fine-tuning method and its settings."""

    method: Literal["lora", "qlora", "freeze", "ptuning", "full"] = "lora"
    """Fine-tuning method: lora, qlora (4/8-bit base + LoRA, CUDA), freeze (last n blocks'
    MLPs; on a vision-language model, the projector), ptuning (P-Tuning v2 prefix encoder),
    full (every parameter; on a vision-language model, all but the vision tower)."""
    lora_rank: int = 8
    """LoRA rank r (lora, qlora)."""
    lora_alpha: float | None = None
    """LoRA alpha; default 2 * lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target: list[str] | None = None
    """Module names to adapt, or ``all-linear``; default per architecture (query_key_value
    for ChatGLM remote code, all linear projections otherwise)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    lora_init: str = "default"
    """LoRA's starting point (peft's ``init_lora_weights``): ``default`` (A random, B zero: the run
    starts as the base), ``gaussian``, ``pissa`` (A and B from the base weights' principal
    singular vectors, the base keeping the residual; ``pissa_niter_N``: a faster randomized SVD)
    or ``olora`` (from a QR decomposition). PiSSA and OLoRA change the base weights while
    training: the run's adapter is stored converted to a plain LoRA of the original base, so
    chat, serve and export load it exactly."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    trainable_token_indices: list[int] | None = None
    """lora: token ids whose embedding rows (and output rows) train beside the adapters, the
    rest of both matrices frozen (peft's trainable tokens); set to the new tokens' ids when
    tokenizer_name_or_path adds tokens and new_tokens_train is ``rows``."""
    new_tokens_train: Literal["rows", "embeddings"] = "rows"
    """lora with new tokens (tokenizer_name_or_path): ``rows`` trains only the new tokens'
    rows of the embedding and output layer (a few MB of optimizer state); ``embeddings`` trains
    both matrices in full (modules_to_save; Chinese-LLaMA's recipe, also moving old tokens)."""
    quantization_bit: int = 4
    """qlora: load the base in 4-bit NF4 (double quantization, bf16 compute) or 8-bit."""
    freeze_trainable_layers: int = 2
    """freeze: train the last n blocks (negative: the first -n blocks)."""
    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["mlp"])
    """freeze: module names trained inside those blocks (``all`` for the whole block)."""
    freeze_extra_modules: list[str] | None = None
    """freeze: further modules trained anywhere, by name (e.g. lm_head)."""
    train_projector: bool = True
    """Vision-language models: train the projector between the vision tower and the language
    model (lora: in full beside the adapters; freeze trains only it, MiniGPT-4's stage)."""
    train_vision_tower: bool = False
    """Vision-language models: train the vision tower too (frozen by default, as MiniGPT-4 and
    LLaVA keep it)."""
    pre_seq_len: int = 16
    """ptuning: number of virtual prefix tokens."""
    prefix_projection: bool = False
    """ptuning: pass the prefix through a two-layer MLP (P-Tuning v2's projection)."""
    prefix_hidden_size: int = 512
    """ptuning: hidden size of that MLP."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(self.lora_rank >= 1, "lora_rank: must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout: must be in [0, 1)")
        _check(self.quantization_bit in (4, 8), "quantization_bit: must be 4 or 8")
        _check(self.freeze_trainable_layers != 0, "freeze_trainable_layers: must not be 0")
        _check(self.pre_seq_len >= 1, "pre_seq_len: must be >= 1")
        _check(self.prefix_hidden_size >= 1, "prefix_hidden_size: must be >= 1")


@config_model
class TrainArgs:
    """Trainer arguments, named as in transformers' TrainingArguments."""

    output_dir: str = "output"
    """Run folder: checkpoints, final adapter, manifest, metrics.jsonl, TensorBoard logs."""
    per_device_train_batch_size: int = 4
    """Rows per step on one device; when packing, the tokens of this many rows on average
    (whole bins, cut to that budget when it is below pack_length), so that the number of steps
    per epoch stays about as without packing."""
    per_device_eval_batch_size: int = 8
    """Rows per evaluation step (when packing, their tokens on average)."""
    gradient_accumulation_steps: int = 1
    """Steps whose gradients are summed before one optimizer update."""
    max_steps: int = -1
    """Optimizer updates to run; -1 means use num_train_epochs."""
    num_train_epochs: float = 3.0
    """Epochs, when max_steps is -1."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """Optimizer, as transformers names them: adamw_torch, adamw_torch_fused, sgd, adagrad,
    rmsprop, adafactor; with their packages galore_* / apollo_* (low-rank gradient projection,
    with optim_target_modules), lomo, adalomo, grokadamw, schedule_free_*, adamw_torch_4bit/8bit
    (torchao), stable_adamw; on CUDA the bitsandbytes ones (adamw_bnb_8bit, paged_adamw_8bit,
    lion_8bit, ...)."""
    optim_target_modules: list[str] | None = None
    """galore_* / apollo_*: the modules whose gradients are projected (e.g. ``[attn, mlp]`` or
    ``all-linear``)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    fp16: bool = False
    """Mixed precision float16 (CUDA)."""
    bf16: bool = False
    """Mixed precision bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    gradient_checkpointing_reentrant: bool = False
    """gradient_checkpointing: torch's reentrant checkpoint (``use_reentrant=True``, the older
    implementation some recipes ask for) instead of the non-reentrant one (the default, torch's
    recommendation); the loss and gradients are the same."""
    offload_activations: bool = False
    """Move the tensors autograd saves for the backward pass to CPU memory (pinned on CUDA) as the
    forward pass makes them, and back as the backward needs them: GPU memory for PCIe time. With
    gradient_checkpointing only each block's input is saved, so that is what moves. On a machine
    without a GPU they are in CPU memory already (nothing moves)."""
    loss: Literal["auto", "chunked", "plain"] = "auto"
    """``chunked``: cross-entropy from the last hidden states, loss_chunk_size tokens at a time,
    without the full-vocabulary logits; ``plain``: from the model's logits. ``auto``: chunked
    where a probe shows the model's logits are its output layer's, else plain."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked loss (memory: about twice this many x vocabulary float32 logits)."""
    neftune_noise_alpha: float | None = None
    """NEFTune: uniform noise scaled by alpha / sqrt(tokens x hidden size) added to the input
    embeddings while training (5 is the paper's usual value); never at evaluation or generation."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the LoRA B matrices learn at learning_rate x this ratio, in their own optimizer
    group (the paper suggests 16; lora and qlora only)."""
    early_stopping_patience: int | None = None
    """Stop training when ``early_stopping_metric`` has not improved for this many evaluations in
    a row (needs eval data; the checkpoints written so far stay)."""
    early_stopping_metric: str = "eval_loss"
    """The eval metric early stopping watches: lower is better for a loss, higher otherwise
    (``eval_rouge-l`` with eval_generate, say)."""
    early_stopping_threshold: float = 0.0
    """The least change of the metric that counts as an improvement."""
    torch_compile: bool = False
    """Compile the model with torch.compile (inductor); the first steps take longer."""
    logging_steps: int = 10
    """Log loss, learning rate, grad norm and tokens/s every this many steps."""
    save_steps: int = 500
    """Write a checkpoint run folder every this many steps."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    eval_steps: int | None = None
    """Evaluate every this many steps (default: save_steps) when eval data exists."""
    eval_generate: bool = False
    """At every evaluation also answer a fixed sample of the eval set greedily and log
    ROUGE-1/2/L, BLEU-4, exact match and answer length (``eval_rouge-l`` ...) beside the loss."""
    eval_generate_samples: int = 32
    """Eval rows answered by eval_generate (the same rows every time)."""
    eval_generate_max_new_tokens: int | None = None
    """New tokens per answer for eval_generate (default: max_new_tokens)."""
    seed: int = 42
    """Seed for initialisation, data order, dropout and the eval split."""
    resume_from_checkpoint: str | None = None
    """``true`` resumes from the latest checkpoint in output_dir, or give a checkpoint path."""
    dataloader_num_workers: int | None = None
    """DataLoader worker processes; default 0 on CPU, 2-4 with CUDA (memory is pinned with CUDA)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: some of ``tensorboard``, ``wandb``, ``mlflow``, ``swanlab`` (each
    through transformers' callback; its package must be installed), or ``none``. They get the
    metrics of metrics.jsonl (tokens/s included) and, once, the run's config and manifest."""
    run_name: str | None = None
    """The run's name in the trackers; default: the output_dir folder's name."""
    project: str | None = None
    """The trackers' project (wandb and SwanLab project, MLflow experiment); default ``chattune``."""
    tags: list[str] | None = None
    """Tags of the run in wandb (its tags) and MLflow (each a tag set to ``true``)."""
    ddp_timeout: int = 1800
    """Several processes (torchrun, ``--nproc``): seconds a process waits for the others at a
    collective step (gradient all-reduce, barrier) before the job fails with a timeout; bounds
    the wait when a process or machine dies outside torchrun's watch (torchrun itself stops the
    job as soon as a worker dies)."""
    fsdp: str = ""
    """Several processes: PyTorch FSDP sharding, e.g. ``full_shard auto_wrap`` (wraps each of the
    architecture's blocks, the blocks ``freeze`` counts); empty: plain data parallel (DDP)."""
    fsdp_config: dict[str, Any] | None = None
    """Extra FSDP settings passed to the Trainer (e.g. ``{version: 2, cpu_ram_efficient_loading: true}``);
    the block class to wrap is filled in from the model."""
    deepspeed: str | None = None
    """Several processes: a DeepSpeed JSON config (``examples/deepspeed/zero2.json`` or
    ``zero3.json``); its ``auto`` values are filled from this config. Needs ``pip install
    'chattune[deepspeed]'`` and CUDA."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size: must be >= 1")
        _check(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size: must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps: must be >= 1")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps: must be >= 1 (or -1 for epochs)")
        _check(self.num_train_epochs > 0, "num_train_epochs: must be > 0")
        _check(math.isfinite(self.num_train_epochs),
               f"num_train_epochs: must be a finite number, got {self.num_train_epochs}; "
               "for a run of a set length use max_steps")
        _check(self.learning_rate > 0, "learning_rate: must be > 0")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "early_stopping_patience: must be >= 1 (evaluations without improvement)")
        _check(math.isfinite(self.early_stopping_threshold) and self.early_stopping_threshold >= 0,
               "early_stopping_threshold: must be a finite number >= 0")
        for key in ("neftune_noise_alpha", "loraplus_lr_ratio"):
            value = getattr(self, key)
            _check(value is None or (math.isfinite(value) and value > 0), f"{key}: must be a finite number > 0")
        _check(self.learning_rate <= MAX_LEARNING_RATE,
               f"learning_rate: {self.learning_rate:g} is beyond what a float32 optimizer can compute with; "
               f"expected a finite number up to {MAX_LEARNING_RATE:g} (LoRA usually 1e-5 to 1e-3)")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "weight_decay: must be a finite number >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps: must be >= 0")
        _check(0 <= self.seed <= MAX_SEED,
               f"seed: must be an integer from 0 to 2**32 - 1 ({MAX_SEED}), got {self.seed}")
        _check(self.logging_steps >= 1, "logging_steps: must be >= 1")
        _check(self.save_steps >= 1, "save_steps: must be >= 1")
        _check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit: must be >= 1")
        _check(self.eval_steps is None or self.eval_steps >= 1, "eval_steps: must be >= 1")
        _check(self.eval_generate_samples >= 1, "eval_generate_samples: must be >= 1")
        _check(self.eval_generate_max_new_tokens is None or self.eval_generate_max_new_tokens >= 1,
               "eval_generate_max_new_tokens: must be >= 1")
        _check(not (self.fp16 and self.bf16), "fp16 and bf16: choose one")
        _check(self.gradient_checkpointing or not self.gradient_checkpointing_reentrant,
               "gradient_checkpointing_reentrant: chooses how gradient_checkpointing recomputes, and it is off; "
               "set gradient_checkpointing=true")
        _check(self.max_grad_norm >= 0, "max_grad_norm: must be >= 0")
        _check(self.optim in OPTIMIZERS, f"optim: expected one of {list(OPTIMIZERS)}")
        _check(not self.optim.startswith(LOW_RANK_OPTIMIZERS) or bool(self.optim_target_modules),
               f"optim_target_modules: {self.optim} projects the gradients of chosen modules; name them "
               "(e.g. optim_target_modules=[attn,mlp] or all-linear)")
        _check(self.dataloader_num_workers is None or self.dataloader_num_workers >= 0,
               "dataloader_num_workers: must be >= 0")
        _check(self.loss_chunk_size >= 1, "loss_chunk_size: must be >= 1")
        _check(self.ddp_timeout >= 1, "ddp_timeout: must be >= 1 (seconds)")
        _check(not (self.fsdp and self.deepspeed), "fsdp and deepspeed: choose one")
        schedulers = _schedulers() if self.lr_scheduler_type != "linear" else ["linear"]
        _check(self.lr_scheduler_type in schedulers, f"lr_scheduler_type: expected one of {schedulers}, "
               f"got {self.lr_scheduler_type!r}")


@config_model
class GenerateArgs:
    """Generation defaults saved with the run and used by chat/predict."""

    max_new_tokens: int = 256
    """Maximum new tokens per answer."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (with do_sample)."""
    top_p: float = 0.9
    """Nucleus sampling mass (with do_sample)."""
    repetition_penalty: float = 1.0
    """Penalty on repeated tokens (1.0 = none)."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(self.max_new_tokens >= 1, "max_new_tokens: must be >= 1")
        _check(self.temperature > 0, "temperature: must be > 0")
        _check(0 < self.top_p <= 1, "top_p: must be in (0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty: must be > 0")


STAGES = ("sft", "dpo", "orpo", "simpo", "kto", "rm")
PAIRED_STAGES = ("dpo", "orpo", "simpo", "rm")
"""Stages trained on pairs of a chosen and a rejected answer (KTO takes single labelled answers)."""
REFERENCE_STAGES = ("dpo", "kto")
"""Stages whose loss compares the model with a reference model (ORPO and SimPO need none)."""


@config_model
class PreferenceArgs:
    """The training stage: continued pre-training on raw text, supervised fine-tuning,
    preference optimisation (DPO, ORPO, SimPO, KTO) on pairs of answers or labelled answers,
    a reward model trained on pairs, or online reinforcement learning (GRPO)."""

    stage: Literal["pretrain", "sft", "dpo", "orpo", "simpo", "kto", "rm", "grpo"] = "sft"
    """``pretrain``: learn raw text (documents from .txt/JSON Lines/Parquet, no template, every
    token supervised, packed without attention across documents). ``sft``: learn the answers
    (instruction data). ``dpo``: prefer the chosen answer over the
    rejected one, relative to a reference model; ``orpo``: the chosen answer's loss plus an
    odds-ratio term, no reference; ``simpo``: length-normalised log-probabilities with a target
    margin, no reference; ``kto``: single answers labelled desirable or not, relative to a
    reference; ``rm``: a reward model, a scalar head on the model scoring a conversation at its
    last token, trained so that the chosen answer scores above the rejected one (Bradley-Terry).
    The preference stages read pair data (chosen/rejected) or, for kto, labelled rows.
    ``grpo``: online reinforcement learning (GRPO): completions sampled from the model for each
    prompt of instruction data, scored by reward functions (keys ``num_generations`` to ``reward_model``)."""
    pref_beta: float = 0.1
    """beta: how far the model may move from the reference (dpo, kto), the weight of the
    odds-ratio term (orpo), the reward scale (simpo; SimPO's paper uses 2.0-2.5)."""
    pref_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """dpo: the loss of the reward margin: ``sigmoid`` (DPO), ``ipo`` (IPO, squared, per token),
    ``hinge`` (SLiC)."""
    pref_label_smoothing: float = 0.0
    """dpo (sigmoid) and simpo: the assumed share of pairs whose labels are flipped (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma."""
    pref_ftx: float = 0.0
    """dpo, simpo: weight of an added supervised loss on the chosen answers (0: none); orpo
    always has its own."""
    kto_desirable_weight: float = 1.0
    """kto: weight of the desirable answers' losses."""
    kto_undesirable_weight: float = 1.0
    """kto: weight of the undesirable answers' losses (raise it when they are fewer)."""
    pref_reference: Literal["auto", "adapter_off", "copy", "precompute"] = "auto"
    """dpo, kto: the reference model. ``adapter_off``: the model with its new adapter switched off
    (LoRA; no second copy); ``precompute``: the reference log-probabilities of every answer
    computed in one pass before training (any method; no second copy); ``copy``: a frozen copy
    of the model (one more model in memory). ``auto``: adapter_off for a new adapter, else precompute."""
    rm_center_coef: float = 0.0
    """rm: weight of a term that keeps the rewards centred at 0, coef x mean((r_chosen + r_rejected)^2)
    (TRL's center_rewards_coefficient; 0: none, 0.01 is usual)."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(math.isfinite(self.pref_beta) and self.pref_beta > 0, "pref_beta: must be a finite number > 0")
        _check(0.0 <= self.pref_label_smoothing < 0.5, "pref_label_smoothing: must be in [0, 0.5)")
        _check(math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0, "simpo_gamma: must be a finite number >= 0")
        _check(math.isfinite(self.pref_ftx) and self.pref_ftx >= 0, "pref_ftx: must be a finite number >= 0")
        _check(math.isfinite(self.rm_center_coef) and self.rm_center_coef >= 0,
               "rm_center_coef: must be a finite number >= 0")
        for key in ("kto_desirable_weight", "kto_undesirable_weight"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value > 0, f"{key}: must be a finite number > 0")
        _check(not (self.pref_label_smoothing and self.stage == "dpo" and self.pref_loss != "sigmoid"),
               f"pref_label_smoothing: applies to pref_loss=sigmoid only, not {self.pref_loss}")


GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo")


@config_model
class RlArgs:
    """stage grpo: the group of completions sampled per prompt, their rewards and the clipped
    objective with its KL term."""

    num_generations: int = 8
    """grpo: completions sampled per prompt (the group whose rewards are normalised); a step
    decodes per_device_train_batch_size prompts x num_generations completions."""
    max_completion_length: int = 256
    """grpo: the most tokens a sampled completion may have; the prompt keeps at most
    max_seq_length - max_completion_length tokens (its oldest turns dropped first)."""
    grpo_temperature: float = 1.0
    """grpo: the sampling temperature of the completions (their log-probabilities are those of
    the same tempered distribution, as TRL computes them)."""
    grpo_top_p: float = 1.0
    """grpo: nucleus sampling mass of the completions (1.0: the whole distribution)."""
    grpo_beta: float = 0.04
    """grpo: weight of the KL term to the reference (the model with its adapter switched off for
    LoRA; a frozen copy for full fine-tuning); 0 drops the term and the reference."""
    grpo_epsilon: float = 0.2
    """grpo: the clip range of the probability ratio, [1 - epsilon, 1 + epsilon_high]."""
    grpo_epsilon_high: float | None = None
    """grpo: the ratio's upper clip (None: grpo_epsilon; DAPO's clip-higher uses 0.28)."""
    grpo_loss: Literal["grpo", "bnpo", "dr_grpo"] = "bnpo"
    """grpo: how the per-token losses become one: ``grpo`` (mean per completion, then over
    completions), ``bnpo`` (mean over every completion token of the batch; TRL's ``dapo``
    without gradient accumulation), ``dr_grpo`` (sum over the batch / (completions x
    max_completion_length), Dr. GRPO)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: advantages are rewards less their group's mean, divided by the standard deviation of
    the ``group`` or of the ``batch``, or not divided (``none``, Dr. GRPO)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["answer_match"])
    """grpo: the reward functions: built in ``answer_match`` (1 when the text in the last
    <answer_tag> equals the row's reference answer, numbers compared as numbers), ``format``
    (1 when the completion matches format_pattern), ``overlong`` (DAPO's soft length penalty:
    0, falling to -1 over the last overlong_buffer tokens of max_completion_length), or
    ``FILE.py:NAME``, a Python function called as fn(prompts=, completions=, completion_ids=,
    answer=, **kwargs) returning one float (or None: does not apply) per completion."""
    reward_weights: list[float] | None = None
    """grpo: each reward function's weight in the summed reward (None: 1 each)."""
    reward_model: str | None = None
    """grpo: a reward model run folder (stage rm) whose score of each conversation is one more
    reward, named ``reward_model``."""
    answer_tag: str = "answer"
    """grpo: answer_match and format read the answer between <answer_tag> and </answer_tag>."""
    format_pattern: str | None = None
    """grpo: the regular expression the ``format`` reward looks for (None: an <answer_tag>...</answer_tag> pair)."""
    overlong_buffer: int | None = None
    """grpo: the ``overlong`` reward's buffer in tokens (None: a quarter of max_completion_length)."""

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        _check(self.num_generations >= 2, "num_generations: must be >= 2 (advantages compare completions "
                                          "of the same prompt)")
        _check(self.max_completion_length >= 1, "max_completion_length: must be >= 1")
        _check(math.isfinite(self.grpo_temperature) and self.grpo_temperature > 0,
               "grpo_temperature: must be a finite number > 0")
        _check(0 < self.grpo_top_p <= 1, "grpo_top_p: must be in (0, 1]")
        _check(math.isfinite(self.grpo_beta) and self.grpo_beta >= 0, "grpo_beta: must be a finite number >= 0")
        _check(math.isfinite(self.grpo_epsilon) and 0 < self.grpo_epsilon < 1, "grpo_epsilon: must be in (0, 1)")
        _check(self.grpo_epsilon_high is None or (math.isfinite(self.grpo_epsilon_high) and self.grpo_epsilon_high > 0),
               "grpo_epsilon_high: must be a finite number > 0")
        _check(bool(self.reward_funcs) or bool(self.reward_model),
               "reward_funcs: no reward: name at least one reward function, or set reward_model")
        count = len(self.reward_funcs) + bool(self.reward_model)
        _check(self.reward_weights is None or len(self.reward_weights) == count,
               f"reward_weights: {len(self.reward_weights or [])} weights for {count} rewards "
               f"({', '.join(self.reward_funcs + (['reward_model'] if self.reward_model else []))}); give one each")
        _check(all(math.isfinite(w) for w in self.reward_weights or []), "reward_weights: must be finite numbers")
        _check(bool(self.answer_tag) and self.answer_tag.replace("_", "").replace("-", "").isalnum(),
               f"answer_tag: {self.answer_tag!r} must be a tag name (letters, digits, _ or -)")
        if self.format_pattern is not None:
            try:
                re.compile(self.format_pattern)
            except re.error as exc:
                raise ConfigError(f"format_pattern: {self.format_pattern!r} is not a regular expression: {exc}") from exc
        _check(self.overlong_buffer is None or 1 <= self.overlong_buffer <= self.max_completion_length,
               "overlong_buffer: must be in [1, max_completion_length]")


@config_model
class RunConfig:
    """The whole configuration of one training run."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    method: MethodArgs = field(default_factory=MethodArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)
    rl: RlArgs = field(default_factory=RlArgs)

    def validate(self) -> None:
        """Check every group (raises ConfigError naming the key); what depends on the method
        table is checked by :func:`chattune.methods.check_run_config`."""
        for group in (self.model, self.data, self.method, self.train, self.generate, self.preference, self.rl):
            group.validate()
        _check(not self.data.streaming or self.preference.stage in ("pretrain", "sft"),
               f"streaming: streams stage pretrain and sft data only, not stage {self.preference.stage}")
        _check(self.train.early_stopping_patience is None or bool(self.data.eval_files) or self.data.eval_fraction > 0,
               "early_stopping_patience: needs eval data to watch; set eval_files or eval_fraction")
        _check(self.train.loraplus_lr_ratio is None or self.method.method in ("lora", "qlora"),
               f"loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; method={self.method.method} "
               "has none (use method=lora)")
        _check(self.preference.stage != "grpo" or self.rl.max_completion_length < self.data.max_seq_length,
               f"max_completion_length: {self.rl.max_completion_length} leaves no room for the prompt in "
               f"max_seq_length={self.data.max_seq_length}; lower it or raise max_seq_length")
        _check(not self.data.streaming or self.train.max_steps >= 1,
               "streaming: a streamed corpus has no known length; set max_steps (the optimizer updates to run)")

    def to_flat_dict(self) -> dict[str, Any]:
        """The config as one flat mapping, the shape of a YAML file."""
        flat: dict[str, Any] = {}
        for group in dataclasses.fields(self):
            flat.update(dataclasses.asdict(getattr(self, group.name)))
        return flat


GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "method": MethodArgs,
    "train": TrainArgs,
    "generate": GenerateArgs,
    "preference": PreferenceArgs,
    "rl": RlArgs,
}
