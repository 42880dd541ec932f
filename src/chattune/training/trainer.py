"""transformers' Trainer as chattune runs it: its arguments from the run config, where the
model goes, what a run folder may resume from, and a token-weighted eval loss.

The Trainer does the loop, mixed precision, gradient accumulation, clipping, checkpoint
rotation and exact resume (model, optimizer, scheduler, RNG and the position in the data
order); :class:`ChattuneTrainer` averages the eval loss over tokens, writes each checkpoint
whole or not at all (staged in ``tmp-checkpoint-N``, chattune's manifest included, then
renamed), and stops on the step a loss or gradient norm turns non-finite, never saving
non-finite weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from chattune.config import RunConfig
from chattune.config_io import resume_setting, source_prefix
from chattune.errors import ConfigError, TrainingError
from chattune.lora_init import initial_adapter, load_converted
from chattune.methods import Method
from chattune.training.batching import Batches
from chattune.training.checkpoints import (
    CHECKPOINT_RE,
    INCOMPLETE_PREFIX,
    STAGING_PREFIX,
    TRAINER_STATE,
    WRITE_ERRORS,
    checkpoint_problems,
    folder_bytes,
    fsync_dir,
    fsync_tree,
    is_finite_number,
    last_complete_checkpoint,
    list_checkpoints,
    non_finite,
    set_aside,
    staging_leftovers,
    storage_error,
)
from chattune.training.distributed import backend, world_from_env
from chattune.training.loss import CausalLMLoss
from chattune.training.trackers import run_name


class ChattuneTrainer(Trainer):
    """transformers' Trainer with three changes: the eval loss is the mean over every
    supervised token of the eval set (the Trainer's own is a mean of per-batch means, which
    depends on how rows are batched or packed); checkpoints are atomic; and a non-finite loss,
    gradient norm or weight stops training with a :class:`TrainingError` (the Trainer's
    ``logging_nan_inf_filter`` would hide it). With ``offload_activations`` a training step keeps
    what autograd saves in CPU memory (:func:`offloaded_activations`)."""

    def __init__(self, *args, log=print, generation_eval=None, train_sampler=None, objective=None,
                 loraplus_lr_ratio: float | None = None, offload_activations: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.offload_activations = offload_activations
        self.chattune_log = log
        self.generation_eval = generation_eval  # model -> {metric: value}, added to each evaluation
        self.chattune_sampler = train_sampler  # packed steps planned per rank (Batches.train_sampler)
        self.objective = objective  # a preference stage's loss (chattune.training.preference), else None
        if objective is not None:  # a mean over pairs: the Trainer divides it by the accumulation steps
            self.loss_is_scaled_for_ga = False  # (transformers 5.25+ reads this,
            self.model_accepts_loss_kwargs = False  # earlier versions this)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, or with ``loraplus_lr_ratio`` peft's LoRA+ optimizer: the
        optimizer the arguments name, LoRA's B matrices in groups of their own at the ratio's
        learning rate."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        self.optimizer = create_loraplus_optimizer(
            self.model if model is None else model, optimizer_cls, lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio, loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    # --- preference stages ------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A preference stage's loss on a batch of pairs (or labelled rows); else the Trainer's own."""
        if self.objective is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.objective(model, inputs)
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A preference stage's evaluation step: its loss only (rewards are kept by the objective)."""
        if self.objective is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with torch.no_grad():
            loss = self.objective(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def _gathered(self, values: list) -> list:
        """``values`` of every process, concatenated (this process's alone when there is one)."""
        if self.args.world_size <= 1:
            return values
        from accelerate.utils import gather_object

        return gather_object(values)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with a preference stage's training rewards beside the training loss."""
        if self.objective is not None and "loss" in logs:
            logs.update(self.objective.pop_metrics("train", self._gathered))
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """The planned sampler of packed steps on several processes, else the Trainer's own."""
        if self.chattune_sampler is not None:
            return self.chattune_sampler
        return super()._get_train_sampler(train_dataset)

    def _wait_for_everyone(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    # --- divergence guard ------------------------------------------------------------------

    def divergence_error(self, what: str, step: int) -> TrainingError:
        """The one-line error for a run that diverged at ``step``: what, the likely cause, the fix."""
        args = self.args
        causes = [f"learning_rate={args.learning_rate:g} is too high"]
        if args.max_grad_norm <= 0:
            causes.append("max_grad_norm=0 turns gradient clipping off")
        if args.fp16:
            causes.append("float16 overflowed")
        fix = "lower learning_rate (LoRA usually 1e-5 to 1e-3)"
        fix += ", set max_grad_norm=1.0" if args.max_grad_norm <= 0 else ""
        fix += ", use bf16 or float32" if args.fp16 else ""
        last = last_complete_checkpoint(self._get_output_dir(None))
        kept = (f"the last good checkpoint, {last.name}, is kept" if last
                else "no checkpoint had been saved")
        return TrainingError(f"training diverged at step {step}: {what}. Likely cause: {' and '.join(causes)}. "
                             f"Fix: {fix}, then start again. Nothing was saved from this step on; {kept}")

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, with ``offload_activations`` under :func:`torch.autograd.graph.save_on_cpu`
        (what autograd saves goes to CPU memory, pinned on CUDA, and comes back for the backward),
        stopping on the step the (unfiltered) loss turns NaN or inf."""
        with offloaded_activations(self.offload_activations):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            raise self.divergence_error(f"the loss is {loss.detach().float().mean().item()}",
                                        self.state.global_step + 1)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm, stopping before the optimizer step when it is NaN or inf (not
        under fp16, where the loss scaler skips such steps on its own)."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.args.fp16 and not is_finite_number(norm):
            raise self.divergence_error(f"the gradient norm is {float(norm)}", self.state.global_step + 1)
        return norm

    def check_finite_weights(self, where: str) -> None:
        """Raise TrainingError (before anything is written) if a trainable weight is NaN or inf."""
        bad = non_finite(self.model)
        if bad:
            raise self.divergence_error(
                f"{len(bad)} trainable tensors hold NaN or inf values after the update (e.g. {bad[0]}), "
                f"so {where} was not written", self.state.global_step)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's load of a checkpoint's weights (for a run whose ``lora_init`` changed the
        base weights, the trained part of its converted adapter, :func:`load_converted`), then a
        check that the trainable ones are finite: a checkpoint whose weights were damaged on disk
        (NaN or inf, the files whole) stops the run with a TrainingError naming it, before any
        step trains on it."""
        if initial_adapter(self.model) is not None:
            load_converted(self.model, Path(resume_from_checkpoint), self.chattune_log)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        bad = non_finite(self.model)
        if not bad:
            return
        folder = Path(resume_from_checkpoint)
        earlier = [path for step, path in list_checkpoints(folder.parent)
                   if path != folder and step < _step_of(folder) and not checkpoint_problems(path)]
        fix = (f"resume from an earlier one: resume_from_checkpoint={earlier[0]}" if earlier
               else f"{folder.parent} holds no complete checkpoint older than it; start again in a new output_dir")
        raise TrainingError(f"resume_from_checkpoint: {folder} is a bad checkpoint: {len(bad)} trainable tensors "
                            f"hold NaN or inf values (e.g. {bad[0]}), so training cannot go on from it; {fix}")

    # --- atomic checkpoints -----------------------------------------------------------------

    def checkpoint_bytes(self) -> int:
        """About how many bytes a checkpoint takes: the last complete one's size, else the
        trainable weights plus the optimizer state (twice them for Adam) plus 100 kB."""
        last = last_complete_checkpoint(self._get_output_dir(None))
        if last is not None:
            return folder_bytes(last)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return 3 * weights + 100_000

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` whole or not at all: everything (weights, optimizer,
        scheduler, RNG, trainer state, chattune's manifest) goes into ``tmp-checkpoint-N``,
        is flushed to disk, and the folder is then renamed. A disk that cannot take it ends
        in a one-line TrainingError; earlier checkpoints are untouched.

        Several processes: every process takes part in saving the weights and optimizer
        (collective under FSDP and DeepSpeed, each writing its shard; rank 0 alone under DDP)
        and writes its own RNG state; rank 0 then writes the trainer state and chattune's
        files and renames the folder, while the others wait."""
        self.check_finite_weights(f"checkpoint-{self.state.global_step}")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial))
        staging, final = run_dir / f"{STAGING_PREFIX}{name}", run_dir / name
        main = self.args.should_save
        if main and staging.exists():
            moved = set_aside(staging, INCOMPLETE_PREFIX)
            self.chattune_log(f"chattune: {staging.name} was left by an interrupted save; kept as {moved.name}")
        needed = self.checkpoint_bytes() if main else None
        if trial is None:
            self.store_flos()
        self._wait_for_everyone()  # the staging folder is clear before anyone writes into it
        try:
            self.save_model(str(staging), _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(staging))
                self._save_scaler(str(staging))
                self._save_rng_state(str(staging))
            self._wait_for_everyone()  # every process's part is written
            if main:
                self._write_checkpoint_state(staging)
                fsync_tree(staging)
        except WRITE_ERRORS as exc:
            error = storage_error(exc, run_dir, needed, f"saving {name}")
            if error is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)  # this save's own partial files
            raise error from exc
        if main:
            self._put_in_place(staging, final, name, run_dir)
        self._wait_for_everyone()  # no process goes on before checkpoint-N exists

    def _write_checkpoint_state(self, staging: Path) -> None:
        """The trainer state (with the callbacks' state) and chattune's files, into ``staging``."""
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control]
                   if isinstance(cb, ExportableState)]:
            cb_name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[cb_name], list):
                self.state.stateful_callbacks[cb_name].append(cb.state())
            else:
                self.state.stateful_callbacks[cb_name] = cb.state()
        self.state.save_to_json(str(staging / TRAINER_STATE))
        for cb in self.callback_handler.callbacks:
            if hasattr(cb, "write_checkpoint_files"):
                cb.write_checkpoint_files(staging, self.state)

    def _put_in_place(self, staging: Path, final: Path, name: str, run_dir: Path) -> None:
        """Rename the complete ``staging`` folder to ``final`` (an existing one set aside, never
        deleted), then rotate old checkpoints."""
        if final.exists():
            why = checkpoint_problems(final)
            moved = set_aside(final, INCOMPLETE_PREFIX if why else "superseded-")
            self.chattune_log(f"chattune: {name} already existed ({'; '.join(why) or 'from an earlier run'}); "
                              f"kept as {moved.name}")
        os.replace(staging, final)
        fsync_dir(run_dir)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def save_final(self, output_dir: Path, write_files) -> None:
        """Save the trained model into ``output_dir`` (the run folder), after checking its
        weights are finite: written into ``tmp-final`` first, then each file moved in, so
        that a full disk leaves the earlier files as they were. ``write_files(folder)`` adds
        chattune's own files. Several processes: all take part in gathering the weights
        (FSDP, DeepSpeed ZeRO-3), rank 0 writes."""
        self.check_finite_weights("the final run folder")
        staging = output_dir / f"{STAGING_PREFIX}final"
        main = self.args.should_save
        if main and staging.exists():
            shutil.rmtree(staging)  # only ever this function's own partial output
        self._wait_for_everyone()
        try:
            self.save_model(str(staging))
            if main:
                write_files(staging)
                fsync_tree(staging)
        except WRITE_ERRORS as exc:
            needed = folder_bytes(staging) if staging.exists() else None
            error = storage_error(exc, output_dir, needed and needed + 1, "saving the final run folder")
            if error is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise error from exc
        if main:
            for path in sorted(staging.iterdir()):
                target = output_dir / path.name
                if target.is_dir() and path.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
            staging.rmdir()
            fsync_dir(output_dir)
        self._wait_for_everyone()

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's evaluation loop, with ``<prefix>_loss`` token-weighted."""
        loss = self.compute_loss_func
        if isinstance(loss, CausalLMLoss):
            loss.reset_eval()
        if self.objective is not None:
            self.objective.pop_metrics("eval")
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.objective is not None:
            output.metrics.update({f"{prefix}_{name}": value
                                   for name, value in self.objective.pop_metrics("eval", self._gathered).items()})
        if self.generation_eval is not None and prefix == "eval":
            capture = getattr(loss, "capture", None)
            with capture.paused() if capture is not None else contextlib.nullcontext():
                figures = self.generation_eval(self.model)
            output.metrics.update({f"{prefix}_{name}": value for name, value in figures.items()})
        if isinstance(loss, CausalLMLoss):
            dtype = torch.float64 if self.args.device.type in ("cpu", "cuda") else torch.float32
            totals = torch.tensor([loss.eval_sum, loss.eval_count], dtype=dtype, device=self.args.device)
            totals = self.accelerator.reduce(totals, reduction="sum")
            if totals[1] > 0:
                output.metrics[f"{prefix}_loss"] = (totals[0] / totals[1]).item()
        return output

    def final_eval_loss(self) -> float | None:
        """The eval loss after the last step: the one logged at that step (the Trainer
        evaluates there when the step is an eval step), else evaluated now; None without
        eval data."""
        if self.eval_dataset is None:
            return None
        last = [entry["eval_loss"] for entry in self.state.log_history
                if "eval_loss" in entry and entry.get("step") == self.state.global_step]
        return last[-1] if last else self.evaluate()["eval_loss"]


def offloaded_activations(offload: bool):
    """A context under which the tensors autograd saves are kept in CPU memory (pinned when CUDA
    is there, copied back as the backward pass needs them); a no-op context without ``offload``."""
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def _step_of(folder: Path) -> int:
    """N of a ``checkpoint-N`` folder (0 for any other name)."""
    match = CHECKPOINT_RE.match(folder.name)
    return int(match.group(1)) if match else 0


def resume_path(config: RunConfig, output_dir: Path, log=print) -> str | None:
    """The checkpoint to resume from: as set by ``resume_from_checkpoint`` (``true``: the
    newest complete one in ``output_dir``), else None; an ``output_dir`` that already holds
    checkpoints without it is an error (chattune never overwrites checkpoints).

    With ``true``, newer checkpoints that are incomplete or unreadable, and saves
    interrupted midway (``tmp-checkpoint-N``), are named with the reason and renamed
    ``incomplete-...`` (never deleted); the one resumed from is named through ``log``."""
    setting = resume_setting(config)
    where = source_prefix(config, "resume_from_checkpoint")
    found = list_checkpoints(output_dir)
    if setting is True:
        skipped = []
        chosen = None
        for _, folder in found:
            problems = checkpoint_problems(folder)
            if not problems:
                chosen = folder
                break
            skipped.append((folder, problems))
        if chosen is None:
            why = "".join(f"; {folder.name}: {', '.join(problems)}" for folder, problems in skipped)
            complete = "complete " if skipped else ""
            raise ConfigError(f"{where}resume_from_checkpoint: no {complete}checkpoint-* folder in {output_dir} "
                              f"to resume from{why}")
        for folder, problems in skipped:
            moved = set_aside(folder)
            log(f"chattune: skipping {folder.name}: incomplete or unreadable ({', '.join(problems)}); "
                f"kept as {moved.name}")
        for folder in staging_leftovers(output_dir):
            moved = set_aside(folder)
            log(f"chattune: skipping {folder.name}: a save interrupted before it was complete; kept as {moved.name}")
        log(f"chattune: resuming from {chosen.name} ({chosen})")
        return str(chosen)
    if isinstance(setting, str):
        if not Path(setting).is_dir():
            raise ConfigError(f"{where}resume_from_checkpoint: {setting} is not a checkpoint folder")
        problems = checkpoint_problems(setting)
        if problems:
            raise ConfigError(f"{where}resume_from_checkpoint: {setting} is not a complete checkpoint "
                              f"({', '.join(problems)}); give an earlier one, or true for the newest complete one")
        log(f"chattune: resuming from {setting}")
        return setting
    if found:
        raise ConfigError(
            f"output_dir: {output_dir} already holds checkpoints ({found[0][1].name}); "
            "set resume_from_checkpoint=true to continue, or choose another output_dir "
            "(chattune never overwrites checkpoints)"
        )
    return None


def place_model(model, method: Method) -> None:
    """Put the model on the device the Trainer would put it on, before the probes run on it
    (not a model dispatched with a device map, nor a quantized base: those stay put)."""
    if getattr(model, "hf_device_map", None) is None and not method.quantized_base:
        from accelerate import PartialState

        model.to(PartialState().device)


def dataloader_workers(setting: int | None, streamed: bool = False) -> int:
    """DataLoader workers: as set, else 2-4 on CUDA (batches are built while the GPU computes)
    and 0 on CPU (workers would take cores from the compute); always 0 for ``streamed`` data (read
    as training goes): each worker would read the whole stream again, and its counts must be
    the training process's."""
    if streamed:
        return 0
    if setting is not None:
        return setting
    if not torch.cuda.is_available():
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def training_arguments(config: RunConfig, has_eval: bool, batches: Batches | None = None,
                       sharding: dict | None = None) -> TrainingArguments:
    """transformers TrainingArguments from the run config (the batching plan, and FSDP or
    DeepSpeed settings from :func:`chattune.training.sharding.sharding_arguments`)."""
    t = config.train
    eval_steps = t.eval_steps or t.save_steps
    report = [r for r in t.report_to if r != "none"]
    fields = TrainingArguments.__dataclass_fields__
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    extra = {}
    if t.gradient_checkpointing:  # stated either way: transformers' default changed between versions
        extra[f"{checkpointing}_kwargs"] = {"use_reentrant": t.gradient_checkpointing_reentrant}
    if batches is not None and batches.mode == "group_by_length":
        if "train_sampling_strategy" in fields:
            extra["train_sampling_strategy"] = "group_by_length"
        else:  # transformers 4
            extra["group_by_length"] = True
    if t.torch_compile:
        extra.update(torch_compile=True, torch_compile_backend="inductor")
    extra.update(sharding or {})
    workers = dataloader_workers(t.dataloader_num_workers, batches is not None and batches.mode == "stream")
    return TrainingArguments(
        **{checkpointing: t.gradient_checkpointing},
        **extra,
        output_dir=t.output_dir,
        per_device_train_batch_size=batches.train_batch_size if batches else t.per_device_train_batch_size,
        per_device_eval_batch_size=batches.eval_batch_size if batches else t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        fp16=t.fp16,
        bf16=t.bf16,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to=report or "none",
        run_name=run_name(config),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        neftune_noise_alpha=t.neftune_noise_alpha,
        optim_target_modules=(t.optim_target_modules[0] if t.optim_target_modules == ["all-linear"]
                              else t.optim_target_modules),
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=t.ddp_timeout,
        ddp_backend=backend() if world_from_env().distributed else None,
        # every trainable tensor of every method takes part in each step: DDP need not search for unused ones
        ddp_find_unused_parameters=False,
    )
