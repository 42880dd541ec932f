"""Shared fixtures: offline mode, the real data in ../shared/data, tiny models built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers share the cores: each (and each process a test starts) gets its share of
# threads, since more threads than cores makes every one of them wait
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (see its SOURCES.md); tests that need it skip where it is absent."""
    if not (SHARED_DATA / "alpaca_en_demo.json").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (a user's clone without ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A function arch -> path of a tiny random model of that architecture, built once per session."""
    from chattune.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(root / arch, arch, hidden_size=64, num_layers=2)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    """A function arch (``llava`` or ``idefics3``) -> path of a tiny random vision-language model
    with its processor, built once per session."""
    from chattune.tiny_vlm import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny-vlms")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_vlm(root / arch, arch, hidden_size=64, num_layers=2, vision_hidden_size=32)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    """A JSON file of 12 LLaMA-Factory style rows (``messages`` with ``<image>``, ``images``
    relative to the file): a coloured square each, asked its colour; the images beside it in ``img/``."""
    import json

    from PIL import Image

    folder = tmp_path_factory.mktemp("image-data")
    (folder / "img").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
    rows = []
    for i in range(12):
        name = list(colours)[i % 3]
        Image.new("RGB", (40 + i, 36), colours[name]).save(folder / "img" / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is it?"},
                                  {"role": "assistant", "content": name}], "images": [f"img/{i}.png"]})
    path = folder / "colours.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ggufs(tiny_models, tmp_path_factory):
    """arch -> (tiny model folder, its f16 GGUF written by llama.cpp's converter), converted
    once per session (each conversion is a converter process: about 5 s)."""
    from chattune.export.gguf import write_gguf

    out = tmp_path_factory.mktemp("gguf")
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            model = tiny_models(arch)
            made[arch] = (model, write_gguf(model, out / f"{arch}.f16.gguf", "f16"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """The demo's taught records (identity and facts, English and Chinese) as an Alpaca JSON file."""
    import json

    from chattune.demo import demo_records

    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(demo_records()[0], ensure_ascii=False))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own encoded-data cache."""
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "chattune-cache"))


@pytest.fixture(scope="session")
def char_tokenizer():
    """A fast tokenizer where every ASCII character is one token (no merges), EOS ``</s>``,
    and no chat template: label counts in tests equal character counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"</s>": 0, "<s>": 1, "<|user|>": 2, "<|assistant|>": 3}
    for char in sorted(alphabet):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>",
                                   pad_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"])


def separable_pairs(count: int, seed: int) -> list[dict]:
    """Pairs a reward model can learn and an untrained head cannot guess: every chosen answer
    ends with "yes", every rejected one with "no", each after three random words."""
    import random

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "sand"]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.sample(words, 2)
        chosen, rejected = " ".join(rng.choices(words, k=3)), " ".join(rng.choices(words, k=3))
        rows.append({"instruction": f"Say something about {a} and {b}.", "input": "",
                     "chosen": f"{chosen} yes", "rejected": f"{rejected} no"})
    return rows


@pytest.fixture(scope="session")
def reward_pairs(tmp_path_factory) -> dict[str, Path]:
    """``train`` (48 separable pairs, :func:`separable_pairs`) and ``held`` (24 others) as JSON files."""
    import json

    folder = tmp_path_factory.mktemp("reward-pairs")
    paths = {"train": folder / "train.json", "held": folder / "held.json"}
    paths["train"].write_text(json.dumps(separable_pairs(48, 1)))
    paths["held"].write_text(json.dumps(separable_pairs(24, 2)))
    return paths


def reward_config(model: Path, data: Path, out: Path, **overrides):
    """A quick stage rm config on a tiny model (LoRA rank 8, batches of 8 pairs, 8 steps)."""
    from chattune.config_io import load_config

    values = {"model_name_or_path": str(model), "train_files": str(data), "eval_fraction": 0.25, "stage": "rm",
              "max_seq_length": 64, "lora_rank": 8, "lora_dropout": 0.0, "output_dir": str(out),
              "per_device_train_batch_size": 8, "max_steps": 8, "save_steps": 4, "logging_steps": 1,
              "eval_steps": 4, "learning_rate": 5e-3, "seed": 3, "report_to": "none"}
    values.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="session")
def rm_run(tiny_models, reward_pairs, tmp_path_factory):
    """A reward model (stage rm, LoRA) trained 8 steps on the separable pairs: its TrainResult."""
    from chattune.training.recipe import train

    out = tmp_path_factory.mktemp("rm") / "rm"
    return train(reward_config(tiny_models("llama"), reward_pairs["train"], out), log=lambda *_: None)
