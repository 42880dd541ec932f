"""Load a run folder (or a bare base model) for inference: one loader for every consumer.

:func:`load_run` reads the manifest, picks the tokenizer (the run folder's when it
has one, else the base model's), checks the base model and the template against
what training recorded (stopping unless ``force``), loads the base model the way
the method says (quantized for qlora on CUDA; the run folder itself for full) with
the trained weights on it, and returns a :class:`LoadedRun`: the model, the
tokenizer and one :class:`ServedModel` per name a request may pick. chat, predict, the
demo and serve all load through it.

Several runs can be loaded onto one base model as named LoRA adapters (``adapters``),
served side by side; a run whose method cannot share a batch (freeze, full,
P-Tuning v2, DoRA) is loaded alone.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from chattune.config import GenerateArgs, ModelArgs
from chattune.data.encode import PieceEncoder, encode_prompt, prompt_pieces, visible_chars
from chattune.data.images import splice_images, with_image_token
from chattune.data.records import user_text
from chattune.errors import ChattuneError, ConfigError, ManifestError
from chattune.inference.decoding import BASE_ADAPTER
from chattune.inference.vocabulary import UndecodableToken, logits_width, undecodable_ids
from chattune.manifest import (
    Manifest,
    is_run_folder,
    read_manifest,
    recorded_template,
    verify_base_model,
    verify_template,
)
from chattune.methods import Method, get_method
from chattune.model import context_length, load_model, load_tokenizer
from chattune.templates.registry import get_template, resolve_template_name
from chattune.vision.images import (
    PLACEHOLDER,
    ImageError,
    count_placeholders,
    load_image,
    resolve_ref,
)
from chattune.vision.processor import load_vision
from chattune.vocab.resize import resize_like_run

BASE_NAME = "base"
PIECES_PER_LOCK = 256
"""Prompt pieces tokenized per hold of the tokenizer lock (what the engine's decoding may wait for)."""


class ImagesNotSupported(ChattuneError):
    """A request with images to a model that reads none."""


class PromptTooLong(ChattuneError):
    """A prompt has more tokens than its caller allows: ``tokens`` were counted before stopping."""

    def __init__(self, tokens: int, most: int):
        super().__init__(f"the prompt is at least {tokens} tokens, more than {most}")
        self.tokens, self.most = tokens, most


@dataclass
class LoadOptions:
    """What a user may say about loading (``chattune chat/predict/serve`` flags)."""

    base_model: str | None = None
    """The base model's path, instead of the manifest's."""
    template: str | None = None
    """The template of ``target`` (a run folder's, instead of its manifest's; or a bare base
    model's, instead of its tokenizer's chat template)."""
    force: bool = False
    """Load even when the base model or the template differs from training's (with a warning)."""
    trust_remote_code: bool = False
    """For a bare base model; a run folder's manifest says this itself."""
    name: str | None = None
    """The main run's name (default: its folder's name)."""
    adapters: list[tuple[str, str]] = field(default_factory=list)
    """More run folders on the same base model, as (name, folder)."""


@dataclass
class ServedModel:
    """A served model: a name a request may pick, for a run (or the bare base model) with its
    template, generation defaults and stop tokens."""

    name: str
    template: str
    generation: GenerateArgs
    stop_strings: list[str]
    stop_token_ids: frozenset[int]
    adapter: str = BASE_ADAPTER
    """The peft adapter its rows use (``__base__``: none, or the only weights there are)."""
    run_dir: Path | None = None
    manifest: Manifest | None = None


@dataclass
class LoadedRun:
    """A model ready to answer: its tokenizer, the names it answers to, its context length."""

    model: object
    tokenizer: object
    profiles: dict[str, ServedModel]
    default: str
    context_length: int
    uses_adapters: bool
    vision: object = None
    """A vision-language model's :class:`~chattune.vision.processor.VisionProcessor` (None: text only)."""
    encoder: PieceEncoder = field(init=False)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.encoder = PieceEncoder(self.tokenizer, max_entries=4096, max_chars=1 << 20)  # long-lived: bounded

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    def profile(self, name: str | None = None) -> ServedModel:
        """The served model called ``name`` (the default one for None); KeyError if unknown."""
        return self.profiles[name or self.default]

    def prompt_ids(self, messages: list[dict], profile: ServedModel | None = None,
                   max_tokens: int | None = None, tools: list[dict] | None = None, *,
                   most: int | None = None) -> list[int]:
        """Token ids of a conversation ending with the user's message (or a tool result),
        rendered with the profile's template through training's own encoder, with the
        ``tools`` it offers; at most ``max_tokens`` (oldest turns dropped first).

        Without ``max_tokens`` the template renders outside the tokenizer lock, which is then
        held for :data:`PIECES_PER_LOCK` pieces at a time, and ``most`` stops the counting:
        PromptTooLong as soon as the ids so far are more than ``most``."""
        profile = profile or self.profile()
        if max_tokens is not None:
            with self.tokenizer_lock:
                return encode_prompt(messages, profile.template, self.encoder, max_tokens, tools)
        pieces = prompt_pieces(messages, profile.template, self.tokenizer, tools)
        ids: list[int] = []
        for start in range(0, len(pieces), PIECES_PER_LOCK):
            with self.tokenizer_lock:
                ids += self.encoder.ids_of(pieces[start:start + PIECES_PER_LOCK])
            if most is not None and len(ids) > most:
                raise PromptTooLong(len(ids), most)
        return ids

    def image_prompt(self, messages: list[dict], profile: ServedModel | None = None,
                     max_tokens: int | None = None, tools: list[dict] | None = None) -> tuple[list[int], list]:
        """Token ids of a conversation whose messages carry ``images`` (one per ``<image>``
        placeholder in their text, in order: Pillow images or references, see
        :func:`~chattune.vision.images.resolve_ref`), each image expanded into its tokens by the
        model's processor, at most ``max_tokens`` in all; and the images the ids keep, in order
        (oldest turns, and their images, dropped first).

        Raises ImagesNotSupported for a model that reads no images, ImageError for an image
        that cannot be used, PromptTooLong when the last turn's images alone do not fit."""
        if self.vision is None:
            raise ImagesNotSupported("this model reads no images (not a vision-language model); "
                                     "send text only, or serve a vision-language model")
        images = [load_image(resolve_ref(ref, None, f"messages[{i}].images[{j}]"), f"messages[{i}].images[{j}]")
                  if isinstance(ref, str) else ref.convert("RGB")
                  for i, m in enumerate(messages) for j, ref in enumerate(m.get("images") or [])]
        placed = count_placeholders(messages)
        if placed != len(images):
            raise ImageError(f"the messages hold {placed} {PLACEHOLDER} placeholders and {len(images)} images; "
                             "expected one image per placeholder")
        with self.tokenizer_lock:
            expansions = [self.vision.expansion(image) for image in images]
        most = max_tokens if max_tokens is not None else self.context_length
        profile = profile or self.profile()
        marked = with_image_token(messages, self.vision.placeholder)
        ids, kept = self._cut_with_images(marked, profile, most, expansions, tools)
        last = next((m for m in reversed(messages) if m["role"] == "user"), messages[-1])
        if not ids or kept < count_placeholders([last]):  # the question's own images do not fit
            raise PromptTooLong(max(most + 1, len(ids) + sum(len(e) - 1 for e in expansions)), most)
        spliced = splice_images(ids, ids, self.vision.image_token_id, expansions[len(images) - kept:])
        return spliced[0], images[len(images) - kept:] if kept else []

    def _cut_with_images(self, marked: list[dict], profile: ServedModel, most: int, expansions: list[list[int]],
                         tools: list[dict] | None) -> tuple[list[int], int]:
        """The prompt ids (one image token per image) of the longest cut whose ids and kept
        images' tokens fit ``most``, and how many images (the last ones) it keeps: room is left for
        every image, then for one image fewer (the cut dropped the oldest one's turn), and so on,
        until the cut keeps as many images as it left room for."""
        def extra(keep: int) -> int:
            return sum(len(e) - 1 for e in expansions[len(expansions) - keep:])

        def encode(keep: int) -> tuple[list[int], int]:
            budget = most - extra(keep)
            if budget < 1:
                return [], 0
            with self.tokenizer_lock:
                ids = encode_prompt(marked, profile.template, self.encoder, budget, tools)
            return ids, sum(1 for token in ids if token == self.vision.image_token_id)

        best: tuple[list[int], int] = ([], 0)
        for keep in range(len(expansions), -1, -1):  # room for the last `keep` images
            ids, kept = encode(keep)
            if not ids or len(ids) + extra(kept) > most:
                continue
            if kept >= keep:
                return ids, kept
            if not best[0]:
                best = (ids, kept)
        return best

    def fewest_prompt_tokens(self, messages: list[dict]) -> int:
        """A lower bound on the prompt tokens of ``messages`` under any template, from the users'
        text alone (every template shows it), found without rendering anything."""
        chars = visible_chars([user_text(m) for m in messages if m["role"] == "user"])
        with self.tokenizer_lock:
            widest = self.encoder.widest_token
        return -(-chars // widest)

    def decode(self, ids: list[int], keep: frozenset[int] = frozenset(), clean_up: bool | None = None) -> str:
        """Token ids to text, special tokens left out but for those in ``keep``, written as
        their token text (a template's marker that tool call parsing needs, ChatGLM3's
        ``<|assistant|>``); ``clean_up``: the tokenizer's clean-up of spaces before
        punctuation, on or off (None: as the tokenizer says). Raises UndecodableToken for an
        id the tokenizer has no text for (:attr:`undecodable_ids`)."""
        bad = self.undecodable_ids.intersection(ids)
        if bad:
            raise UndecodableToken(sorted(bad), logits_width(self.model) or 0, len(self.undecodable_ids))
        options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": clean_up}
        with self.tokenizer_lock:
            if not keep.intersection(ids):
                return self.tokenizer.decode(ids, **options)
            parts, run = [], []
            for token in ids:
                if token in keep:
                    parts += [self.tokenizer.decode(run, **options), self.tokenizer.convert_ids_to_tokens(token)]
                    run = []
                else:
                    run.append(token)
            return "".join([*parts, self.tokenizer.decode(run, **options)])

    @cached_property
    def undecodable_ids(self) -> frozenset[int]:
        """The ids the model has logits for that the tokenizer cannot decode (none of them a
        special token or a served model's stop token); computed once."""
        width = logits_width(self.model)
        if width is None:
            return frozenset()
        stops = frozenset().union(*(profile.stop_token_ids for profile in self.profiles.values()))
        with self.tokenizer_lock:
            return frozenset(undecodable_ids(self.tokenizer, width, stops))

    @cached_property
    def banned_ids(self):
        """:attr:`undecodable_ids` as a tensor on the model's device, for the decoder to set
        their logits to -inf (None when there are none)."""
        if not self.undecodable_ids:
            return None
        return torch.as_tensor(sorted(self.undecodable_ids), dtype=torch.long, device=self.device)

    def token_ids(self, tokens) -> frozenset[int]:
        """The ids of those ``tokens`` (texts) that the tokenizer has as single tokens."""
        found = set()
        with self.tokenizer_lock:
            for token in tokens:
                token_id = self.tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and (token_id != self.tokenizer.unk_token_id
                                                  or token == self.tokenizer.unk_token):
                    found.add(token_id)
        return frozenset(found)


def stop_token_ids(tokenizer, template: str) -> frozenset[int]:
    """EOS and the template's end tokens that the tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    named = get_template(template)
    for token in named.stop_tokens if named else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return frozenset(i for i in ids if i is not None)


def make_served_model(name: str, tokenizer, template: str, generation: GenerateArgs, adapter: str = BASE_ADAPTER,
                 run_dir: Path | None = None, manifest: Manifest | None = None) -> ServedModel:
    """A served model with its template's stop strings and stop tokens."""
    named = get_template(template)
    return ServedModel(name, template, generation, list(named.stop_strings) if named else [],
                   stop_token_ids(tokenizer, template), adapter, run_dir, manifest)


@dataclass
class _Run:
    name: str
    folder: Path
    manifest: Manifest

    @property
    def method(self) -> Method:
        try:
            return get_method(self.manifest.method)
        except ConfigError:
            raise ManifestError(f"{self.folder}: method {self.manifest.method!r} is not supported by this "
                                "chattune") from None


def default_name(folder: Path) -> str:
    """A run folder's name as a model name: its folder's, spaces as dashes (``run`` for ``base``)."""
    name = "-".join(folder.resolve().name.split())
    return name if name and name != BASE_NAME else "run"


def _check_names(runs: list[_Run]) -> None:
    seen = set()
    for run in runs:
        name = run.name
        if name == BASE_NAME or name in seen or not name or any(c.isspace() for c in name):
            raise ConfigError(f"adapter name {name!r}: names must be unique, without spaces, "
                              f"and not {BASE_NAME!r} (the bare base model's name)")
        seen.add(name)


def _trains_vision_modules(run: _Run) -> bool:
    """Whether a vision-language run trained its projector or vision tower in full (peft cannot
    mix such a copy of a module with the base's, or another adapter's, in one batch)."""
    vision = run.manifest.vision
    return "trained" in (vision.get("projector"), vision.get("vision_tower"))


def _served_alone(run: _Run) -> bool:
    return run.method.served_alone(run.manifest.method_settings) or _trains_vision_modules(run)


def _check_batchable(runs: list[_Run]) -> None:
    for run in runs:
        if _served_alone(run):
            kind = ("a DoRA adapter" if run.manifest.method_settings.get("use_dora")
                    else "a vision-language run whose projector or vision tower trained in full"
                    if _trains_vision_modules(run) and run.method.batches_with_adapters
                    else f"a {run.method.name} run")
            raise ManifestError(f"{run.name!r} ({run.folder}) is {kind}, which cannot share a batch with "
                                "other adapters or the base model; serve it alone: chattune serve RUN_DIR")


def _check_same_base(runs: list[_Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        mine, theirs = run.manifest.rope_scaling or "none", first.manifest.rope_scaling or "none"
        if mine != theirs:
            raise ManifestError(
                f"adapter {run.name!r} ({run.folder}) was trained with RoPE scaling {mine} and {first.name!r} "
                f"({first.folder}) with {theirs}: one base model cannot hold both; serve these from separate "
                "processes.")
        for key, what in (("config_sha256", "model config"), ("tokenizer_sha256", "tokenizer"),
                          ("gguf_sha256", "GGUF file"), ("vocabulary", "extended tokenizer")):
            if key == "vocabulary":
                mine = run.manifest.vocabulary.get("tokenizer_sha256")
                theirs = first.manifest.vocabulary.get("tokenizer_sha256")
            else:
                mine, theirs = getattr(run.manifest.base_model, key), getattr(first.manifest.base_model, key)
            if mine != theirs:
                raise ManifestError(
                    f"adapter {run.name!r} ({run.folder}) was trained on a different base model than "
                    f"{first.name!r} ({first.folder}): {what} sha256 {str(mine)[:12]} != {str(theirs)[:12]}. "
                    "One server holds one base model; serve these from separate processes."
                )


def _verify(runs: list[_Run], base_path: str, tokenizer, templates: dict[str, str], options: LoadOptions,
            warn) -> None:
    first = runs[0]
    problems = []
    if not (first.method.run_is_model and not Path(base_path).exists()):
        problems += verify_base_model(first.manifest, base_path)
    for run in runs:
        if run.name in templates:  # the user chose this run's template
            continue
        found = verify_template(run.manifest, tokenizer)
        problems += [f"{run.name}: {p}" for p in found] if len(runs) > 1 else found
    if problems:
        message = "\n".join(problems)
        if not options.force:
            raise ManifestError(f"{message}\n(use --force to load anyway)")
        warn(f"warning: {message}")


def _to_device(model) -> None:
    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None \
            and not getattr(model, "is_quantized", False) and next(model.parameters()).device.type == "cpu":
        model.to("cuda")


def _load_runs(runs: list[_Run], base_path: str, alone: bool):
    """The model with the runs' trained weights: one run by its method, or every run as a
    named peft adapter (``a0``, ``a1``, ...) on one base model."""
    first = runs[0]
    remote = first.manifest.base_model.trust_remote_code
    scaling = first.manifest.rope_scaling or None  # the RoPE scaling the run trained with
    if alone and first.method.run_is_model:
        return load_model(ModelArgs(model_name_or_path=str(first.folder), trust_remote_code=remote,
                                    rope_scaling=scaling))
    extra = first.method.base_load_kwargs(first.manifest.method_settings)
    model = load_model(ModelArgs(model_name_or_path=base_path, trust_remote_code=remote, rope_scaling=scaling),
                       **extra)
    resize_like_run(model, first.manifest.vocabulary, first.folder)
    if alone:
        with _trained_weights(first):
            return first.method.load(model, first.folder)
    from peft import PeftModel

    with _trained_weights(first):
        model = PeftModel.from_pretrained(model, str(first.folder), adapter_name="a0", is_trainable=False)
    for i, run in enumerate(runs[1:], start=1):
        with _trained_weights(run):
            model.load_adapter(str(run.folder), adapter_name=f"a{i}", is_trainable=False)
    return model


@contextmanager
def _trained_weights(run: _Run):
    """Loading a run's trained weights: what fails there is the run folder's fault."""
    try:
        yield
    except ChattuneError:
        raise
    except Exception as exc:  # peft and safetensors raise ValueError, OSError, SafetensorError, ...
        message = " ".join(str(exc).split())
        raise ManifestError(f"{run.folder}: could not load its trained weights ({run.method.name}): "
                            f"{message}") from exc


def _finish(model) -> object:
    model.eval()
    _to_device(model)
    return model


def _bare_generation(path: str) -> GenerateArgs:
    """An exported run's generation defaults (its ``generation_config.json``, beside
    ``chattune_export.json``); chattune's defaults for any other model."""
    folder = Path(path)
    if not (folder / "chattune_export.json").is_file():
        return GenerateArgs()
    from chattune.config_io import generation_defaults

    return generation_defaults(folder)


def _load_bare(target: str, options: LoadOptions) -> LoadedRun:
    path = options.base_model or target
    name = options.name or BASE_NAME
    if any(c.isspace() for c in name):
        raise ConfigError(f"model name {name!r}: names must be without spaces")
    tokenizer = load_tokenizer(path, options.trust_remote_code)
    model = _finish(load_model(ModelArgs(model_name_or_path=path, trust_remote_code=options.trust_remote_code)))
    template = resolve_template_name(options.template or "auto", tokenizer)
    profile = make_served_model(name, tokenizer, template, _bare_generation(path))
    return LoadedRun(model, tokenizer, {name: profile}, name, context_length(model.config), uses_adapters=False,
                     vision=load_vision(path, options.trust_remote_code))


def in_memory_run(model, tokenizer, template: str, name: str = BASE_NAME, vision=None) -> LoadedRun:
    """A model already in memory (being trained, say) answering as ``name`` with ``template``, its
    stop tokens and the default generation settings, as a loaded run does (``vision``: its
    processor, for a vision-language model)."""
    return LoadedRun(model, tokenizer, {name: make_served_model(name, tokenizer, template, GenerateArgs())}, name,
                     context_length(model.config), uses_adapters=False, vision=vision)


def load_run(target: str, options: LoadOptions | None = None, *, warn=print) -> LoadedRun:
    """Load ``target`` (a run folder, or a base model's path) and ``options.adapters``.

    A lone run that cannot share a batch answers under its own name only; LoRA runs are
    peft adapters on one base model, answering under their names, and the bare base
    model answers as ``base``. A reward-model run (stage rm) is a ManifestError: it generates
    nothing (:func:`chattune.inference.reward.load_reward_model` loads it).
    """
    options = options or LoadOptions()
    folder = Path(target)
    runs: list[_Run] = []
    chosen: dict[str, str] = {}  # profile name -> template the user asked for
    if is_run_folder(folder):
        runs.append(_Run(options.name or default_name(folder), folder, read_manifest(folder)))
        if options.template:
            chosen[runs[0].name] = options.template
    elif options.template:
        chosen[BASE_NAME] = options.template
    elif not folder.exists() and options.base_model is None and (
            folder.is_absolute() or target.startswith(".") or "/" not in target):
        raise ManifestError(f"{target}: no such run folder or model")
    runs += [_Run(name, Path(path), read_manifest(path)) for name, path in options.adapters]
    if not runs:
        return _load_bare(target, options)
    for run in runs:
        if run.manifest.stage.get("name") == "rm":
            raise ManifestError(f"{run.folder}: a reward model (stage rm) scores conversations and generates no "
                                "text; load it with chattune.inference.reward.load_reward_model, score pairs with "
                                "chattune eval RUN --data PAIRS, or serve it (POST /v1/rewards)")
    _check_names(runs)
    first = runs[0]
    alone = len(runs) == 1 and not options.adapters and _served_alone(first)
    if not alone:
        _check_batchable(runs)
        _check_same_base(runs)
    base_path = options.base_model or first.manifest.base_model.path
    tokenizer_path = str(first.folder) if (first.folder / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(tokenizer_path, first.manifest.base_model.trust_remote_code)
    _verify(runs, base_path, tokenizer, chosen, options, warn)
    model = _finish(_load_runs(runs, base_path, alone))
    profiles = {}
    for i, run in enumerate(runs):
        template = chosen.get(run.name) or recorded_template(run.manifest, tokenizer)
        adapter = BASE_ADAPTER if alone else f"a{i}"
        profiles[run.name] = make_served_model(run.name, tokenizer, template, run.manifest.generation, adapter,
                                          run.folder, run.manifest)
    if not alone:
        template = resolve_template_name(chosen.get(BASE_NAME, "auto"), tokenizer)
        profiles[BASE_NAME] = make_served_model(BASE_NAME, tokenizer, template, GenerateArgs())
    model_path = str(first.folder) if alone and first.method.run_is_model else base_path
    vision = load_vision(model_path, first.manifest.base_model.trust_remote_code)
    return LoadedRun(model, tokenizer, profiles, first.name, context_length(model.config), uses_adapters=not alone,
                     vision=vision)
