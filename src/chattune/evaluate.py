"""``chattune eval``: did the fine-tune help, and by how much.

Every usable row of a data file is answered (batched, greedy unless asked otherwise,
with the run's template and generation defaults, through the decoder that chat and
serve use) and scored against its reference with the metrics users compare with
published tables (:mod:`chattune.metrics`: ROUGE-1/2/L, BLEU-4, as LLaMA-Factory and
ChatGLM-6B's P-Tuning scripts compute them), exact match and answer length; the
references' loss and perplexity come from a teacher-forced pass, token-weighted like
training's eval loss. ``compare`` runs the same rows through the base model or another
run and counts the rows that got better or worse.

Files (:func:`write_eval`): ``generated_predictions.jsonl`` (``prompt``, ``predict``,
``label``) and ``predict_results.json`` (``predict_bleu-4`` ...) as LLaMA-Factory writes
them, ``eval_rows.jsonl`` (every row with its scores) and ``eval.json`` (every figure and
the run's identity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.data.encode import IGNORE_INDEX, EncodeOptions, encode_conversation
from chattune.data.formats import read_rows, to_record
from chattune.data.records import RecordError, split_prompt
from chattune.decoding import BASE_ADAPTER
from chattune.errors import ConfigError, DataError
from chattune.generate import answer
from chattune.metrics import METRIC_NAMES, average, exact_match, similarity
from chattune.runs import LoadedRun, Profile

SCORE_NAMES = METRIC_NAMES + ("exact_match",)
FIGURES = SCORE_NAMES + ("answer_length", "eval_loss", "perplexity")


@dataclass
class EvalExample:
    """One usable row: where it came from, the conversation to answer and its reference."""

    index: int
    source: str
    messages: list[dict]
    reference: str | None


@dataclass
class EvalData:
    """The usable rows of a data file, and what could not be used."""

    path: str
    examples: list[EvalExample]
    rows: int
    unreadable: list[str] = field(default_factory=list)


@dataclass
class RowResult:
    """A row's answer and scores (None without a reference)."""

    example: EvalExample
    prompt: str
    predict: str
    tokens: int
    scores: dict[str, float] | None


def read_eval_data(path: str, *, fmt: str = "auto", columns: dict[str, str] | None = None,
                   limit: int | None = None) -> EvalData:
    """The rows of ``path`` to evaluate on (the first ``limit``); rows that cannot be read are
    counted with their reason. Raises DataError for a file without one usable row."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {limit}")
    examples, unreadable, rows = [], [], 0
    for row in read_rows(path):
        if limit is not None and rows >= limit:
            break
        rows += 1
        try:
            record = to_record(row, fmt, columns, need_answer=False)
        except RecordError as exc:
            unreadable.append(str(exc))
            continue
        messages, reference = split_prompt(record.messages)
        if reference is not None and not reference.strip():
            reference = None  # an empty answer is no reference: scoring it would reward empty output
        examples.append(EvalExample(rows - 1, row.where, messages, reference))
    if not examples:
        why = f"{rows} rows, none readable (first: {unreadable[0]})" if unreadable else "no rows"
        raise DataError(f"{path}: nothing to evaluate: {why}; expected rows with a prompt (and a reference "
                        "answer to score), e.g. Alpaca instruction/input/output or --columns prompt=...,response=...")
    return EvalData(str(path), examples, rows, unreadable)


def generation_settings(max_new_tokens: int | None = None, **overrides) -> dict:
    """Sampling overrides for eval: greedy unless a temperature or do_sample is given."""
    settings = {k: v for k, v in overrides.items() if v is not None}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    if "temperature" not in settings:
        settings.setdefault("do_sample", False)
    return settings


def generate_rows(run: LoadedRun, profile: str, data: EvalData, *, batch_size: int = 8, log=print,
                  **settings) -> list[RowResult]:
    """Answer every example (``batch_size`` rows per decoder batch) and score those with a reference."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    results = []
    examples = data.examples
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        seqs = answer(run, [e.messages for e in batch], profile, **settings)
        for example, seq in zip(batch, seqs, strict=True):
            text = seq.text.text
            prompt = run.decode(seq.prompt_ids)
            scores = None
            if example.reference is not None:
                scores = {**similarity(text, example.reference), "exact_match": exact_match(text, example.reference)}
            results.append(RowResult(example, prompt, text, len(seq.generated), scores))
        log(f"generated {min(start + batch_size, len(examples))}/{len(examples)}")
    return results


@torch.no_grad()
def reference_loss(run: LoadedRun, profile: Profile, data: EvalData, *, max_seq_length: int,
                   batch_size: int = 8) -> tuple[float | None, int]:
    """Teacher-forced loss of the references (mean over their supervised tokens, as training's
    eval loss) and the number of those tokens; (None, 0) when no row has a reference."""
    encoded = []
    options = EncodeOptions(max_seq_length=max_seq_length)
    for example in data.examples:
        if example.reference is None:
            continue
        messages = example.messages + [{"role": "assistant", "content": example.reference}]
        with run.tokenizer_lock:
            row = encode_conversation(messages, profile.template, run.encoder, options)
        if row.dropped is None:
            encoded.append(row)
    if not encoded:
        return None, 0
    model = run.model
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with _adapter(run, profile.adapter):
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                longest = max(len(r.input_ids) for r in batch)
                pad = run.tokenizer.pad_token_id
                ids = torch.tensor([r.input_ids + [pad] * (longest - len(r.input_ids)) for r in batch])
                labels = torch.tensor([r.labels + [IGNORE_INDEX] * (longest - len(r.labels)) for r in batch])
                mask = torch.tensor([[1] * len(r.input_ids) + [0] * (longest - len(r.input_ids)) for r in batch])
                device = run.device
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                shifted = labels[:, 1:].to(device)
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum")
                total += losses.item()
                tokens += int((shifted != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return (total / tokens if tokens else None), tokens


class _adapter:
    """The peft adapter of a profile active for a plain forward pass (the base: adapters off)."""

    def __init__(self, run: LoadedRun, adapter: str):
        self.run, self.adapter, self.disabled = run, adapter, None

    def __enter__(self):
        if not self.run.uses_adapters:
            return self
        if self.adapter == BASE_ADAPTER:
            self.disabled = self.run.model.disable_adapter()
            self.disabled.__enter__()
        else:
            self.run.model.set_adapter(self.adapter)
        return self

    def __exit__(self, *exc):
        if self.disabled is not None:
            self.disabled.__exit__(*exc)
        return False


def summarize(results: list[RowResult], loss: float | None, loss_tokens: int) -> dict:
    """The figures over all rows: metrics averaged over scored rows, mean answer length (tokens)."""
    scored = [r.scores for r in results if r.scores is not None]
    figures = {name: None for name in SCORE_NAMES}
    figures.update(average(scored) if scored else {})
    figures["answer_length"] = sum(r.tokens for r in results) / len(results) if results else 0.0
    figures["eval_loss"] = loss
    figures["perplexity"] = math.exp(loss) if loss is not None and loss < 700 else None
    figures["eval_tokens"] = loss_tokens
    return figures


def eval_length(run: LoadedRun, profile: str | None = None) -> int:
    """Tokens per reference row for the loss: the run's training ``max_seq_length`` (a compared
    model is measured over the same tokens: pass it), else the model's context length."""
    manifest = run.profile(profile).manifest
    return (manifest.max_seq_length if manifest else None) or run.context_length


def evaluate(run: LoadedRun, data: EvalData, *, profile: str | None = None, batch_size: int = 8,
             max_seq_length: int | None = None, log=print, **settings) -> tuple[dict, list[RowResult]]:
    """Generate, score and measure the references' loss for ``run``'s ``profile``; the
    ``eval.json`` figures (without ``compare``) and the rows."""
    chosen = run.profile(profile)
    started = time.perf_counter()
    results = generate_rows(run, chosen.name, data, batch_size=batch_size, log=log, **settings)
    runtime = time.perf_counter() - started
    manifest = chosen.manifest
    limit = max_seq_length or eval_length(run, profile)
    loss, loss_tokens = reference_loss(run, chosen, data, max_seq_length=limit, batch_size=batch_size)
    identity = {"name": chosen.name, "path": str(chosen.run_dir) if chosen.run_dir else None,
                "template": chosen.template,
                "method": manifest.method if manifest else None,
                "global_step": manifest.results.get("global_step") if manifest else None,
                "base_model": dataclasses.asdict(manifest.base_model) if manifest else None}
    result = {
        "run": identity,
        "data": {"path": data.path, "rows": data.rows, "max_seq_length": limit,
                 "scored": sum(r.scores is not None for r in results),
                 "no_reference": sum(r.scores is None for r in results), "unreadable": len(data.unreadable),
                 "unreadable_reasons": data.unreadable[:5]},
        "generation": {**settings, "batch_size": batch_size},
        "metrics": summarize(results, loss, loss_tokens),
        "runtime_s": round(runtime, 3),
        "samples_per_second": round(len(results) / runtime, 3) if runtime > 0 else None,
        "compare": None,
    }
    return result, results


def compare(ours: list[RowResult], theirs: list[RowResult], name: str, their_figures: dict,
            most: int = 5) -> dict:
    """Side by side per metric: the other side's figures, how many scored rows got better,
    worse or stayed the same, and the ``most`` rows whose ROUGE-L changed most."""
    better = {m: 0 for m in SCORE_NAMES}
    worse = {m: 0 for m in SCORE_NAMES}
    same = {m: 0 for m in SCORE_NAMES}
    changes = []
    for mine, other in zip(ours, theirs, strict=True):
        if mine.scores is None or other.scores is None:
            continue
        for metric in SCORE_NAMES:
            delta = mine.scores[metric] - other.scores[metric]
            (better if delta > 0 else worse if delta < 0 else same)[metric] += 1
        changes.append((mine.scores["rouge-l"] - other.scores["rouge-l"], mine, other))
    changes.sort(key=lambda item: (-abs(item[0]), item[1].example.index))
    changed = [{"index": mine.example.index, "prompt": mine.prompt, "label": mine.example.reference,
                "predict": mine.predict, "other": other.predict, "delta": round(delta, 4), "metric": "rouge-l"}
               for delta, mine, other in changes[:most]]
    return {"name": name, "metrics": their_figures, "better": better, "worse": worse, "same": same,
            "changed_most": changed}


def write_eval(out_dir: str | Path, result: dict, results: list[RowResult],
               other: list[RowResult] | None = None) -> Path:
    """Write the eval files into ``out_dir`` (made if missing); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "generated_predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in results:
            handle.write(json.dumps({"prompt": row.prompt, "predict": row.predict,
                                     "label": row.example.reference or ""}, ensure_ascii=False) + "\n")
    figures = result["metrics"]
    predict_results = {f"predict_{name}": figures[name] for name in METRIC_NAMES if figures.get(name) is not None}
    predict_results.update({"predict_runtime": result["runtime_s"],
                            "predict_samples_per_second": result["samples_per_second"]})
    (out / "predict_results.json").write_text(json.dumps(predict_results, indent=2) + "\n", encoding="utf-8")
    _write_rows(out / "eval_rows.jsonl", results)
    if other is not None:
        _write_rows(out / "compare_rows.jsonl", other)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _write_rows(path: Path, results: list[RowResult]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in results:
            handle.write(json.dumps({"index": row.example.index, "source": row.example.source,
                                     "prompt": row.prompt, "label": row.example.reference, "predict": row.predict,
                                     "tokens": row.tokens, "no_reference": row.scores is None,
                                     "scores": row.scores}, ensure_ascii=False) + "\n")


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_eval(result: dict) -> str:
    """The figures as a table; with a comparison, both sides and the row counts, then the rows
    that changed most."""
    figures, other = result["metrics"], result.get("compare")
    data = result["data"]
    lines = [f"{data['rows']} rows: {data['scored']} scored, {data['no_reference']} without a reference"
             + (f", {data['unreadable']} unreadable" if data.get("unreadable") else "")
             + f"; {result['runtime_s']:.1f} s ({result['samples_per_second']} rows/s)"]
    name = result["run"]["name"]
    if other is None:
        lines.append(f"{'metric':<14}{name:>12}")
        lines += [f"{m:<14}{_number(figures.get(m)):>12}" for m in FIGURES]
        return "\n".join(lines)
    lines.append(f"{'metric':<14}{other['name']:>12}{name:>12}   better / worse / same (rows)")
    for metric in FIGURES:
        counts = (f"   {other['better'][metric]:>6} / {other['worse'][metric]:>5} / {other['same'][metric]:>4}"
                  if metric in other["better"] else "")
        lines.append(f"{metric:<14}{_number(other['metrics'].get(metric)):>12}{_number(figures.get(metric)):>12}{counts}")
    if other["changed_most"]:
        lines.append(f"rows whose ROUGE-L changed most ({other['name']} -> {name}):")
        for row in other["changed_most"]:
            lines.append(f"  #{row['index']} {row['delta']:+.2f}  label {_short(row['label'])}")
            lines.append(f"      {other['name']}: {_short(row['other'])}")
            lines.append(f"      {name}: {_short(row['predict'])}")
    return "\n".join(lines)


def _short(text: str | None, width: int = 70) -> str:
    text = " ".join((text or "").split())
    return repr(text if len(text) <= width else text[:width - 1] + "…")


def base_profile(run: LoadedRun, profile: str | None = None) -> LoadedRun | None:
    """``run`` with a ``base`` profile answering like its own profile but without the adapter
    (same template and generation defaults); None when the adapter cannot be switched off
    in place (a run that replaced or prefixed the base: load the base on its own)."""
    chosen = run.profile(profile)
    if not run.uses_adapters:
        return None
    base = dataclasses.replace(chosen, name="base", adapter=BASE_ADAPTER, run_dir=None, manifest=None)
    return dataclasses.replace(run, profiles={**run.profiles, "base": base})


def default_out_dir(run_dir: str | Path, data_path: str) -> Path:
    """``RUN/eval/<data file name without suffix>``."""
    return Path(run_dir) / "eval" / Path(data_path).stem


def sample_rows(dataset, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """A fixed sample (same ``seed``, same rows) of ``count`` encoded rows as (prompt ids,
    reference ids): a row's last supervised span is the reference, all before it the prompt;
    rows supervised from their first token (nothing to prompt with) are left out."""
    import random

    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    samples = []
    for index in order:
        labels = dataset[index]["labels"]
        ids = dataset[index]["input_ids"]
        end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start > 0:
            samples.append((list(ids[:start]), list(ids[start:end])))
        if len(samples) == count:
            break
    return samples


@torch.no_grad()
def generation_metrics(model, tokenizer, template: str, samples: list[tuple[list[int], list[int]]], *,
                       max_new_tokens: int, batch_size: int = 8) -> dict[str, float]:
    """Greedy answers to ``samples`` (through the decoder chat and serve use) scored against
    their references: the averaged ROUGE-1/2/L, BLEU-4 and exact match, and the mean answer
    length in tokens. For ``eval_generate`` during training."""
    from chattune.data.templates import get_template
    from chattune.decoding import Decoder, Sequence, run_to_end
    from chattune.runs import stop_token_ids
    from chattune.sampling import SamplingParams
    from chattune.textstream import TextStream

    stops = stop_token_ids(tokenizer, template)
    named = get_template(template)
    stop_strings = list(named.stop_strings) if named else []

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    was_training = model.training
    model.eval()
    rows, lengths = [], []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            seqs = [Sequence(prompt, SamplingParams(max_tokens=max_new_tokens),
                             TextStream(decode, stop_strings, strip=True), lambda event: None,
                             stop_token_ids=stops) for prompt, _ in batch]
            for _ in run_to_end(Decoder(model, pad_token_id=tokenizer.pad_token_id), seqs):
                pass
            for seq, (_, reference_ids) in zip(seqs, batch, strict=True):
                reference = decode([i for i in reference_ids if i not in stops]).strip()
                rows.append({**similarity(seq.text.text, reference), "exact_match": exact_match(seq.text.text, reference)})
                lengths.append(len(seq.generated))
    finally:
        model.train(was_training)
    figures = average(rows) if rows else {}
    if lengths:
        figures["answer_length"] = sum(lengths) / len(lengths)
    return figures


def load_compare(run: LoadedRun, target: str, *, base_model: str | None = None, force: bool = False,
                 warn=print) -> tuple[LoadedRun, str]:
    """What ``--compare`` names, ready to answer, and its profile: ``base`` (the run's adapter
    switched off, or for a run that replaced its base the base model loaded on its own, with
    the run's template) or another run folder."""
    from chattune.runs import LoadOptions, load_run

    if target != "base":
        other = load_run(target, LoadOptions(force=force), warn=warn)
        return other, other.profile().name
    in_place = base_profile(run)
    if in_place is not None:
        return in_place, "base"
    chosen = run.profile()
    base_path = base_model or (chosen.manifest.base_model.path if chosen.manifest else None)
    if base_path is None:
        raise ConfigError("--compare base: this is a bare model, it has no base to compare with; "
                          "give another run folder instead")
    other = load_run(base_path, LoadOptions(template=chosen.template, name="base"), warn=warn)
    name = other.profile().name
    profile = dataclasses.replace(other.profile(), generation=chosen.generation)  # answer as the run does
    return dataclasses.replace(other, profiles={**other.profiles, name: profile}), name
