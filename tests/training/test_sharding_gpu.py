"""FSDP2 and DeepSpeed ZeRO really training through ``chattune.training.recipe.train`` on CUDA, one rank:
a few steps, the adapter saved whole, and a resume from a sharded checkpoint that ends where
the uninterrupted run ended.

Each run is its own process started by torchrun with one rank: transformers' Trainer turns on
FSDP / DeepSpeed only inside a distributed job (``LOCAL_RANK`` set, a process group), and
accelerate keeps that state once per process. Skipped without CUDA (and, for DeepSpeed,
without the deepspeed package: ``pip install 'chattune[deepspeed]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.test_recipe import make_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_EXAMPLES = ROOT / "examples" / "deepspeed"
TRAIN_ONE_RANK = """
import json, os, sys
from chattune.config_io import load_config
from chattune.training.recipe import train

result = train(load_config(sys.argv[1], sys.argv[2:]), log=lambda *_: None)
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps({"global_step": result.global_step, "train_loss": result.train_loss}), flush=True)
"""


def train_one_rank(tmp_path: Path, config, *overrides: str) -> dict:
    """Run ``train`` on ``config`` (plus ``key=value`` overrides) as rank 0 of a one-process job."""
    config_path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    config_path.write_text(yaml.safe_dump(config.to_flat_dict(), sort_keys=False, allow_unicode=True))
    script = tmp_path / "train_one_rank.py"
    script.write_text(TRAIN_ONE_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(script), str(config_path), *overrides]
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, proc.stdout[-6000:]
    return json.loads(results[-1][len("RESULT "):])


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def saved_adapter(folder: Path) -> dict[str, torch.Tensor]:
    assert (folder / "adapter_config.json").is_file(), f"no adapter in {folder}"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors and all("lora_" in name for name in tensors), sorted(tensors)[:5]
    return {name: tensor.float() for name, tensor in tensors.items()}


def check_train_save_resume(tmp_path: Path, config, checkpoint_sign: str, tolerance: dict) -> None:
    """Train 4 steps (checkpoints at 2 and 4), check the run and the sharded checkpoint, then
    resume a copy of checkpoint-2 and end with the same adapter."""
    out = Path(config.train.output_dir)
    first = train_one_rank(tmp_path, config)
    assert first["global_step"] == 4
    run_losses = losses(out)
    assert len(run_losses) == 4 and run_losses[-1] < run_losses[0], run_losses
    checkpoint = out / "checkpoint-2"
    assert any(p.name.startswith(checkpoint_sign) for p in checkpoint.iterdir()), \
        f"no {checkpoint_sign}* in {sorted(p.name for p in checkpoint.iterdir())}: the run was not sharded"
    final = saved_adapter(out)
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in final.items())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    second = train_one_rank(tmp_path, config, f"output_dir={resumed}", "resume_from_checkpoint=true")
    assert second["global_step"] == 4
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) > 2, "resume restarted from step 0"
    got = saved_adapter(resumed)
    assert got.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(got[name], final[name], **tolerance)

    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    run = load_run(str(out))
    assert isinstance(generate(run, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)[0], str)


def sharded_config(tiny_models, data_file, tmp_path, **overrides):
    return make_config(tiny_models("glm4"), data_file, tmp_path / "run", max_steps=4, save_steps=2,
                       logging_steps=1, eval_fraction=0.0, report_to=["none"], **overrides)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp2_lora_trains_saves_and_resumes(precision, tiny_models, data_file, tmp_path):
    extra = {"bf16": "true"} if precision == "bf16" else {}
    config = sharded_config(tiny_models, data_file, tmp_path, fsdp="full_shard auto_wrap", **extra)
    tolerance = {"rtol": 1e-3, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-3}
    check_train_save_resume(tmp_path, config, "pytorch_model_fsdp", tolerance)
    args = torch.load(tmp_path / "run" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Glm4DecoderLayer"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs pip install 'chattune[deepspeed]'")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_lora_trains_saves_and_resumes(stage, tiny_models, data_file, tmp_path):
    config = sharded_config(tiny_models, data_file, tmp_path, bf16="true",
                            deepspeed=str(DEEPSPEED_EXAMPLES / f"zero{stage}.json"))
    check_train_save_resume(tmp_path, config, "global_step", {"rtol": 2e-2, "atol": 1e-3})
