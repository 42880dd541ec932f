"""LoRA's starting point (``lora_init``), and the adapters of the starts that change the base.

``default`` and ``gaussian`` start B at zero: the run starts as the base model, whose weights
stay as they are. ``pissa`` (``pissa_niter_N``: a randomized SVD of N iterations) and ``olora``
start A0, B0 from each adapted base weight W (its principal singular vectors; a QR decomposition)
and train on the residual ``W_res = W - s B0 A0`` (s: the LoRA scaling), so the run still starts
as the base, but the weights under the adapter are no longer the base model's.

Every adapter chattune writes of such a run (the run folder and each checkpoint) is therefore
converted to a plain LoRA of the original base (:func:`write_converted`)::

    W_res + s B A  =  W + s (B A - B0 A0)  =  W + s [B | -B0] [A ; A0]

a LoRA of rank 2r with the same scaling (alpha doubled; times sqrt 2 with rsLoRA), as peft's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes it. chattune converts
on its own because peft's conversion keeps only the A and B matrices (it drops DoRA's magnitudes,
modules_to_save and trainable tokens) and needs the initial adapter saved in a folder: here the
initial A0, B0 are kept in memory from the start (:func:`keep_initial_adapter`), and a converted
checkpoint needs nothing more to resume from, its first r ranks being the trained A, B and its
last r the initial A0, -B0 (:func:`load_converted`).

Only ``chattune.errors`` of chattune is imported here (the method table and the trainer use it).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from chattune.errors import ConfigError, TrainingError

LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")
"""The values of ``lora_init``; N is a number >= 1."""
INIT_SEED = 0
"""The random seed of the base-changing starts (pissa_niter_N's random projection): a resumed
run rebuilds the same residual."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_NITER = re.compile(r"pissa_niter_(\d+)")
_RANK_DIM = {".lora_A.weight": 0, ".lora_embedding_A": 0, ".lora_B.weight": 1, ".lora_embedding_B": 1}
"""Where the rank is in a saved LoRA matrix (A: rows; B: columns), by the end of its name."""


def _choices() -> str:
    return ", ".join(LORA_INITS) + " (N >= 1 iterations)"


def check_lora_init(value: str, method: str, sharding: str | None = None) -> None:
    """Refuse (ConfigError naming ``lora_init``) an unknown value, one that ``method`` cannot
    honour, and a base-changing start with ``sharding`` (``fsdp`` or ``deepspeed``)."""
    if value == "loftq":
        raise ConfigError("lora_init: loftq is not supported (LoftQ quantizes the base with bitsandbytes on a "
                          "CUDA GPU, and a LoftQ adapter only fits its quantized base); expected one of "
                          f"{_choices()}")
    niter = _NITER.fullmatch(value)
    if niter and int(niter.group(1)) < 1:
        raise ConfigError(f"lora_init: {value}: N, the randomized SVD's iterations, must be >= 1 (pissa_niter_4 is "
                          "a usual choice; pissa takes the exact SVD)")
    if value not in ("default", "gaussian", "pissa", "olora") and not niter:
        raise ConfigError(f"lora_init: unknown value {value!r}; expected one of {_choices()}")
    if value == "default":
        return
    if method not in ("lora", "qlora"):
        raise ConfigError(f"lora_init: {value} is how LoRA adapters start; method={method} has none (use method=lora)")
    if not mutates_base(value):
        return
    if method == "qlora":
        raise ConfigError(f"lora_init: {value} moves part of each base weight into the adapter, and qlora keeps the "
                          "base in 4/8-bit, where that part cannot be taken out exactly (nor the adapter converted "
                          "back to a LoRA of the original base); use method=lora, or lora_init=default or gaussian")
    if sharding:
        raise ConfigError(f"lora_init: {value} changes the base weights while training, and converting its adapter "
                          f"back to a LoRA of the original base (and resuming from one) is not supported with "
                          f"{sharding}'s sharded weights and checkpoints; train without {sharding}, or use "
                          "lora_init=default or gaussian")


def mutates_base(value: str) -> bool:
    """Whether the start ``value`` changes the base weights (pissa, pissa_niter_N, olora)."""
    return value == "olora" or value == "pissa" or bool(_NITER.fullmatch(value))


def peft_init(value: str) -> bool | str:
    """peft's ``init_lora_weights`` for ``lora_init=value`` (ConfigError for an unknown one)."""
    check_lora_init(value, "lora")
    return True if value == "default" else value


@contextmanager
def starting_rng():
    """A context whose random generators (the CPU's and the current GPU's) are seeded with
    :data:`INIT_SEED`, put back as they were after: a base-changing start made in it
    (pissa_niter_N's random projection) comes out the same in a resumed run."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(INIT_SEED)
        if devices:
            torch.cuda.manual_seed(INIT_SEED)
        yield


# --- the initial adapter ----------------------------------------------------------------------


def initial_adapter(model) -> dict[str, torch.Tensor] | None:
    """The initial A0, B0 of a run started with a base-changing ``lora_init`` (saved names ->
    tensors on the CPU); None for any other model."""
    return getattr(model, "chattune_initial_adapter", None)


def keep_initial_adapter(model) -> None:
    """Keep the just-initialised A0, B0 of the peft ``model`` (on the CPU) and make its
    ``save_pretrained`` write the adapter converted to a plain LoRA of the original base
    (:func:`write_converted`)."""
    from peft import get_peft_model_state_dict

    initial = {name: tensor.detach().to("cpu", copy=True) for name, tensor in get_peft_model_state_dict(model).items()
               if name.endswith((".lora_A.weight", ".lora_B.weight"))}
    model.chattune_initial_adapter = initial
    save = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        save(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_converted(Path(save_directory), initial)

    model.save_pretrained = save_pretrained


def _rank_dim(name: str) -> int | None:
    return next((dim for end, dim in _RANK_DIM.items() if name.endswith(end)), None)


def convert_tensors(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved adapter ``tensors`` as a plain LoRA of the original base: each A and B
    joined with its initial one (``[A ; A0]``, ``[B | -B0]``), a LoRA no init changed (an
    embedding's) padded with zeros to the same rank; every other tensor as it is."""
    missing = sorted(set(initial) - set(tensors))
    if missing:
        raise TrainingError(f"lora_init: the saved adapter lacks {len(missing)} of the initial LoRA tensors "
                            f"(e.g. {missing[0]}), so it cannot be converted to a LoRA of the original base")
    converted = {}
    for name, tensor in tensors.items():
        dim = _rank_dim(name)
        if dim is None:
            converted[name] = tensor
            continue
        start = initial.get(name)
        start = torch.zeros_like(tensor) if start is None else start.to(tensor.dtype)
        converted[name] = torch.cat([tensor, -start if dim == 1 else start], dim=dim).contiguous()
    return converted


def converted_config(config: dict) -> dict:
    """A peft LoRA ``adapter_config.json`` of the converted adapter: twice the rank, the same
    scaling (alpha doubled; times sqrt 2 with rsLoRA, whose scaling is alpha / sqrt(r)), and a
    plain start (``init_lora_weights: true``), as peft writes its own conversion."""
    alpha_factor = math.sqrt(2) if config.get("use_rslora") else 2
    return {**config, "r": 2 * config["r"], "lora_alpha": config["lora_alpha"] * alpha_factor,
            "init_lora_weights": True,
            "rank_pattern": {key: 2 * value for key, value in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {key: value * alpha_factor for key, value in (config.get("alpha_pattern") or {}).items()}}


def write_converted(folder: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite the peft adapter saved in ``folder`` (its weights and config) as the plain LoRA
    of the original base (:func:`convert_tensors`, :func:`converted_config`)."""
    from safetensors.torch import load_file, save_file

    weights, config_path = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise TrainingError(f"lora_init: {folder} holds no {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} to convert to a "
                            "LoRA of the original base")
    save_file(convert_tensors(load_file(str(weights)), initial), str(weights), metadata={"format": "pt"})
    config = converted_config(json.loads(config_path.read_text(encoding="utf-8")))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def converted_settings(settings: dict) -> dict:
    """A run's LoRA settings (its manifest's) as those of the adapter it saved: a run with a
    base-changing ``lora_init`` saved a plain LoRA of twice the rank (alpha as
    :func:`converted_config`); any other run's are returned as they are."""
    if not mutates_base(settings.get("lora_init") or "default"):
        return settings
    rank = settings["lora_rank"]
    alpha = settings.get("lora_alpha")
    if alpha is not None or settings.get("use_rslora"):
        alpha = (alpha if alpha is not None else 2 * rank) * (math.sqrt(2) if settings.get("use_rslora") else 2)
    return {**settings, "lora_rank": 2 * rank, "lora_alpha": alpha, "lora_init": "default"}


# --- resume -----------------------------------------------------------------------------------


def split_converted(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                    where: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A converted adapter's ``tensors`` split into the trained adapter (the first r ranks, with
    every other tensor) and the initial A0, B0 it was converted with (the last r: A0 and -B0);
    r is the rank of ``initial``. TrainingError if ``tensors`` are not such an adapter."""
    trained, start = {}, {}
    for name, tensor in tensors.items():
        dim = _rank_dim(name)
        if dim is None:
            trained[name] = tensor
            continue
        rank = tensor.shape[dim] // 2
        if name in initial and tensor.shape[dim] != 2 * initial[name].shape[dim]:
            raise TrainingError(f"resume_from_checkpoint: {where}: {name} has rank {tensor.shape[dim]}, not twice "
                                f"the run's {initial[name].shape[dim]}: not an adapter this run converted")
        first, second = tensor.narrow(dim, 0, rank), tensor.narrow(dim, rank, rank)
        trained[name] = first.contiguous()
        if name in initial:
            start[name] = (-second if dim == 1 else second).contiguous()
    missing = sorted(set(initial) - set(start))
    if missing:
        raise TrainingError(f"resume_from_checkpoint: {where}: the adapter lacks {missing[0]} "
                            f"(and {len(missing) - 1} more of the run's LoRA tensors)")
    return trained, start


def _delta(layer, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B A in float32, in the base weight's layout (transposed for a fan-in-fan-out layer)."""
    delta = scaling * b.float() @ a.float()
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def rebase(model, start: dict[str, torch.Tensor], adapter: str = "default") -> int:
    """Make the base weights of ``model`` the residual of the initial adapter ``start`` (A0, B0
    by saved name) where it differs from the model's own (:func:`initial_adapter`): each such
    weight gains ``s (B0' A0' - B0 A0)`` (its own start put back, ``start``'s taken out), and
    ``start`` becomes the model's initial adapter. Returns how many weights changed."""
    own = initial_adapter(model)
    changed = 0
    for name in [name for name in own if name.endswith(".lora_A.weight")]:
        b_name = name.removesuffix(".lora_A.weight") + ".lora_B.weight"
        if torch.equal(own[name], start[name]) and torch.equal(own[b_name], start[b_name]):
            continue
        layer = model.get_submodule(name.removesuffix(".lora_A.weight"))
        weight = layer.get_base_layer().weight
        scaling = layer.scaling[adapter]
        delta = _delta(layer, own[name], own[b_name], scaling) - _delta(layer, start[name], start[b_name], scaling)
        with torch.no_grad():
            weight.data = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        changed += 1
    own.update(start)
    return changed


def load_converted(model, folder: Path, log=print) -> None:
    """Load the converted adapter of checkpoint ``folder`` into ``model`` (a run started with a
    base-changing ``lora_init``) to resume training: the trained A, B (and every other trained
    tensor) into the adapter; and, should this machine have started the adapter differently
    from the checkpoint's run (another SVD), the base weights rebuilt as the checkpoint's
    residual (:func:`rebase`), so that training goes on from the same model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise TrainingError(f"resume_from_checkpoint: {folder} holds no {ADAPTER_WEIGHTS}")
    trained, start = split_converted(load_file(str(path)), initial_adapter(model), folder)
    changed = rebase(model, start)
    if changed:
        log(f"chattune: lora_init: {changed} base weights rebuilt as the residual of {folder.name}'s initial "
            "adapter (this machine started the adapter differently)")
    result = set_peft_model_state_dict(model, trained)
    if result.unexpected_keys:
        raise TrainingError(f"resume_from_checkpoint: {folder}: {path.name} holds tensors the model has no place for "
                            f"(e.g. {result.unexpected_keys[0]})")
