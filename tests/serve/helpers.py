"""What the serve tests share besides fixtures: training a run, requests, waiting."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from chattune.templates.registry import NAMED_TEMPLATES, template_provenance

TEMPLATES = [*NAMED_TEMPLATES, "tokenizer"]
KEY = "sekret-key"
ASK = [{"role": "user", "content": "Who are you?"}]


def train_run(base: Path, records: list[dict], root: Path, name: str, **overrides) -> Path:
    """A run folder ``root/name`` trained on ``records`` (a tiny, quick config)."""
    from chattune.training.recipe import train
    from tests.training.test_recipe import make_config

    data = root / f"{name}.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    config = make_config(base, data, root / name, eval_fraction=0.0, report_to=["none"],
                         cache_dir=str(root / "cache"), **overrides)
    return train(config, log=lambda *_: None).output_dir


def with_template(run: Path, dest: Path, template: str, tokenizer) -> Path:
    """A copy of a run folder whose manifest says it was trained with ``template``."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    manifest = json.loads((dest / "chattune.json").read_text())
    manifest["template"] = template_provenance(template, tokenizer)
    (dest / "chattune.json").write_text(json.dumps(manifest))
    return dest


def chat(client, model="a", messages=ASK, **kw):
    """A chat completion, greedy unless ``kw`` says otherwise."""
    return client.chat.completions.create(model=model, messages=messages, **{"temperature": 0, **kw})


def wait_for(condition, seconds=10.0):
    """Poll ``condition`` until it is true; fail after ``seconds``."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def health(server) -> dict:
    """The server's ``/health`` body."""
    return httpx.get(f"{server.url}/health").json()


def long_stream(server, model="base"):
    """A streamed request that would run for 1500 tokens, its first event read; ``close()`` ends it."""
    body = {"model": model, "messages": ASK, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    http = httpx.Client(timeout=60)
    stream = http.send(http.build_request("POST", f"{server.url}/v1/chat/completions", json=body), stream=True)
    stream.keep = (http, stream.iter_lines())  # dropping either would close the stream
    assert next(stream.keep[1]).startswith("data: ")
    return stream


@contextmanager
def example_modules(folder: Path, *names: str):
    """An example folder's scripts imported as modules (``folder`` on ``sys.path`` meanwhile)."""
    sys.path.insert(0, str(folder))
    try:
        yield tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(folder))


def train_example(config_yaml: Path, model: Path, train_file: Path, root: Path, batch: int, steps: int) -> Path:
    """An example's config trained on a few rows (all of them in one batch) for ``steps``; the run folder."""
    from chattune.config_io import load_config
    from chattune.training.recipe import train

    config = load_config(config_yaml, [
        f"model_name_or_path={model}", f"train_files=[{train_file}]", f"output_dir={root / 'run'}",
        f"cache_dir={root / 'cache'}", f"per_device_train_batch_size={batch}", f"max_steps={steps}",
        f"save_steps={steps}", "warmup_steps=5"])
    return train(config, log=lambda *_: None).output_dir
