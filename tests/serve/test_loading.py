"""What one server may hold: adapters on one base model under unique names; runs that cannot
share a batch (freeze, P-Tuning v2) served alone."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from chattune.errors import ConfigError, ManifestError
from chattune.inference.generate import generate
from chattune.inference.runs import LoadOptions, load_run
from chattune.serve import parse_adapter
from chattune.serve.app import create_app
from chattune.serve.engine import Engine
from tests.serve.helpers import chat, train_run
from tests.serve.server_thread import ServerThread


def test_adapters_must_share_the_base_model_and_names_must_be_clear(runs, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(runs["b"], other)
    manifest = json.loads((other / "chattune.json").read_text())
    manifest["base_model"]["config_sha256"] = "0" * 64
    (other / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="different base model"):
        load_run(str(runs["a"]), LoadOptions(adapters=[("other", str(other))]))
    manifest["method"]["name"] = "ptuning"
    (other / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="ptuning run.*serve it alone"):
        load_run(str(runs["a"]), LoadOptions(adapters=[("other", str(other))]))
    with pytest.raises(ConfigError, match="unique"):
        load_run(str(runs["a"]), LoadOptions(adapters=[("base", str(runs["b"]))]))
    with pytest.raises(ConfigError, match="unique"):
        load_run(str(runs["a"]), LoadOptions(name="b", adapters=[("b", str(runs["b"]))]))


def test_parse_adapter():
    assert parse_adapter(" b = runs/b ") == ("b", "runs/b")
    assert parse_adapter("b=runs/x=y") == ("b", "runs/x=y")
    for text in ("just-a-path", "=runs/b", "b="):
        with pytest.raises(ConfigError, match="NAME=RUN_DIR"):
            parse_adapter(text)


def test_a_freeze_run_is_served_alone(runs, tiny_models):
    from chattune.demo import demo_records

    frozen = train_run(tiny_models("glm4"), demo_records()[0][:8], runs["root"], "frozen", method="freeze",
                       max_steps=2, save_steps=2)
    served = load_run(str(frozen))
    assert list(served.profiles) == ["frozen"] and not served.uses_adapters
    with pytest.raises(ManifestError, match="serve it alone"):
        load_run(str(runs["a"]), LoadOptions(adapters=[("frozen", str(frozen))]))
    with pytest.raises(ManifestError, match="serve it alone"):  # BASE --adapter frozen=RUN: not silently alone
        load_run(str(tiny_models("glm4")), LoadOptions(adapters=[("frozen", str(frozen))]))


def test_a_ptuning_run_is_served_alone_with_its_prefix_in_the_cache(runs, tiny_models):
    """P-Tuning v2 through the engine (prefix keys/values seed each row's cache) gives the
    greedy answers of :func:`chattune.inference.generate.generate`, alone and when rows share a batch."""
    from chattune.demo import demo_records

    prefixed = train_run(tiny_models("glm4"), demo_records()[0][:8], runs["root"], "prefixed", method="ptuning",
                         pre_seq_len=4, learning_rate=1e-2, max_steps=3, save_steps=3)
    served = load_run(str(prefixed))
    assert list(served.profiles) == ["prefixed"] and not served.uses_adapters
    with pytest.raises(ManifestError, match="serve it alone"):
        load_run(str(runs["a"]), LoadOptions(adapters=[("prefixed", str(prefixed))]))
    questions = ["Who are you?", "What is the capital of Veloria?", "你好"]
    expected = [generate(served, [[{"role": "user", "content": q}]], max_new_tokens=8)[0] for q in questions]
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=4, max_waiting=4)
    assert engine.decoder.prefix == 4
    engine.start()
    app = ServerThread(create_app(served, engine)).start()
    try:
        client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=60)
        alone = [chat(client, model="prefixed", messages=[{"role": "user", "content": q}], max_tokens=8)
                 .choices[0].message.content for q in questions]
        assert alone == expected
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda q: chat(client, model="prefixed", max_tokens=8, messages=[
                {"role": "user", "content": q}]).choices[0].message.content, questions))
        assert together == expected
    finally:
        app.stop()
        engine.stop()
