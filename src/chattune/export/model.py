"""``chattune export``: a run as one standalone model folder, with proof it is the same model.

A LoRA (DoRA, rsLoRA), QLoRA, freeze or full run becomes a Hugging Face model folder
that any runtime loads without chattune or peft: config, safetensors shards with their
index, ``generation_config.json`` (the run's generation defaults, its stop tokens as EOS
ids) and the tokenizer with a ``chat_template`` that renders what training rendered
(:mod:`chattune.templates.jinja`). The exception is ChatGLM-6B: its export is chattune's
port (``model_type: chatglm6b``), which transformers alone does not load; the export
says so when it is made and in the folder (``README.md``, ``chattune_export.json``)
(:func:`chattune_only_note`). How it avoids the peers' known breakages:

- dtype: ``auto`` keeps the base model's dtype; the base is loaded in the chosen dtype
  and the adapter merged into it (never silently float32 for a bf16 base);
- QLoRA: merged into the unquantized base in its compute dtype, never into 4-bit weights;
- RoPE scaling: a run trained with ``rope_scaling`` is merged into the base loaded scaled the
  same way, and the export's ``config.json`` carries the scaling (``rope_parameters``);
- tied embeddings: when the adapter (or ``modules_to_save``) left the LM head different
  from the embedding, the export unties them, so a reload cannot overwrite the head;
- memory: weights are written tensor by tensor into each shard (a shard is never copied
  whole in memory), and the merged model is freed before the check reloads the export;
- atomic: everything is written into ``tmp-<name>-<pid>`` beside ``--out`` and renamed
  at the end, after the check passed; a failed or interrupted export leaves no folder.

The check (``export_check.json``): probe conversations through base + adapter in memory
and through the exported folder reloaded from disk: the largest logit difference (float32
at most 1e-4, or 1e-5 of the logits' scale where that is larger: a real model's logits reach
40 and more; half precision within a bound relative to the logits' scale, reported) and
32 greedy tokens each, which must be identical.

A vision-language model (LLaVA, Idefics3 / SmolVLM) is exported whole (vision tower, projector
and the merged language model: ``AutoModelForImageTextToText`` loads it) with its processor
(``processor_config.json``, the image processor's settings, beside the tokenizer and its chat
template: ``AutoProcessor`` loads it). Its check adds a probe with an image: the same prompt ids
with the run's pixels and with the pixels of the exported processor. The exported processor's
own route (the chat template's text with ``<image>``, then ``processor(text, images)``) is
checked to give chattune's prompt ids (``image_prompt_matches``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from chattune.config import ModelArgs
from chattune.errors import ChattuneError, ConfigError, ManifestError
from chattune.export.vision import IMAGE_PROBES, image_probes, image_prompt_mismatches
from chattune.manifest import read_manifest, recorded_template, verify_base_model
from chattune.methods import get_method
from chattune.model import DTYPES, load_model, load_tokenizer, native_model_path, text_config
from chattune.paths import check_output_dir
from chattune.vision.processor import (
    PROCESSOR_FILES,
    load_vision,
    save_processor_files,
)
from chattune.vocab.resize import resize_like_run

PROBES = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮您？"},
     {"role": "user", "content": "中国的首都是哪里？"}],
]
GREEDY_TOKENS = 32
FLOAT32_TOLERANCE = 1e-4
FLOAT32_RELATIVE_BOUND = 1e-5
"""float32: the bound is the larger of these two (the second times the largest |logit|): merging
LoRA into 30 layers of SmolLM2-135M moves logits of up to 43 by 1.1e-4, rounding only."""
HALF_RELATIVE_BOUND = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
CHECK_NAME = "export_check.json"
PROVENANCE_NAME = "chattune_export.json"
README_NAME = "README.md"


class ExportError(ChattuneError):
    """An export that cannot be made, or that failed its check."""


@dataclass
class ExportResult:
    """Where the export is and what its check found."""

    out_dir: Path
    check: dict
    note: str | None = None
    """What a user of the folder must know to load it (:func:`chattune_only_note`), or None."""


def chattune_only_note(model_type: str | None, folder: str | Path) -> str | None:
    """For an export that only chattune loads (ChatGLM-6B: ``model_type`` chatglm6b, chattune's
    port, which transformers does not ship), one line saying so and how to load ``folder``;
    None for every other model type."""
    from chattune.chatglm.glm6b import MODEL_TYPE as GLM6B_TYPE

    if model_type != GLM6B_TYPE:
        return None
    return (f"note: a ChatGLM-6B export needs chattune to load: model_type {GLM6B_TYPE} is chattune's port, "
            f"which transformers alone rejects; use chattune chat {folder} (or predict, serve, eval), or in "
            f"Python `import chattune.model` before AutoModelForCausalLM/AutoTokenizer.from_pretrained "
            f"(see {Path(folder) / README_NAME})")


def chattune_only_readme(model_type: str, run: Path) -> str:
    """The ``README.md`` of an export that only chattune loads: why, and how to load it."""
    return f"""# A ChatGLM-6B model exported by chattune (from {run})

This folder needs chattune to load. Its `config.json` says `model_type: {model_type}`:
chattune's port of ChatGLM-6B (THUDM's remote code no longer runs on transformers 5),
which transformers does not ship, and its tokenizer is chattune's `ChatGLM6BTokenizer`.
Plain transformers rejects the folder (it does not recognize the model type).

With chattune installed:

```bash
chattune chat THIS_FOLDER          # also chattune predict / serve / eval THIS_FOLDER
```

In Python, import chattune's model loading first: it registers the port with
transformers' Auto classes.

```python
import chattune.model  # registers ChatGLM-6B ({model_type}) with AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
```
"""


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count, in bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ConfigError(f"--shard-size: expected a size like 5GB or 500MB, got {text!r}") from None
    if size < 1:
        raise ConfigError(f"--shard-size: must be positive, got {text!r}")
    return size


def export_dtype(choice: str, base_config) -> torch.dtype:
    """The dtype to write: the choice, or for ``auto`` the base model's own (float32 only when
    the base says float32 or nothing)."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ConfigError(f"--dtype: expected auto, {', '.join(DTYPES)}; got {choice!r}")
        return DTYPES[choice]
    found = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    if isinstance(found, str):
        found = DTYPES.get(found)
    return found if found in DTYPES.values() else torch.float32


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; expected a folder to write the model to")
    check_output_dir(out, "--out")
    check_output_dir(out.parent, "--out")  # the export is written beside it, then renamed
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {out} exists and is not empty; pass --overwrite to replace it")


def _stop_ids(tokenizer, template: str) -> list[int]:
    from chattune.inference.runs import stop_token_ids

    return sorted(i for i in stop_token_ids(tokenizer, template) if i is not None)


def _pixels(images: list | None, pixels, device) -> dict:
    """The pixel inputs of a prompt's ``images`` (``pixels``: a processor's
    :meth:`~chattune.vision.processor.VisionProcessor.pixels`), on ``device``; none without images."""
    if not images:
        return {}
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in pixels(images).items()}


@torch.no_grad()
def probe(model, prompts: list[list[int]], images: list[list] | None = None,
          pixels=None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Float32 logits of every prompt position, and 32 greedy tokens (no stopping) per prompt,
    through chattune's decoder (:func:`chattune.inference.decoding.decode_batch`). ``images``:
    each prompt's images (Pillow), turned into the model's pixel inputs by ``pixels``."""
    from chattune.inference.decoding import Sequence, decode_batch
    from chattune.inference.sampling import SamplingParams
    from chattune.inference.textstream import TextStream

    images = images or [[] for _ in prompts]
    model.eval()
    device = next(model.parameters()).device
    logits = [model(input_ids=torch.tensor([ids], device=device), use_cache=False,
                    **_pixels(shown, pixels, device)).logits[0].float().cpu()
              for ids, shown in zip(prompts, images, strict=True)]
    seqs = [Sequence(ids, SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True),
                     TextStream(lambda _: "", [], strip=False), lambda _: None) for ids in prompts]
    for seq, shown in zip(seqs, images, strict=True):
        if shown:
            seq.images, seq.image_inputs = list(shown), pixels
    config = text_config(model.config)
    pad = getattr(config, "pad_token_id", None)  # a vision-language model's: its language model's
    decode_batch(model, seqs, pad_token_id=pad if isinstance(pad, int) else 0)
    return logits, [seq.generated for seq in seqs]


@torch.no_grad()
def top_gaps(model, prompt: list[int], tokens: list[int], images: list | None = None, pixels=None) -> list[float]:
    """At each generated position, how far the top logit is above the second (teacher-forced)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    logits = model(input_ids=ids, use_cache=False, **_pixels(images, pixels, device)).logits
    logits = logits[0, len(prompt) - 1:-1].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def write_processor(vision, folder: Path) -> None:
    """The vision-language model's processor saved into ``folder`` beside the exported tokenizer:
    its own files only (:data:`PROCESSOR_FILES`); the tokenizer and its chat template stay the
    export's (:func:`write_tokenizer`), which ``AutoProcessor.from_pretrained`` loads with them."""
    if not save_processor_files(vision.processor, folder):
        raise ExportError(f"the {vision.model_type} processor saved none of {', '.join(PROCESSOR_FILES)}; "
                          "expected its settings, for AutoProcessor to load the export")


def compare_probes(reference, exported, dtype: torch.dtype, gaps: list[list[float]] | None = None) -> dict:
    """The check's figures: largest logit difference and its bound, greedy tokens equal. In half
    precision a first divergence where the reference's top two logits were closer than the bound
    is a tie that rounding decides, reported as such, not a failure (``gaps``: :func:`top_gaps`)."""
    ref_logits, ref_tokens = reference
    out_logits, out_tokens = exported
    worst = max((a - b).abs().max().item() for a, b in zip(ref_logits, out_logits, strict=True))
    scale = max(t.abs().max().item() for t in ref_logits)
    bound = (max(FLOAT32_TOLERANCE, FLOAT32_RELATIVE_BOUND * scale) if dtype == torch.float32
             else HALF_RELATIVE_BOUND[dtype] * max(1.0, scale))
    same = [a == b for a, b in zip(ref_tokens, out_tokens, strict=True)]
    ties = []
    for i, (a, b) in enumerate(zip(ref_tokens, out_tokens, strict=True)):
        if a == b or dtype == torch.float32 or gaps is None:
            continue
        step = next(k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        if gaps[i][step] <= bound:
            ties.append({"probe": i, "step": step, "top_gap": gaps[i][step]})
    return {"dtype": str(dtype).replace("torch.", ""), "max_logit_difference": worst, "logit_scale": scale,
            "bound": bound, "greedy_tokens": GREEDY_TOKENS, "greedy_identical": sum(same), "probes": len(same),
            "greedy_ties": ties, "passed": worst <= bound and sum(same) + len(ties) == len(same)}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}[dtype]


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, written tensor by tensor (safetensors' own ``save_file`` copies
    the whole shard into memory first); ``safetensors.safe_open`` reads it."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _safetensors_dtype(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().contiguous().view(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))  # no copy of the tensor's bytes


def write_weights(model, folder: Path, shard_size: int) -> dict:
    """The model's state dict as ``model-0000i-of-0000n.safetensors`` shards of at most
    ``shard_size`` bytes (one tensor larger than that gets a shard of its own), plus the
    index. Tied parameters are written once, as ``save_pretrained`` does."""
    state = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(model.config, "tie_word_embeddings", False):
        for key in (tied if isinstance(tied, dict) else {name: None for name in tied}):
            state.pop(key, None)
    groups, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_size:
            groups.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_shard(folder / name, group)
        weight_map.update(dict.fromkeys(group, name))
        total += sum(t.numel() * t.element_size() for t in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


@torch.no_grad()
def merge_lora_in_place(model, rows: int = 256) -> bool:
    """Add each plain LoRA layer's ``scaling * B @ A`` into its base weight in place, ``rows``
    output rows at a time (peft's merge builds the whole delta in float32 first, the export's
    memory peak), then drop the adapters; return False (nothing changed) when some layer is not
    a plain LoRA ``Linear`` (DoRA, biases, embeddings, fan_in_fan_out): peft merges those."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        if type(layer) is not LoraLinear or layer.fan_in_fan_out:
            return False
        for name in layer.active_adapters:
            if layer.use_dora.get(name) or (getattr(layer, "lora_bias", {}) or {}).get(name):
                return False
    for layer in layers:
        weight = layer.get_base_layer().weight
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name].weight.float()
            b = layer.lora_B[name].weight
            for start in range(0, weight.shape[0], rows):
                delta = (b[start:start + rows].float() @ a) * layer.scaling[name]
                weight[start:start + rows] += delta.to(weight.dtype)
    return True


def _untie_touched_embeddings(model, log) -> None:
    """Before merging: with tied input and output embeddings, an adapter (or ``modules_to_save``)
    on either would, merged into the one shared tensor, change the other too; give the LM head a
    weight of its own first (the export then has ``tie_word_embeddings=false``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(model, "peft_config", None)
    if not config or not getattr(base.config, "tie_word_embeddings", False):
        return
    touched = set()
    for adapter in config.values():
        for key in ("target_modules", "modules_to_save"):
            value = getattr(adapter, key, None) or []
            touched |= {value} if isinstance(value, str) else set(value)
    names = {name.rsplit(".", 1)[-1] for name, module in base.named_modules()
             if module is base.get_input_embeddings() or module is base.get_output_embeddings()}
    if not touched & (names | {"embed_tokens", "lm_head", "word_embeddings", "wte"}):
        return
    head = base.get_output_embeddings()
    layer = getattr(head, "original_module", None) or getattr(head, "base_layer", None) or head
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    log("export: the adapter trains the tied embedding or LM head; the head gets its own weights "
        "(tie_word_embeddings=false)")


def _untie_if_trained(model, log) -> None:
    """A tied LM head that training changed apart from the embedding is written on its own."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is embedding.weight:
        return
    if torch.equal(head.weight, embedding.weight):
        head.weight = embedding.weight
        return
    model.config.tie_word_embeddings = False
    for config in (getattr(model.config, "text_config", None),):
        if config is not None:
            config.tie_word_embeddings = False
    log("export: the LM head was trained apart from the tied embedding; writing both (tie_word_embeddings=false)")


def export_run(run_dir: str, out: str, *, dtype: str = "auto", shard_size: str = "5GB", overwrite: bool = False,
               force: bool = False, base_model: str | None = None, log=print) -> ExportResult:
    """Export the run folder ``run_dir`` into ``out``; see the module docstring.

    Raises ConfigError for bad options or an existing ``out``, ManifestError for a run
    folder that cannot be read or a changed base model (unless ``force``), ExportError for
    a P-Tuning v2 run and for an export that failed its check (nothing is left then)."""
    from chattune.data.encode import PieceEncoder, encode_prompt

    run = Path(run_dir)
    manifest = read_manifest(run)
    method = get_method(manifest.method)
    if method.name == "ptuning":
        raise ExportError(f"{run}: a P-Tuning v2 run keeps a trained prefix of keys and values, not weights, so "
                          f"it cannot become a standalone model; serve the run folder instead: chattune serve {run}")
    if manifest.stage.get("name") == "rm":
        raise ExportError(f"{run}: a reward model (stage rm) is not exported as a chat model yet; serve the run "
                          f"folder instead (chattune serve {run}: POST /v1/rewards)")
    target = Path(out)
    _check_target(target, overwrite)
    limit = parse_size(shard_size)
    base_path = base_model or manifest.base_model.path
    tokenizer_dir = str(run) if (run / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(tokenizer_dir, manifest.base_model.trust_remote_code)
    template = recorded_template(manifest, tokenizer)
    if not (method.run_is_model and not Path(base_path).exists()):
        problems = verify_base_model(manifest, base_path, None if manifest.vocabulary else tokenizer)
        if problems and not force:
            raise ManifestError("\n".join(problems) + "\n(use --force to export anyway)")
        for problem in problems:
            log(f"warning: {problem}")
    model_args = ModelArgs(model_name_or_path=str(run) if method.run_is_model else base_path,
                           trust_remote_code=manifest.base_model.trust_remote_code,
                           rope_scaling=manifest.rope_scaling or None)  # config.json carries it on
    from transformers import AutoConfig

    native = native_model_path(model_args.model_name_or_path)
    chosen = export_dtype(dtype, AutoConfig.from_pretrained(native, trust_remote_code=model_args.trust_remote_code))
    if method.quantized_base:
        log(f"export: QLoRA run: merging into the unquantized base loaded in {chosen}, never into 4-bit weights")
    model = load_model(model_args, chosen)
    vision = load_vision(model_args.model_name_or_path, model_args.trust_remote_code)
    if method.load is not None and not method.run_is_model:
        resize_like_run(model, manifest.vocabulary, run)
        model = method.load(model, run)
    encoder = PieceEncoder(tokenizer)
    prompts = [encode_prompt(messages, template, encoder) for messages in PROBES]
    images: list[list] = [[] for _ in prompts]
    if vision is not None:
        shown_ids, shown = image_probes(model, tokenizer, template, vision)
        prompts, images = prompts + shown_ids, images + shown
    pixels = vision.pixels if vision is not None else None
    reference = probe(model, prompts, images, pixels)
    gaps = [top_gaps(model, ids, tokens, shown, pixels)
            for ids, tokens, shown in zip(prompts, reference[1], images, strict=True)]
    _untie_touched_embeddings(model, log)
    if hasattr(model, "merge_and_unload"):
        model = model.unload() if merge_lora_in_place(model) else model.merge_and_unload()
    _untie_if_trained(model, log)

    work = target.parent / f"tmp-{target.name}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        model.config.dtype = chosen
        model.config.save_pretrained(work)
        write_weights(model, work, limit)
        _write_generation_config(work, manifest, tokenizer, template)
        mismatches = write_tokenizer(tokenizer, template, work)
        if mismatches:
            log(f"warning: the exported chat template does not give chattune's prompt ids for template "
                f"{template!r} ({len(mismatches)} of the probe conversations differ, see {CHECK_NAME}); "
                "chattune itself (chat, serve) still renders the run's template from the manifest")
        image_mismatches: list[str] = []
        if vision is not None:
            write_processor(vision, work)
            image_mismatches = image_prompt_mismatches(work, prompts[len(PROBES):], images[len(PROBES):])
            if image_mismatches:
                log(f"warning: the exported chat template and processor do not give chattune's prompt ids "
                    f"for a conversation with an image ({len(image_mismatches)} of the image probes differ, "
                    f"see {CHECK_NAME}); chattune itself (chat, serve) still renders them as the run does")
        model_type = model.config.model_type
        note = chattune_only_note(model_type, target)
        if note is not None:
            (work / README_NAME).write_text(chattune_only_readme(model_type, run.resolve()), encoding="utf-8")
        del model
        gc.collect()
        exported = load_model(ModelArgs(model_name_or_path=str(work)), chosen)
        exported_vision = load_vision(str(work)) if vision is not None else None  # the export's own processor
        check = compare_probes(reference, probe(exported, prompts, images,
                                                exported_vision.pixels if exported_vision else None), chosen, gaps)
        del exported
        gc.collect()
        check.update({"run": str(run.resolve()), "method": method.name, "template": template,
                      "chat_template_matches": not mismatches, "chat_template_mismatches": mismatches[:5],
                      "shards": len(list(work.glob("model-*.safetensors")))})
        if vision is not None:
            check.update({"image_probes": len(IMAGE_PROBES), "image_prompt_matches": not image_mismatches,
                          "image_prompt_mismatches": image_mismatches[:5]})
        (work / CHECK_NAME).write_text(json.dumps(check, indent=2, ensure_ascii=False) + "\n")
        _write_provenance(work, run, manifest, chosen, template, note)
        if not check["passed"]:
            raise ExportError(f"export check failed: {format_check(check)}; nothing was written to {target}")
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ExportError(f"--out {target}: cannot write the exported model ({exc.strerror or exc}); "
                          f"nothing was written to {target}") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(target, check, note)


def write_tokenizer(tokenizer, template: str, folder: Path) -> list[str]:
    """Save the run's tokenizer into ``folder`` as runtimes need it, with the chat template of
    ``template``; return how the exported tokenizer's ``apply_chat_template`` differs from
    chattune's prompt ids on probe conversations (empty: identical).

    A rendered chat template spells special tokens out as text, so the exported tokenizer
    reads them from text; special tokens that are plain words (ChatGLM2/3's ``sop``, ``eop``)
    would then match inside words ("people"), so they are renamed ``<sop>``, ``<eop>`` (same
    ids). Where the run's tokenizer keeps special-token text in messages as text (chattune's
    ChatGLM2/3 tokenizers), the chat template escapes the messages and the tokenizer unescapes
    them after matching special tokens (``export/escape.py``), so a message cannot forge turns.
    A named template is recorded as the tokenizer's ``chattune_template``: chattune renders the
    export with it, piece by piece, as the run (``template: auto``)."""
    import copy

    from transformers import AutoTokenizer

    from chattune.export.escape import escape_jinja, special_texts
    from chattune.export.jinja_check import PROBE_CONVERSATIONS, special_text_conversations
    from chattune.special_text import add_unescape, keeps_special_text
    from chattune.templates.forms import chat_template
    from chattune.templates.registry import get_template
    from chattune.templates.role_pattern import role_pattern

    escaping = keeps_special_text(tokenizer)
    saved = copy.deepcopy(tokenizer)
    if escaping:
        add_unescape(saved)
    elif getattr(saved, "split_special_tokens", False):
        saved.split_special_tokens = False
        saved.init_kwargs["split_special_tokens"] = False
    if get_template(template) is not None:
        saved.init_kwargs["chattune_template"] = template
    else:
        saved.init_kwargs.pop("chattune_template", None)
    saved.save_pretrained(folder)
    _bracket_word_specials(folder)
    exported = AutoTokenizer.from_pretrained(folder)
    escape = escape_jinja(special_texts(exported)) if escaping else ""
    jinja = chat_template(template, exported)
    if jinja:
        exported.chat_template = escape + jinja
        exported.save_pretrained(folder)
    if not jinja:
        return [f"template {template!r}: the tokenizer has no chat template"]
    exported = AutoTokenizer.from_pretrained(folder)
    words = [[{"role": "user", "content": "Do people study philosophy or isopropyl alcohol?"}]]  # "sop" inside
    probes = PROBES + PROBE_CONVERSATIONS + words + special_text_conversations(tokenizer, exported)
    mismatches = template_mismatches(exported, tokenizer, template, probes)
    if mismatches and template == "tokenizer":
        # chattune trains an EOS after answers the tokenizer's template leaves unterminated: the
        # export's template is chattune's rendering of it, as a prefix/text/suffix pattern
        pattern = role_pattern(tokenizer, tokenizer.eos_token or "")
        if pattern is not None:
            exported.chat_template = escape + pattern.jinja()
            exported.save_pretrained(folder)
            exported = AutoTokenizer.from_pretrained(folder)
            mismatches = template_mismatches(exported, tokenizer, template, probes)
    return mismatches


def template_mismatches(exported, tokenizer, template: str, conversations: list[list[dict]]) -> list[str]:
    """Conversations whose exported ``apply_chat_template`` ids differ from chattune's own
    prompt ids with the run's tokenizer (the truth: what training encoded)."""
    from chattune.data.encode import PieceEncoder, encode_prompt
    from chattune.data.records import split_prompt

    encoder = PieceEncoder(tokenizer)
    found = []
    for messages in conversations:
        prompt, _ = split_prompt(messages)
        ours = encode_prompt(prompt, template, encoder)
        theirs = exported.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        theirs = list(theirs)
        if theirs != ours:
            pairs = zip(ours, theirs, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
            found.append(f"{prompt[-1]['content'][:40]!r}: ids differ from token {at} "
                         f"({ours[at:at + 4]} chattune, {theirs[at:at + 4]} chat template)")
    return found


def _bracket_word_specials(folder: Path) -> None:
    """Rename special tokens that are plain words (``sop``) to ``<sop>`` in a saved tokenizer."""
    import re

    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    renames = {token["content"]: f"<{token['content']}>" for token in data.get("added_tokens", [])
               if token.get("special") and re.fullmatch(r"\w+", token["content"])}
    if not renames:
        return
    for token in data["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])

    def rename(value):
        if isinstance(value, dict):
            return {renames.get(k, k): rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return renames.get(value, value) if isinstance(value, str) else value

    data["post_processor"] = rename(data.get("post_processor"))
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [renames.get(t, t) for t in config[key]]
    for entry in (config.get("added_tokens_decoder") or {}).values():
        entry["content"] = renames.get(entry.get("content"), entry.get("content"))
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_generation_config(folder: Path, manifest, tokenizer, template: str) -> None:
    from transformers import GenerationConfig

    generation = manifest.generation
    stops = _stop_ids(tokenizer, template)
    config = GenerationConfig(
        max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample,
        temperature=generation.temperature if generation.do_sample else None,
        top_p=generation.top_p if generation.do_sample else None,
        top_k=getattr(generation, "top_k", None) if generation.do_sample else None,
        repetition_penalty=generation.repetition_penalty if generation.repetition_penalty != 1.0 else None,
        eos_token_id=stops if len(stops) > 1 else (stops[0] if stops else tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config.save_pretrained(folder)


def _write_provenance(folder: Path, run: Path, manifest, dtype: torch.dtype, template: str,
                      note: str | None = None) -> None:
    provenance = {
        "run": str(run.resolve()), "method": manifest.method, "template": template,
        "base_model": manifest.base_model.path, "base_config_sha256": manifest.base_model.config_sha256,
        "global_step": manifest.results.get("global_step"), "dtype": str(dtype).replace("torch.", ""),
    }
    if note is not None:  # an export only chattune loads (ChatGLM-6B)
        provenance.update({"needs_chattune": True, "note": note})
    (folder / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")


def format_check(check: dict) -> str:
    """The check in one line."""
    difference = check["max_logit_difference"]
    return (f"{check['dtype']}: max |logit difference| {difference:.3g} (bound {check['bound']:.3g}, logits up to "
            f"{check['logit_scale']:.3g}); greedy {check['greedy_tokens']} tokens identical on "
            f"{check['greedy_identical']}/{check['probes']} probes"
            + (f" (+{len(check['greedy_ties'])} diverging at a near-tie: top-2 gap under the bound)"
               if check.get("greedy_ties") else "")
            + "; chat template "
            + ("renders chattune's prompt ids" if check.get("chat_template_matches") else "DIFFERS from chattune's ids")
            + (f"; {check['image_probes']} image probe{'s' if check['image_probes'] != 1 else ''} (pixels from the "
               "exported processor), its chat template + processor "
               + ("give chattune's ids" if check.get("image_prompt_matches") else "DIFFER from chattune's ids")
               if check.get("image_probes") else "")
            + ("" if math.isfinite(difference) else " (non-finite logits)"))
