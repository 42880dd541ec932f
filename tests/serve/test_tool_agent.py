"""The tool-calling example end to end, kept short: a tiny model trained (LoRA) on a few of
examples/tools' conversations until it reproduces them, served in-process, and the example's
agent loop (the official ``openai`` client, ``tools=``, the Python functions run on the
parsed arguments, the results sent back as ``tool`` messages) gets the right final answers."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.serve.helpers import example_modules, train_example
from tests.serve.server_thread import ServerThread

STEPS = 150  # 120 are enough on this machine, 70 are not

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tools"


@pytest.fixture(scope="module")
def example():
    """examples/tools' two scripts as modules: (make_tool_data, agent)."""
    with example_modules(EXAMPLE, "make_tool_data", "agent") as modules:
        yield modules


def pick(examples: list[dict]) -> list[dict]:
    """A few of the taught examples: a weather question in English, a currency question in
    Chinese, and chit-chat answered without a call."""
    def first(kind, lang):
        return next(e for e in examples if e["kind"] == kind and e["lang"] == lang)

    return [first("weather", "en"), first("currency", "zh"), first("chitchat", "en")]


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    """(the run folder, the taught prompts): make_tool_data's files for the subset, its tiny
    model (64 wide, 2 layers), and a run of examples/tools/tools_lora.yaml on them (fewer
    steps, all rows in one batch)."""

    make, agent = example
    root = tmp_path_factory.mktemp("tool-agent")
    taught = pick(make.examples())
    paths = make.write_data(root, taught)
    model = make.build_model(root / "tiny", taught, hidden_size=64, num_layers=2)
    run = train_example(EXAMPLE / "tools_lora.yaml", model, paths["train"], root, len(taught), STEPS)
    return run, agent.read_prompts(str(paths["prompts"]))


@pytest.fixture(scope="module")
def client(trained):
    """The run (as ``run``) and its base (``base``) behind the real server on a loopback port."""
    from chattune.inference.runs import LoadOptions, load_run
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine

    run_dir, _ = trained
    served = load_run(str(run_dir), LoadOptions(name="run"))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, use_adapters=served.uses_adapters)
    engine.start()
    server = ServerThread(create_app(served, engine)).start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    server.stop()
    engine.stop()


def test_the_agent_loop_gets_the_right_final_answers(example, trained, client):
    _, agent = example
    _, prompts = trained
    outcomes = agent.evaluate(client, "run", prompts, max_tokens=64)
    for outcome in outcomes:
        assert outcome.error is None and outcome.right_calls, (outcome.calls, outcome.answer)
        assert outcome.right, outcome.answer
    assert [len(o.calls) for o in outcomes] == [1, 1, 0]  # two calls made and run, chit-chat answered directly
    assert outcomes[0].answer == "It is 21°C and sunny in Paris."
    table = agent.table({"run": outcomes})
    assert table.splitlines()[1].split() == ["run", "3", "2", "3", "3", "100.0%"]
    languages = sorted({p["lang"] for p in prompts})
    counts = {lang: sum(p["lang"] == lang for p in prompts) for lang in languages}
    assert table.splitlines()[2] == "run, by language: " + ", ".join(
        f"{lang} {n}/{n} right ({n} right calls)" for lang, n in counts.items())


def test_the_base_model_does_not(example, trained, client):
    _, agent = example
    _, prompts = trained
    outcomes = agent.evaluate(client, "base", prompts, max_tokens=24)
    assert sum(o.right for o in outcomes) == 0


def test_the_real_model_config_renders_tools_with_chattunes_template(tmp_path):
    from chattune.config_io import load_config
    from chattune.templates.registry import get_template

    config = load_config(EXAMPLE / "tools_smollm2.yaml", [f"model_name_or_path={tmp_path}"])
    assert [Path(s.path).name for s in config.data.train_files] == ["tools_train.jsonl"]
    assert get_template(config.data.template).tools and config.method.method == "lora"
