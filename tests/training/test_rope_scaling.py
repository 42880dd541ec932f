"""``rope_scaling``: a run trains past the context its base was trained for, and every loader of the
run (chat/serve's load_run, export) scales the base as training did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chattune.config import ModelArgs
from chattune.config_io import build_config, load_config
from chattune.errors import ConfigError
from chattune.manifest import read_manifest
from chattune.model import apply_rope_scaling, context_length, load_model
from chattune.training.memory_plan import estimate, format_plan
from chattune.training.recipe import train

TRAINED = 32
"""The positions the short base was trained for (its max_position_embeddings)."""
LENGTH = 64
"""max_seq_length of the runs: twice TRAINED, as rope_scaling=linear:2 allows."""
ANSWERS = ["the river runs past the old mill while the miller counts sacks",
           "children play by the water and the dog sleeps in the warm sun",
           "a boat drifts under the bridge as the bells ring over the town"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rope")


@pytest.fixture(scope="module")
def short_base(tiny_models, root) -> Path:
    """The tiny Llama with max_position_embeddings = TRAINED (RoPE has no weights: same model)."""
    folder = root / "short-llama"
    shutil.copytree(tiny_models("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": TRAINED}))
    return folder


@pytest.fixture(scope="module")
def long_rows(root) -> Path:
    path = root / "long.json"
    rows = [{"instruction": f"Tell me about picture {i}.", "output": ANSWERS[i % 3]} for i in range(8)]
    path.write_text(json.dumps(rows))
    return path


def overrides(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model_name_or_path={base}", f"train_files=[{data}]", f"max_seq_length={LENGTH}", "max_steps=2",
            "save_steps=10", "learning_rate=1e-2", "per_device_train_batch_size=4", "lora_dropout=0.0",
            f"output_dir={out}", "report_to=[none]", f"cache_dir={out.parent / 'cache'}", *extra]


@pytest.fixture(scope="module")
def scaled_run(short_base, long_rows, root):
    lines: list[str] = []
    result = train(load_config(None, overrides(short_base, long_rows, root / "run", "rope_scaling=linear:2.0")),
                   log=lines.append)
    return result, lines


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.arange(LENGTH - 4).remainder(vocab - 10).add(5)[None]


def test_a_scaled_run_trains_past_the_bases_context(scaled_run):
    result, lines = scaled_run
    longest = max(len(row) for row in result.prepared.train["input_ids"])
    assert TRAINED < longest <= LENGTH  # rows use positions the base was never trained for
    assert result.global_step == 2 and result.train_loss == result.train_loss
    rope = result.model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)
    assert f"context: extended by RoPE scaling (linear, factor 2) from {TRAINED} to {LENGTH} tokens; " \
           f"max_seq_length {LENGTH}" in lines
    assert read_manifest(result.output_dir).rope_scaling == {"type": "linear", "factor": 2.0}
    saved = (result.output_dir / "chattune.yaml").read_text()
    assert "rope_scaling:\n  type: linear\n  factor: 2.0" in saved


def test_the_scaling_changes_the_logits_past_the_first_position(short_base):
    plain = load_model(ModelArgs(model_name_or_path=str(short_base))).eval()
    scaled = load_model(ModelArgs(model_name_or_path=str(short_base), rope_scaling={"type": "linear", "factor": 2})
                        ).eval()
    ids = probe_ids(plain.config.vocab_size)
    a, b = logits(plain, ids), logits(scaled, ids)
    assert torch.allclose(a[0, 0], b[0, 0], atol=1e-6)  # position 0: no rotation either way
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-3


def test_the_run_loads_for_inference_scaled_as_it_trained(scaled_run):
    from chattune.inference.runs import load_run

    result, _ = scaled_run
    loaded = load_run(str(result.output_dir))
    assert loaded.context_length == LENGTH
    assert loaded.model.config.rope_parameters["rope_type"] == "linear"
    ids = probe_ids(loaded.model.config.vocab_size)
    assert torch.allclose(logits(loaded.model, ids), logits(result.model, ids), atol=1e-5)


def test_adapters_scaled_differently_are_not_served_on_one_base(scaled_run, root):
    from chattune.errors import ManifestError
    from chattune.inference.runs import LoadOptions, load_run

    result, _ = scaled_run
    unscaled = root / "unscaled-copy"
    shutil.copytree(result.output_dir, unscaled)
    manifest = json.loads((unscaled / "chattune.json").read_text())
    del manifest["rope_scaling"]
    (unscaled / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="trained with RoPE scaling none and 'run' .* with "
                                            r"\{'type': 'linear', 'factor': 2.0\}"):
        load_run(str(result.output_dir), LoadOptions(name="run", adapters=[("plain", str(unscaled))]))


def test_the_export_carries_the_scaling_in_its_config(scaled_run, root):
    from transformers import AutoModelForCausalLM

    from chattune.export.model import export_run

    result, _ = scaled_run
    exported = export_run(str(result.output_dir), str(root / "export"), log=lambda *_: None)
    assert exported.check["passed"]
    rope = json.loads((root / "export" / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)
    model = AutoModelForCausalLM.from_pretrained(root / "export").eval()  # transformers alone
    ids = probe_ids(model.config.vocab_size)
    assert torch.allclose(logits(model, ids), logits(result.model, ids), atol=1e-4)


def test_the_dry_run_plans_the_extended_length_and_says_so(short_base, long_rows, root):
    config = load_config(None, overrides(short_base, long_rows, root / "plan", "rope_scaling={type: yarn, factor: 2}"))
    plan = estimate(config)
    assert plan.tokens_per_step == 4 * LENGTH
    assert plan.context == (f"context: extended by RoPE scaling (yarn, factor 2) from {TRAINED} to {LENGTH} "
                            f"tokens; max_seq_length {LENGTH}")
    assert plan.context in format_plan(plan, config).splitlines()


def test_without_scaling_a_length_past_the_context_is_planned_with_a_warning(short_base, long_rows, root):
    plan = estimate(load_config(None, overrides(short_base, long_rows, root / "plan", "max_seq_length=100")))
    assert plan.tokens_per_step == 4 * 100
    assert plan.context.startswith(f"context: warning: max_seq_length 100 is beyond the {TRAINED} positions")
    assert plan.context.endswith("set rope_scaling (e.g. rope_scaling=linear:4)")


@pytest.mark.parametrize("value", ["linear:2", "{type: linear, factor: 2.0}", "{rope_type: linear, factor: 2}",
                                   "type=linear,factor=2"])
def test_the_forms_of_the_key(value):
    assert build_config({"rope_scaling": value}).model.rope_scaling == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize(("value", "message"), [
    ("cubic:2", r"rope_scaling: type: expected one of \['linear', 'dynamic', 'yarn'\], got 'cubic'"),
    ("linear:1", "rope_scaling: factor: expected a number > 1"),
    ("linear:0.5", "rope_scaling: factor: expected a number > 1"),
    ("linear:nan", "rope_scaling: factor: expected a number > 1"),
    ("linear:two", "rope_scaling: factor: expected a number > 1"),
    ("{type: linear}", "rope_scaling: factor: expected a number > 1"),
    ("{type: linear, factor: 2, beta: 1}", "rope_scaling: unknown setting 'beta'"),
])
def test_bad_values_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"rope_scaling": value})


def test_a_model_without_rope_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"rope_scaling: the model \(gpt2\) has no rotary position embeddings"):
        apply_rope_scaling(GPT2Config(), {"type": "linear", "factor": 2.0})


def test_a_scaling_is_applied_once_and_never_stacked():
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=TRAINED)
    apply_rope_scaling(config, {"type": "yarn", "factor": 2.0})
    apply_rope_scaling(config, {"type": "yarn", "factor": 2.0})  # a folder saved scaled: as it is
    assert context_length(config) == 2 * TRAINED
    assert config.rope_parameters["original_max_position_embeddings"] == TRAINED
    with pytest.raises(ConfigError, match=r"rope_scaling: the model \(llama\) already scales its RoPE \(yarn"):
        apply_rope_scaling(config, {"type": "linear", "factor": 4.0})
