"""Training on several processes (``chattune train ... --nproc 2``: torchrun, gloo on CPU),
end to end on the tiny glm4 model (hidden size 64, 2 layers) and the demo data.

Every two-process run goes through the command line (``chattune.cli.main``, whose launcher
starts torchrun and its two workers as subprocesses), with its own data cache
(``CHATTUNE_CACHE``); runs are shared by the tests through module-scoped fixtures, five
two-process runs in all (pad, its resume, packed, killed, the killed one resumed). The launcher
runs in this process (in a thread, with the environment and the output files a subprocess
would have): it has torch and transformers imported already, which saves each run the ~6 s a
fresh launcher process spends importing them (``cmd_train`` imports the recipe). Each run
still costs 10-15 s on 2 CPU cores, nearly all of it torchrun and the workers importing torch
and transformers; the training itself takes a second or two.

What is proved: two processes at a per-device batch of 2 reach the adapter of one process at
4 (pad mode); packed steps planned per rank train as well as one process; the data is encoded
once; only rank 0 writes the run folder and metrics; the eval loss is the token-weighted mean
over every rank's rows (filler rows add nothing); a resume under two processes is exact; a
killed worker ends the job at once with a message naming the process and the checkpoint to
resume from, and that resume works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.training.checkpoints import checkpoint_problems, last_complete_checkpoint
from chattune.training.recipe import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed (torchrun, gloo)")

LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


def values_of(model: Path, data: Path, out: Path, **extra) -> dict:
    values = {"model_name_or_path": str(model), "train_files": str(data), "eval_fraction": 0.1,
              "max_seq_length": 96, "lora_rank": 8, "lora_dropout": 0, "output_dir": str(out),
              "learning_rate": 2e-3, "seed": 3, "report_to": "none"}
    values.update(extra)
    return values


def overrides(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def config_of(values: dict, cache: Path):
    """The config of an in-process (one-process) run, its data cached in ``cache``."""
    return load_config(None, overrides({**values, "cache_dir": str(cache)}))


class TwoProcessJob(threading.Thread):
    """``chattune train VALUES --nproc 2`` through ``chattune.cli.main`` in a thread of this
    process, as a launcher subprocess would run it: no launcher variables (RANK, ...) in its
    environment, ``CHATTUNE_CACHE`` set to ``cache``, its stdout and stderr files of their own
    (torchrun's output goes straight to them). ``code``: main's return value once it ends."""

    def __init__(self, values: dict, cache: Path, logs: Path):
        super().__init__(daemon=True)
        self.values, self.cache = values, cache
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        self.code: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from chattune.cli import main

        try:
            with (pytest.MonkeyPatch.context() as patch, self.stdout_path.open("w") as stdout,
                  self.stderr_path.open("w") as stderr):
                for key in LAUNCHER_KEYS:
                    patch.delenv(key, raising=False)
                for key, value in {"CHATTUNE_CACHE": str(self.cache), "TOKENIZERS_PARALLELISM": "false",
                                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
                    patch.setenv(key, value)
                patch.setattr(sys, "stdout", stdout)
                patch.setattr(sys, "stderr", stderr)
                self.code = main(["train", *overrides(self.values), "--nproc", "2"])
        except BaseException as exc:  # reported by finish()
            self.error = exc

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def finish(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the job; on a timeout kill its processes and return None."""
        self.join(timeout)
        if self.is_alive():
            kill_children()
            self.join(30)
            return None
        if self.error is not None:
            raise self.error
        return self.code


def kill_children() -> None:
    """SIGKILL the torchrun jobs this process started, and their workers."""
    import psutil

    for child in psutil.Process().children():
        try:
            if "torch.distributed.run" not in child.cmdline():
                continue
            for process in [*child.children(recursive=True), child]:
                process.kill()
        except psutil.NoSuchProcess:
            pass


def run_two(values: dict, cache: Path, logs: Path, timeout: int = 300) -> TwoProcessJob:
    """``chattune train ... --nproc 2``, to the end; its exit code checked."""
    job = TwoProcessJob(values, cache, logs)
    job.start()
    code = job.finish(timeout)
    assert code == 0, f"exit code {code}\n" + job.stdout[-3000:] + job.stderr[-5000:]
    return job


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


def final_eval_loss(run_dir: Path) -> float:
    return [row["eval_loss"] for row in metrics(run_dir) if "eval_loss" in row][-1]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[name] - b[name]).abs().max().item() for name in a)


def eval_rows(values: dict, cache: Path):
    """The eval split a run trained with, read from its data cache (encoded the same way)."""
    from chattune.data.prepare import prepare_data
    from chattune.model import load_tokenizer
    from chattune.templates.registry import resolve_template_name

    config = config_of(values, cache)
    tokenizer = load_tokenizer(config.model.model_name_or_path, config.model.trust_remote_code)
    template = resolve_template_name(config.data.template, tokenizer)
    prepared = prepare_data(config.data, tokenizer, template, config.train.seed, cache_dir=cache)
    return prepared.eval


def token_weighted_loss(model_path: Path, run_dir: Path | None, rows) -> float:
    """The cross-entropy of the base model (with ``run_dir``'s adapter) over every supervised
    token of ``rows``, each row run alone (no padding, no packing), in one process."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if run_dir is not None:
        model = PeftModel.from_pretrained(model, str(run_dir))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            supervised = targets != -100
            total += F.cross_entropy(logits[supervised], targets[supervised], reduction="sum").item()
            count += int(supervised.sum())
    assert count > 0
    return total / count


# --- the runs ------------------------------------------------------------------------------

PAD = {"packing": "pad", "max_steps": 6, "save_steps": 3, "logging_steps": 1, "per_device_eval_batch_size": 3}
"""Pad mode, six steps, checkpoints (and evaluations) at steps 3 and 6, every step's loss logged."""

PACK = {"packing": "pack", "per_device_train_batch_size": 4, "max_steps": 36, "save_steps": 36,
        "logging_steps": 6}
"""Packed, 36 steps (the loss has clearly fallen by then), evaluated at the end; the default
eval batch of 8 makes the 4 eval rows one packed step, and the second process a filler step."""


@pytest.fixture(scope="module")
def pad_runs(tiny_models, data_file, tmp_path_factory):
    """The same training in pad mode on 2 processes at a per-device batch of 2 (command line, a
    fresh data cache) and on 1 process at 4 (in this process): all 37 demo rows trained on,
    5 held-out demo rows evaluated."""
    from chattune.demo import demo_records

    root = tmp_path_factory.mktemp("pad")
    held_out = root / "eval.json"
    held_out.write_text(json.dumps(demo_records()[1][:5], ensure_ascii=False))
    model = tiny_models("glm4")
    pad = {**PAD, "eval_fraction": 0, "eval_files": str(held_out)}
    two = values_of(model, data_file, root / "two", per_device_train_batch_size=2, **pad)
    one = values_of(model, data_file, root / "one", per_device_train_batch_size=4, **pad)
    done = run_two(two, root / "cache-two", root / "logs-two")
    cached = sorted(p.name for p in (root / "cache-two" / "datasets").iterdir())  # before anything reads it
    train(config_of(one, root / "cache-one"), log=lambda *_: None)
    return {"two": two, "one": one, "log": done.stdout + done.stderr, "stdout": done.stdout,
            "cache": root / "cache-two", "cached": cached, "model": model}


@pytest.fixture(scope="module")
def pack_runs(tiny_models, data_file, tmp_path_factory):
    """Packed steps with the same per-device batch on 2 processes (command line) and on 1."""
    root = tmp_path_factory.mktemp("pack")
    model = tiny_models("glm4")
    two = values_of(model, data_file, root / "two", **PACK)
    one = values_of(model, data_file, root / "one", **PACK)
    done = run_two(two, root / "cache", root / "logs-two")
    train(config_of(one, root / "cache-one"), log=lambda *_: None)
    return {"two": two, "one": one, "log": done.stdout + done.stderr, "cache": root / "cache", "model": model}


# --- 1. the same adapter as one process -------------------------------------------------------

def test_two_processes_at_batch_2_reach_the_adapter_of_one_process_at_batch_4(pad_runs):
    """Pad mode, no dropout, seed 3, six steps: two processes of 2 rows a step each train on
    the same 4 rows a step as one process of 4, in the same order, and the gradients are
    all-reduced over tokens, so they reach the same adapter. Tolerance 1e-5 absolute on every
    weight and on every step's logged loss; measured: weights differ by at most 1.5e-6 (the
    largest weight is 0.13; lora_B, which starts at 0, reaches 7e-3 and differs by 2.5e-7), the losses by at most 9.5e-7 (float32 sums taken in another
    order; Adam's normalised steps amplify them, so the tolerance is not much tighter)."""
    two, one = Path(pad_runs["two"]["output_dir"]), Path(pad_runs["one"]["output_dir"])
    difference = max_difference(adapter(two), adapter(one))
    assert difference <= 1e-5, difference
    trained = [t.abs().max().item() for name, t in adapter(two).items() if "lora_B" in name]
    assert trained and max(trained) > 1e-3  # lora_B starts at zero: the adapter did train
    loss_two, loss_one = losses(two), losses(one)
    assert sorted(loss_two) == sorted(loss_one) == [1, 2, 3, 4, 5, 6]
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], abs=1e-5), step
    assert final_eval_loss(two) == pytest.approx(final_eval_loss(one), abs=1e-5)


# --- 2. packed steps planned per rank ---------------------------------------------------------

def test_packed_training_on_two_processes_reaches_the_eval_loss_of_one(pack_runs):
    """Packed, 36 steps at learning_rate 2e-3, per-device batch 4 (two processes take twice
    the rows a step). The LoRA on this tiny random model levels off about 0.16 below the base
    model's eval loss of 6.79 (more steps or a higher learning rate gain nothing), so besides
    the asked 2% (measured: 1 process 6.6348, 2 processes 6.6216, 0.2% apart) the two falls
    must agree within 25% (measured 0.159 and 0.172). The audit records the per-rank plan."""
    two, one = Path(pack_runs["two"]["output_dir"]), Path(pack_runs["one"]["output_dir"])
    rows = eval_rows(pack_runs["two"], pack_runs["cache"])
    base = token_weighted_loss(pack_runs["model"], None, rows)
    loss_one, loss_two = final_eval_loss(one), final_eval_loss(two)
    assert base - loss_one > 0.1 and base - loss_two > 0.1, (base, loss_one, loss_two)
    assert abs(loss_two - loss_one) / loss_one < 0.02, (loss_one, loss_two)
    # and 2% is most of what this tiny model can learn here: the falls themselves must agree
    assert abs((base - loss_two) / (base - loss_one) - 1) < 0.25, (base, loss_one, loss_two)
    plan = json.loads((two / "data_audit.json").read_text())["batching"]
    assert plan["mode"] == "pack" and plan["train"]["world_size"] == 2
    assert set(plan["train"]["rank_imbalance"]) == {"mean", "max"}
    assert 0 <= plan["train"]["rank_imbalance"]["mean"] <= plan["train"]["rank_imbalance"]["max"]
    assert "2 processes, each step's tokens dealt out to them" in pack_runs["log"]


# --- 3. the data is prepared once -------------------------------------------------------------

def test_the_data_is_encoded_once_and_read_from_the_cache_by_the_other_process(pad_runs):
    entries = pad_runs["cached"]  # the cache's datasets folder right after the two-process run
    assert len(entries) == 1, entries
    assert not [name for name in entries if ".tmp-" in name]
    assert "data: encoded by rank 0, read from the cache by 1 processes" in pad_runs["log"]
    assert "each encoded the data" not in pad_runs["log"]


# --- 4. only rank 0 writes --------------------------------------------------------------------

def test_only_rank_0_writes_the_run_folder_and_the_metrics(pad_runs):
    out = Path(pad_runs["two"]["output_dir"])
    assert [p.relative_to(out) for p in out.rglob("metrics.jsonl")] == [Path("metrics.jsonl")]
    rows = metrics(out)
    training = [row for row in rows if "loss" in row]
    assert [row["step"] for row in training] == [1, 2, 3, 4, 5, 6]  # each step once, not once a process
    assert [row["step"] for row in rows if "eval_loss" in row] == [3, 6]
    assert len([row for row in rows if "train_loss" in row]) == 1
    for row in training:
        assert row["world_size"] == 2 and row["tokens_per_second"] > 0
        assert abs(row["tokens_per_second_per_device"] - row["tokens_per_second"] / 2) <= 0.051, row
    # tokens_per_second counts both processes' tokens: as many a step as the one process of 4 rows
    one = {row["step"]: row["num_input_tokens_seen"] for row in metrics(Path(pad_runs["one"]["output_dir"]))
           if "loss" in row}
    assert {row["step"]: row["num_input_tokens_seen"] for row in training} == one
    for step in (3, 6):
        checkpoint = out / f"checkpoint-{step}"
        names = {p.name for p in checkpoint.iterdir()}
        assert {"chattune.json", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth",
                "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= names, names
        assert checkpoint_problems(checkpoint) == []
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("tmp-", "incomplete-"))) == []
    done = [line for line in pad_runs["stdout"].splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].startswith("done: 6 steps"), done
    assert pad_runs["stdout"].count("run folder:") == 1


# --- 5. the eval loss is over every rank's tokens ---------------------------------------------

def test_the_pad_eval_loss_is_the_token_weighted_mean_over_both_ranks(pad_runs):
    """5 eval rows, eval batch 3 on 2 processes: filled with a filler row to 6, rank 0 takes
    rows 0-2, rank 1 rows 3-4 and the filler. The reported eval loss equals, within 1e-5
    relative, the cross-entropy of the final adapter over every eval token computed here in
    one process, row by row (measured: about 5e-8 relative)."""
    rows = eval_rows(pad_runs["two"], pad_runs["cache"])
    assert len(rows) == 5, "the eval set must not fill the two processes' batches of 3 evenly"
    out = Path(pad_runs["two"]["output_dir"])
    expected = token_weighted_loss(pad_runs["model"], out, rows)
    assert final_eval_loss(out) == pytest.approx(expected, rel=1e-5)


def test_the_packed_eval_loss_is_the_token_weighted_mean_over_both_ranks(pack_runs):
    """The 4 eval rows (eval batch 8) are one packed step, the second process gets a filler
    step; the reported eval loss equals the one-process cross-entropy within 1e-5 relative
    (measured: about 2e-7)."""
    rows = eval_rows(pack_runs["two"], pack_runs["cache"])
    out = Path(pack_runs["two"]["output_dir"])
    assert len(rows) == 4
    plan = json.loads((out / "data_audit.json").read_text())["batching"]["eval"]
    assert plan["rows"] == 4 and plan["steps"] == 1, plan  # one step: the second process gets a filler
    expected = token_weighted_loss(pack_runs["model"], out, rows)
    assert final_eval_loss(out) == pytest.approx(expected, rel=1e-5)


# --- 6. exact resume -------------------------------------------------------------------------

def test_a_two_process_resume_from_step_3_ends_at_the_uninterrupted_adapter(pad_runs, tmp_path):
    """checkpoint-3 of the two-process pad run copied into a fresh folder and resumed on two
    processes ends at exactly the adapter of the uninterrupted run (measured difference 0.0:
    the model, optimizer, scheduler, both ranks' RNG and the data position are restored)."""
    uninterrupted = Path(pad_runs["two"]["output_dir"])
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-3", out / "checkpoint-3")
    values = {**pad_runs["two"], "output_dir": str(out), "resume_from_checkpoint": "true"}
    done = run_two(values, pad_runs["cache"], tmp_path / "logs")
    assert "resuming from checkpoint-3" in done.stdout + done.stderr
    assert min(losses(out)) == 4, "the resume restarted from step 0"
    for step in (4, 5, 6):
        assert losses(out)[step] == losses(uninterrupted)[step]
    assert max_difference(adapter(out), adapter(uninterrupted)) == 0.0


# --- 7. a killed process ---------------------------------------------------------------------

def wait_for(check, deadline: float, job: TwoProcessJob, what: str) -> None:
    while not check():
        if not job.is_alive():
            pytest.fail(f"the job ended (exit code {job.code}, {job.error!r}) before {what}:\n"
                        + job.stderr[-3000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within the deadline:\n" + job.stderr[-3000:])
        time.sleep(0.05)


def worker_of_rank(rank: int):
    """The worker process of ``rank`` among the job's processes (torchrun sets RANK in its
    environment; torchrun itself has none)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_worker_stops_the_job_and_names_the_checkpoint_to_resume_from(tiny_models, data_file,
                                                                                tmp_path):
    """SIGKILL of rank 1 after checkpoint-10: the job exits within 60 s (measured 1.3-2.2 s)
    with a non-zero code, one line naming rank 1, SIGKILL, and the last complete checkpoint
    with the command to resume; that checkpoint is complete, and the resume finishes."""
    out = tmp_path / "out"
    values = values_of(tiny_models("glm4"), data_file, out, eval_fraction=0, max_steps=5000, save_steps=5,
                       logging_steps=50)
    cache = tmp_path / "cache"
    job = TwoProcessJob(values, cache, tmp_path / "logs")
    job.start()
    try:
        wait_for(lambda: (out / "checkpoint-10").is_dir(), time.monotonic() + 240, job, "checkpoint-10")
        worker = worker_of_rank(1)
        assert worker is not None, "no process with RANK=1 among the job's processes"
        killed_at = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        code = job.finish(timeout=60)
        if code is None:
            pytest.fail("the job still runs 60 s after its rank 1 process was killed (hangs)")
        seconds = time.monotonic() - killed_at
    finally:
        if job.is_alive():
            job.finish(timeout=0)
    print(f"kill to exit: {seconds:.1f} s")
    assert code != 0
    message = job.stderr.strip().splitlines()[-1]
    assert message.startswith("chattune: error: training on 2 processes stopped: "), message
    assert f"process rank 1 (pid {worker.pid}) was killed by SIGKILL" in message
    assert "torchrun stopped the other processes" in message
    found = re.search(r"The last complete checkpoint is (\S+); resume with: (.+)$", message)
    assert found, message
    checkpoint = Path(found.group(1))
    assert checkpoint == last_complete_checkpoint(out) and checkpoint.parent == out
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert step >= 10 and step % 5 == 0
    assert checkpoint_problems(checkpoint) == []
    assert found.group(2) == "chattune train " + " ".join(overrides(values) + ["resume_from_checkpoint=true",
                                                                                "--nproc 2"])

    resumed = {**values, "resume_from_checkpoint": "true", "max_steps": step + 3}
    done = run_two(resumed, cache, tmp_path / "logs-resumed")
    assert f"resuming from {checkpoint.name}" in done.stdout + done.stderr
    assert f"done: {step + 3} steps" in done.stdout
    assert checkpoint_problems(out / f"checkpoint-{step + 3}") == []


# --- 8. --nproc 0 ------------------------------------------------------------------------------

def test_nproc_below_1_is_refused_before_anything_starts(tiny_models, data_file, tmp_path, capsys):
    from chattune.cli import main

    out = tmp_path / "out"
    code = main(["train", *overrides(values_of(tiny_models("glm4"), data_file, out)), "--nproc", "0"])
    assert code == 2
    assert "chattune: error: --nproc: must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()
