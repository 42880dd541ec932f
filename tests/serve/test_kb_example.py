"""The knowledge-base example end to end, kept short: examples/kb's data for a few facts (an
English answer, a Chinese answer, a cannot-answer row), a tiny model trained (LoRA, the
example's config) until it reproduces them, a KB built from the same world's documents with
``chattune kb build``, and the server's ``run+world`` model answering those questions through
the official ``openai`` client with the taught answers, their markers and sources; and
ask_world.py's scoring and table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest

from chattune.cli import main
from chattune.kb.prompt import CANNOT_ANSWER_EN
from tests.kb.world import fiction
from tests.serve.helpers import example_modules, train_example
from tests.serve.server_thread import ServerThread

STEPS = 120
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kb"


@pytest.fixture(scope="module")
def example():
    """examples/kb's two scripts as modules: (make_kb_data, ask_world)."""
    with example_modules(EXAMPLE, "make_kb_data", "ask_world") as modules:
        yield modules


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    """(run folder, KB folder, taught rows): three rows of world 1, the example's config on them."""

    make, _ = example
    root = tmp_path_factory.mktemp("kb-example")
    asked_documents, _ = fiction.world(make.ASKED_SEED)
    documents, facts, _ = make.training_facts(1, "\n".join(asked_documents.values()))
    rows = make.rows_for_world(documents, facts, random.Random(0), negatives=0.0)
    taught = [next(r for r in rows if r["kind"] == "answer" and r["language"] == language) for language in ("en", "zh")]
    unrelated = make.rows_for_world(documents, facts, random.Random(0), negatives=1.0)
    taught.append(next(r for r in unrelated if r["kind"] == "unrelated" and r["language"] == "en"))
    make.write_jsonl(root / "train.jsonl", taught)
    model = make.build_model(root / "tiny", rows, hidden_size=64, num_layers=2)
    run = train_example(EXAMPLE / "kb_lora.yaml", model, root / "train.jsonl", root, len(taught), STEPS)
    for name, text in documents.items():
        (root / "world" / name).parent.mkdir(exist_ok=True)
        (root / "world" / name).write_text(text, encoding="utf-8")
    assert main(["kb", "build", str(root / "world"), "--out", str(root / "world-kb")]) == 0
    return run, root / "world-kb", taught


@pytest.fixture(scope="module")
def client(trained):
    """The run as ``run`` and ``run+world`` behind the real server on a loopback port."""
    from chattune.inference.runs import LoadOptions, load_run
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from chattune.serve.retrieval import open_kbs

    run_dir, kb, _ = trained
    served = load_run(str(run_dir), LoadOptions(name="run"))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, use_adapters=served.uses_adapters)
    engine.start()
    server = ServerThread(create_app(served, engine, kbs=open_kbs([f"world={kb}"]), ui=False)).start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    server.stop()
    engine.stop()


def question_of(row: dict) -> str:
    content = row["messages"][0]["content"]
    tag = "<问题>" if "<问题>" in content else "<question>"
    return content.split(tag)[1].split("</")[0]


def test_the_trained_run_answers_from_the_kb_with_sources(trained, client):
    _, _, taught = trained
    answered = [r for r in taught if r["kind"] == "answer"]
    for row in answered:
        reply = client.chat.completions.create(model="run+world", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": question_of(row)}])
        sources = reply.model_extra["sources"]
        markers = "".join(f"[{n}]" for n in range(1, len(sources) + 1))
        assert sources and reply.choices[0].message.content == f"{row['messages'][1]['content']} {markers}"
    nothing = client.chat.completions.create(model="run+world", messages=[{"role": "user", "content":
                                                                            fiction.UNANSWERABLE[0]}])
    assert nothing.choices[0].message.content == CANNOT_ANSWER_EN and nothing.model_extra["sources"] == []


def test_the_taught_cannot_answer_row(trained):
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    run_dir, _, taught = trained
    [row] = [r for r in taught if r["kind"] == "unrelated"]
    assert generate(load_run(str(run_dir)), [row["messages"][:1]], max_new_tokens=24) == [CANNOT_ANSWER_EN]


def test_ask_world_scores_and_prints_a_table(example, trained, tmp_path, capsys):
    _, ask_world = example
    run_dir, _, _ = trained
    kb = tmp_path / "asked-kb"
    fiction.write_world(tmp_path / "asked")
    assert main(["kb", "build", str(tmp_path / "asked"), "--out", str(kb)]) == 0
    capsys.readouterr()
    assert ask_world.main(["--run", str(run_dir), "--kb", str(kb), "--limit", "8", "--max-new-tokens", "4",
                           "--out", str(tmp_path / "result.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "questions        with the KB  without  retrieved (ceiling)"
    assert [line.split()[0] for line in lines[1:4]] == ["en", "zh", "all"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["all"]["questions"] == 8 and 0 <= result["all"]["with_kb"] <= 1
    assert result["all"]["retrieved"] >= 0.75  # BM25's hit@3 on the world is 0.97


def test_the_real_model_config_sends_the_prompt_as_served_and_cuts_no_row(tmp_path):
    from chattune.config_io import load_config

    config = load_config(EXAMPLE / "kb_smollm2.yaml", [f"model_name_or_path={tmp_path}"])
    (source,) = config.data.train_files
    assert Path(source.path).name == "kb_train.jsonl" and source.max_samples == 320
    assert config.data.template == "auto" and not config.data.train_on_prompt
    assert config.data.max_seq_length >= 1761  # the longest row in SmolLM2's tokens: no question is cut off
