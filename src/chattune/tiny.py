"""Tiny random models of real architectures, with a working tokenizer, saved in
Hugging Face format so that every test and the demo load them through the same
``from_pretrained`` path a user's real model takes. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from chattune.errors import ConfigError, ModelLoadError

ARCHS = ("glm4", "glm", "llama", "qwen2")

GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]

GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token.
Give three tips for staying healthy. Eat a balanced diet, exercise regularly, and sleep well.
What are the three primary colors? The three primary colors are red, blue, and yellow.
Instruction: Input: Answer: ### Instruction: ### Input: ### Response: END
Human: Assistant: System: USER: ASSISTANT: [Round 0] [Round 1] 问： 答：
The capital of the kingdom is a city by the river. Who are you? I am an assistant.
你好，我是一个人工智能助手。请问有什么可以帮您？今天天气很好，我们去公园散步吧。
中国的首都是北京。三原色是红色、蓝色和黄色。保持健康的三个建议：均衡饮食，经常锻炼，充足睡眠。
""" + " ".join(str(i) for i in range(200))


def train_tokenizer(out_dir: str | Path, arch: str, extra_text: list[str] | None = None,
                    vocab_size: int = 2048, chat_template: bool = True):
    """Train a byte-level BPE tokenizer (a second on 2 cores) and save it as a
    ``PreTrainedTokenizerFast`` with special tokens and (unless ``chat_template`` is False)
    a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    glm_like = arch in ("glm4", "glm")
    specials = GLM_SPECIALS + ([] if glm_like else CHATML_SPECIALS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] + list(extra_text or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>" if glm_like else "<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in specials if t != "<|endoftext|>"],
        chat_template=(GLM_CHAT_TEMPLATE if glm_like else CHATML_CHAT_TEMPLATE) if chat_template else None,
    )
    fast.save_pretrained(out_dir)
    return fast


def check_sizes(hidden_size: int, num_layers: int, num_heads: int = 4) -> None:
    """Raise ConfigError unless ``hidden_size`` splits into ``num_heads`` heads of an even
    size (rotary embeddings rotate pairs) and there is at least one layer."""
    if hidden_size < 2 * num_heads or hidden_size % (2 * num_heads):
        raise ConfigError(f"--hidden-size: expected a positive multiple of {2 * num_heads} "
                          f"({num_heads} heads of an even size), got {hidden_size}")
    if num_layers < 1:
        raise ConfigError(f"--num-layers: expected at least 1, got {num_layers}")


def _output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` created as a folder, or ConfigError saying why it cannot be."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; expected a folder to write the tiny model to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output folder: {exc.strerror or exc}") from exc
    return out


def _reused_tokenizer(path: str):
    """The tokenizer of another model for ``--tokenizer-from``; ModelLoadError when it
    cannot be loaded or has no EOS token."""
    from transformers import AutoTokenizer

    from chattune.model import load_error

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, ...
        raise load_error(path, exc, "tokenizer") from exc
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"--tokenizer-from {path}: the tokenizer has no EOS token; expected one "
                             "(set eos_token in its tokenizer_config.json)")
    return tokenizer


def tiny_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, *, hidden_size: int = 256,
                num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2):
    """A small config of a real transformers architecture; ConfigError for an unknown ``arch``
    or sizes the architecture cannot take."""
    from transformers import Glm4Config, GlmConfig, LlamaConfig, Qwen2Config

    classes = {"glm4": Glm4Config, "glm": GlmConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ConfigError(f"--arch: expected one of {list(ARCHS)}, got {arch!r}")
    check_sizes(hidden_size, num_layers, num_heads)
    return classes[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=2048, pad_token_id=pad_id, eos_token_id=eos_id,
        bos_token_id=None, tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path, arch: str = "glm4", *, tokenizer_from: str | None = None,
                     extra_text: list[str] | None = None, hidden_size: int = 256, num_layers: int = 4,
                     seed: int = 0, chat_template: bool = True) -> Path:
    """Write a random model of ``arch`` plus tokenizer to ``out_dir``; return the path.
    ``chat_template=False``: the trained tokenizer has none (``template: auto`` then means
    ``default``).

    Raises ConfigError for an unknown ``arch``, impossible sizes or an ``out_dir`` that
    cannot be a folder, and ModelLoadError for a ``tokenizer_from`` that cannot be used.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ConfigError(f"--arch: expected one of {list(ARCHS)}, got {arch!r}")
    check_sizes(hidden_size, num_layers)
    out = _output_folder(out_dir)
    if tokenizer_from:
        tokenizer = _reused_tokenizer(tokenizer_from)
        tokenizer.save_pretrained(out)
    else:
        tokenizer = train_tokenizer(out, arch, extra_text, chat_template=chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = tiny_config(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                         hidden_size=hidden_size, num_layers=num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    return out
