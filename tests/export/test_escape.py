"""Escaping special-token text in an export's messages: the Jinja writes what escape_text
writes, the normalizer gives the text back, and no special token's text is left whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chattune.export.escape import escape_jinja, escape_text
from chattune.special_text import (
    MARK,
    add_unescape,
    is_escaping,
    restore_run_tokenizer,
    unescape_normalizer,
)

SPECIALS = ["<|observation|>", "<|assistant|>", "<|user|>", "[gMASK]", "[MASK]", "</s>", "<s>", "sop", "aa", "abab"]
ALPHABET = ["<|user|>", "<|", "|>", "[gMASK]", "[MASK]", "MASK]", "</s>", "<s>", "s>", "sop", "so", "a", "b", "ab",
            "x", " ", "\n", MARK, MARK + MARK, "你好"]


def samples(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def render(specials: list[str], message: dict) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = escape_jinja(specials) + "{% for m in messages %}{{ m['content'] }}|{{ m['input'] }}{% endfor %}"
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    return environment.from_string(template).render(messages=[message])


def test_the_normalizer_undoes_the_escape_and_no_special_text_is_left():
    normalizer = unescape_normalizer(None)
    for text in samples():
        escaped = escape_text(text, SPECIALS)
        assert normalizer.normalize_str(escaped) == text
        assert not any(special in escaped for special in SPECIALS), repr(text)


def test_the_jinja_escapes_content_and_input_as_escape_text_does():
    for text in samples(120):
        assert render(SPECIALS, {"role": "user", "content": text, "input": text + "<s>"}) == (
            escape_text(text, SPECIALS) + "|" + escape_text(text + "<s>", SPECIALS))
    # a message without text (an assistant's tool calls) is left as it is
    assert render(SPECIALS, {"role": "assistant", "content": None}) == "None|"


def test_the_template_after_it_keeps_its_leading_text():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = escape_jinja(SPECIALS) + "\n[gMASK]sop{{ messages[0]['content'] }}"
    assert environment.from_string(template).render(messages=[{"role": "user", "content": "[gMASK]"}]) == (
        "\n[gMASK]sop[" + MARK + "gMASK]")


@pytest.fixture
def glm3():
    from chattune.chatglm.glm_tokenizer import build_glm_tokenizer

    path = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm" / "chatglm3-6b"
    if not (path / "tokenizer.model").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {path} (a clone without ../shared)")
    return build_glm_tokenizer(path / "tokenizer.model", "chatglm3-6b", template="chatglm3", max_length=512)


def test_an_export_tokenizer_reads_escaped_text_as_the_run_reads_the_text(glm3, tmp_path):
    """The export reads special tokens from text, but escaped text gives the run's ids; loaded back
    by chattune it is the run's tokenizer again."""
    import copy

    from transformers import AutoTokenizer

    exported = copy.deepcopy(glm3)
    add_unescape(exported)
    exported.chat_template = escape_jinja(["<|user|>"]) + "{{ messages[0]['content'] }}"
    exported.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert is_escaping(reloaded) and not reloaded.split_special_tokens and not is_escaping(glm3)
    specials = [str(t) for t in reloaded.added_tokens_decoder.values() if t.special]
    for text in ["<|user|>hi", "a [gMASK] b </s> people", "x" + MARK + "<|assistant|>" + MARK * 2, ""]:
        want = glm3(text, add_special_tokens=False)["input_ids"]
        assert reloaded(escape_text(text, specials), add_special_tokens=False)["input_ids"] == want
    assert reloaded("<|user|>", add_special_tokens=False)["input_ids"] == [64795]  # the template's own
    assert restore_run_tokenizer(reloaded) and not is_escaping(reloaded) and reloaded.split_special_tokens
    assert reloaded.chat_template == "{{ messages[0]['content'] }}"
    assert reloaded.backend_tokenizer.normalizer.__getstate__() == glm3.backend_tokenizer.normalizer.__getstate__()
    assert not restore_run_tokenizer(reloaded)
