"""A reward-model run folder (``stage: rm``) loaded back as a scorer of conversations.

A reward model is the base model with a scalar head (transformers' ``*ForSequenceClassification``
with one label, its ``score`` layer) reading the last hidden state of a conversation's last
token. :func:`load_reward_model` loads a run folder as it was trained (LoRA adapter and head,
freeze's trained tensors and head, or a full model), and :meth:`RewardScorer.score` renders each
conversation (ending with the assistant's answer) with the run's template exactly as training
rendered prompt + answer (:func:`chattune.data.pair_encode.encode_preference`: oldest turns
dropped, then the answer cut, to ``max_seq_length``), and scores it, batched::

    scorer = load_reward_model("runs/rm")
    scorer.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])

:func:`sequence_rewards` is the reward of a batch under a model, as training computes it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.config import ModelArgs
from chattune.data.encode import PieceEncoder
from chattune.data.pair_encode import encode_preference
from chattune.data.pairs import to_answered
from chattune.errors import ChattuneError, ManifestError
from chattune.manifest import (
    Manifest,
    is_run_folder,
    read_manifest,
    recorded_template,
    verify_base_model,
    verify_template,
)
from chattune.methods import get_method
from chattune.model import load_reward_base, load_tokenizer

REWARD_STAGE = "rm"
DEFAULT_BATCH_SIZE = 8


def reward_backbone(model):
    """(the transformer that gives the hidden states, the reward head) of a reward model, through
    peft's and a data-parallel wrapper (LoRA layers and the head's trained copy stay active)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return getattr(inner, inner.base_model_prefix), inner.score


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward (float32, one per row) of right-padded rows: the head's scalar at each row's last
    real token (the last 1 of ``attention_mask``; the pad token's id plays no part, so an answer
    ending with an EOS that is also the pad token is scored at that EOS)."""
    backbone, head = reward_backbone(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1).to(hidden.device) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked).squeeze(-1).float()


def padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``sequences`` right-padded to the longest."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    for n, ids in enumerate(sequences):
        input_ids[n, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[n, :len(ids)] = 1
    return input_ids, attention


def is_reward_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder of a reward model (its manifest's stage is ``rm``)."""
    if not is_run_folder(path):
        return False
    try:
        return read_manifest(path).stage.get("name") == REWARD_STAGE
    except ChattuneError:
        return False


@dataclass
class RewardScorer:
    """A loaded reward model: :meth:`score` gives one float per conversation."""

    model: object
    tokenizer: object
    template: str
    max_seq_length: int
    name: str = "rm"
    run_dir: Path | None = None
    manifest: Manifest | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    encoder: PieceEncoder = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.encoder = PieceEncoder(self.tokenizer, max_entries=4096, max_chars=1 << 20)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        """The id padding takes (it is never scored)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def encode(self, conversation: list[dict], where: str = "conversation") -> list[int]:
        """The token ids of ``conversation`` (messages ending with the assistant's answer) as
        training encoded prompt + answer; ValueError (RecordError or DataError) naming ``where`` for a conversation
        that cannot be scored (no answer last, a bad message, a prompt that fills max_seq_length)."""
        record = to_answered(conversation, where)
        with self.lock:
            encoded = encode_preference(record, self.template, self.encoder, self.max_seq_length)
        if encoded.dropped:
            from chattune.errors import DataError

            raise DataError(f"{where}: cannot be scored: {encoded.dropped}")
        return encoded.prompt + encoded.answers[0][0]

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int | None = None) -> list[float]:
        """The rewards of already encoded sequences, ``batch_size`` (default the scorer's) at a time."""
        size = batch_size or self.batch_size
        out: list[float] = []
        for start in range(0, len(sequences), size):
            input_ids, attention = padded(sequences[start:start + size], self.pad_token_id)
            with self.lock:
                rewards = sequence_rewards(self.model, input_ids.to(self.device), attention.to(self.device))
            out += rewards.cpu().tolist()
        return out

    def score(self, conversations: list[list[dict]], batch_size: int | None = None) -> list[float]:
        """One reward per conversation (each a list of ``{role, content}`` messages ending with the
        assistant's answer), in order. Raises ValueError (RecordError or DataError) naming ``conversations[i]`` for
        one that cannot be scored, before any is."""
        if not isinstance(conversations, list):
            raise TypeError(f"conversations: expected a list of conversations, got {type(conversations).__name__}")
        sequences = [self.encode(conversation, f"conversations[{i}]") for i, conversation in enumerate(conversations)]
        return self.score_ids(sequences, batch_size) if sequences else []


def _loaded(run_dir: Path, method_name: str):
    """A context turning an error loading the trained weights into a ManifestError naming the folder."""
    from contextlib import contextmanager

    @contextmanager
    def guard():
        try:
            yield
        except ChattuneError:
            raise
        except Exception as exc:  # peft and safetensors raise ValueError, OSError, ...
            message = " ".join(str(exc).split())
            raise ManifestError(f"{run_dir}: could not load its trained reward model ({method_name}): "
                                f"{message}") from exc

    return guard()


def load_reward_model(path: str | Path, *, base_model: str | None = None, force: bool = False,
                      batch_size: int = DEFAULT_BATCH_SIZE, trained: bool = True, name: str | None = None,
                      warn=print) -> RewardScorer:
    """Load the reward-model run folder ``path`` (trained with ``stage: rm``) as a
    :class:`RewardScorer`: its tokenizer, template and ``max_seq_length``, its base model (or
    ``base_model``) with the trained head and weights, on CUDA when there is one.

    ``trained=False`` gives the run's starting point instead: the base model with a new head drawn
    from the run's seed (what ``--compare base`` scores: an untrained head ranks pairs at chance).
    The base model and template are checked against the manifest (ManifestError unless ``force``,
    then ``warn``). Raises ManifestError for a folder that is not a reward-model run."""
    folder = Path(path)
    if not is_run_folder(folder):
        raise ManifestError(f"{folder}: not a run folder (no chattune.json); expected a run trained with stage: rm")
    manifest = read_manifest(folder)
    stage = manifest.stage.get("name") or "sft"
    if stage != REWARD_STAGE:
        raise ManifestError(f"{folder}: not a reward model: it was trained with stage {stage}; a reward model is "
                            "trained with stage: rm")
    method = get_method(manifest.method)
    remote = manifest.base_model.trust_remote_code
    base_path = base_model or manifest.base_model.path
    tokenizer_path = str(folder) if (folder / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(tokenizer_path, remote)
    problems = [] if method.run_is_model and not Path(base_path).exists() else verify_base_model(manifest, base_path)
    problems += verify_template(manifest, tokenizer)
    if problems:
        message = "\n".join(problems)
        if not force:
            raise ManifestError(f"{message}\n(use --force to load anyway)")
        warn(f"warning: {message}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = ModelArgs(model_name_or_path=base_path, trust_remote_code=remote,
                     rope_scaling=manifest.rope_scaling or None)
    if not trained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(manifest.stage.get("seed", 0)))
            model = load_reward_base(args, pad)
    elif method.run_is_model:
        with _loaded(folder, method.name):
            model = load_reward_base(args, pad, path=str(folder))
    else:
        model = load_reward_base(args, pad, **method.base_load_kwargs(manifest.method_settings))
        with _loaded(folder, method.name):
            model = method.load(model, folder)
    model.eval()
    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None \
            and not getattr(model, "is_quantized", False):
        model.to("cuda")
    template = recorded_template(manifest, tokenizer)
    return RewardScorer(model, tokenizer, template, manifest.max_seq_length, name or _default_name(folder), folder,
                        manifest, batch_size)


def _default_name(folder: Path) -> str:
    name = "-".join(folder.resolve().name.split())
    return name or "rm"
