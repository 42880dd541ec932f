"""``chattune eval``: did the fine-tune help, and by how much.

Every usable row of a data file is answered (batched, greedy unless asked otherwise,
with the run's template and generation defaults, through the decoder that chat and
serve use) and scored against its reference with the metrics users compare with
published tables (:mod:`chattune.evaluation.metrics`: ROUGE-1/2/L, BLEU-4, as LLaMA-Factory and
ChatGLM-6B's P-Tuning scripts compute them), exact match and answer length; the
references' loss and perplexity come from a teacher-forced pass, token-weighted like
training's eval loss. A row whose reference answer is a tool call (the last assistant message
has ``tool_calls``; the prompt then shows the record's tools, as every row with tools does) is
scored on its text against the call as the run's template writes it, and on the calls parsed
from the answer (:func:`chattune.templates.tool_calls.parse_calls`) against the reference's:
``tool_name_match`` and ``tool_args_match`` (:func:`chattune.evaluation.metrics.call_scores`), averaged
over those rows only. ``compare`` runs the same rows through the base model or another
run and counts the rows that got better or worse.

Files (:func:`write_eval`): ``generated_predictions.jsonl`` (``prompt``, ``predict``,
``label``) and ``predict_results.json`` (``predict_bleu-4`` ...) as LLaMA-Factory writes
them, both over the scored rows only (the file's rows recomputed give the results' figures),
``eval_rows.jsonl`` (every row with its scores; a row without a reference is there alone,
``"no_reference": true``) and ``eval.json`` (every figure and the run's identity).

Rows with images (``<image>`` placeholders and their images, paths relative to the data file)
are answered with their images by a vision-language model, each message carrying the images of
its placeholders (:func:`~chattune.vision.images.images_on_messages`), batched with the text rows; their references' loss is
measured with the images' pixels (:class:`chattune.training.collate.ImageCollator`). On a model
that reads no images, such a row is unusable: counted with the unreadable rows, with its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.data.encode import IGNORE_INDEX, EncodeOptions, encode_conversation
from chattune.data.formats import read_rows, to_record
from chattune.data.images import NOT_VISION, encode_image_record, stray_image_token
from chattune.data.records import Record, RecordError, split_prompt
from chattune.errors import ChattuneError, ConfigError, DataError
from chattune.evaluation.metrics import (
    CALL_METRIC_NAMES,
    METRIC_NAMES,
    average,
    call_scores,
    exact_match,
    similarity,
)
from chattune.inference.decoding import BASE_ADAPTER, Sequence
from chattune.inference.generate import answer
from chattune.inference.runs import ImagesNotSupported, LoadedRun, PromptTooLong, ServedModel
from chattune.templates.registry import render
from chattune.templates.tool_calls import KEPT_TOKENS, parse_calls
from chattune.vision.images import ImageError, describe, images_on_messages

SCORE_NAMES = METRIC_NAMES + ("exact_match",)
FIGURES = SCORE_NAMES + ("answer_length", "eval_loss", "perplexity")
CALL_ANSWER_ROLES = ("assistant", "tool_call")
"""The pieces of a call answer that a model writes as text (not its end tokens)."""
IMAGE_ERRORS = (ImagesNotSupported, ImageError, PromptTooLong)
"""What a row's images can make :func:`chattune.inference.generate.answer` raise: the model reads
no images, an image cannot be used (any more), the images alone do not fit the context."""


@dataclass
class EvalExample:
    """One usable row: where it came from, the conversation to answer and its reference."""

    index: int
    source: str
    messages: list[dict]
    reference: str | None
    tools: list[dict] | None = None
    """The function objects the row offers (shown in its prompt)."""
    calls: list[dict] | None = None
    """The reference answer's tool calls ``[{"name", "arguments"}]`` (None: the reference is text)."""
    images: list[str] | None = None
    """The row's images, in placeholder order (its prompt's messages carry them too); None: none."""

    @property
    def answered(self) -> bool:
        """Whether the row has a reference to score against: text, or a call."""
        return self.reference is not None or self.calls is not None


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
    label: str | None = None
    """The text the answer is scored against: the reference, or for a call the call's text
    as the template writes it."""
    calls: list[dict] | None = None
    """The calls parsed from the answer, for a row with tools."""

    def __post_init__(self):
        if self.label is None and self.example.calls is None:
            self.label = self.example.reference


def read_eval_data(path: str, *, fmt: str = "auto", columns: dict[str, str] | None = None,
                   limit: int | None = None) -> EvalData:
    """The rows of ``path`` to evaluate on (the first ``limit``); rows that cannot be read are
    counted with their reason. A row's images (paths relative to ``path``'s folder) are on the
    messages of their placeholders (:func:`~chattune.vision.images.images_on_messages`). Raises DataError for a file without
    one usable row."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {limit}")
    examples, unreadable, rows = [], [], 0
    for row in read_rows(path):
        if limit is not None and rows >= limit:
            break
        rows += 1
        try:
            record = to_record(row, fmt, columns, need_answer=False, base_dir=Path(path).parent)
        except RecordError as exc:
            unreadable.append(str(exc))
            continue
        messages, reference = split_prompt(images_on_messages(record.messages, record.images))
        if reference is not None and not reference.strip():
            reference = None  # an empty answer is no reference: scoring it would reward empty output
        examples.append(EvalExample(rows - 1, row.where, messages, reference, record.tools,
                                    reference_calls(record.messages), record.images or None))
    if not examples:
        why = f"{rows} rows, none readable (first: {unreadable[0]})" if unreadable else "no rows"
        raise DataError(f"{path}: nothing to evaluate: {why}; expected rows with a prompt (and a reference "
                        "answer to score), e.g. Alpaca instruction/input/output or --columns prompt=...,response=...")
    return EvalData(str(path), examples, rows, unreadable)


def usable_rows(run: LoadedRun, data: EvalData) -> EvalData:
    """``data`` as ``run`` can answer it: on a model that reads no images, rows with images are
    left out and counted with the unreadable rows, with the reason. Raises DataError when no
    row is left."""
    if getattr(run, "vision", None) is not None or not any(e.images for e in data.examples):
        return data
    kept = [e for e in data.examples if not e.images]
    left_out = [f"{e.source}: {NOT_VISION}" for e in data.examples if e.images]
    if not kept:
        raise DataError(f"{data.path}: nothing to evaluate: every usable row has images and the model reads none "
                        "(not a vision-language model); evaluate a vision-language run, or rows without images")
    return dataclasses.replace(data, examples=kept, unreadable=data.unreadable + left_out)


def answer_each(answer_fn, run: LoadedRun, conversations: list[list[dict]], profile: str | None,
                tools: list, **settings) -> list:
    """``answer_fn`` (:func:`chattune.inference.generate.answer`) on the conversations, in one
    batch; when a conversation's images cannot be used (:data:`IMAGE_ERRORS`), the conversations
    one by one instead, with that conversation's error in place of its sequence."""
    try:
        return answer_fn(run, conversations, profile, tools=tools, **settings)
    except IMAGE_ERRORS:  # (also a text row holding the image token): find the row, answer the rest
        pass
    answered: list = []
    for messages, offered in zip(conversations, tools, strict=True):
        try:
            answered += answer_fn(run, [messages], profile, tools=[offered], **settings)
        except IMAGE_ERRORS as exc:
            answered.append(exc)
    return answered


def reference_calls(messages: list[dict]) -> list[dict] | None:
    """The tool calls ``[{"name", "arguments"}]`` of a conversation's reference answer (its last
    message, the assistant's), or None when that answer is text (or there is none)."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or not last.get("tool_calls"):
        return None
    return [{"name": call["name"], "arguments": call.get("arguments", {})} for call in last["tool_calls"]]


def answer_calls(run: LoadedRun, profile: ServedModel, seq: Sequence,
                 tools: list[dict] | None) -> tuple[list[dict], list[str]]:
    """The tool calls in a decoded answer, read in the form the profile's template writes
    them (:func:`chattune.templates.tool_calls.parse_calls`): ``[{"name", "arguments"}]``, the arguments
    a JSON object, or the text the model wrote where they are not one; and what could not be
    read. A template whose calls need a special token kept (ChatGLM3's ``<|assistant|>``) has
    the answer decoded again with it."""
    text = seq.text.text
    kept = KEPT_TOKENS.get(profile.template)
    if kept:
        text = run.decode([i for i in seq.generated if i not in profile.stop_token_ids], keep=run.token_ids(kept))
    parsed = parse_calls(profile.template, text, tools)
    calls = [{"name": call.name, "arguments": json.loads(call.arguments) if call.valid else call.arguments}
             for call in parsed.calls]
    return calls, parsed.errors


def call_label(run: LoadedRun, profile: ServedModel, example: EvalExample) -> str:
    """A call reference as text: what the profile's template trains the model to write for the
    calls (and any text before them), without its end tokens."""
    message = {"role": "assistant", "content": example.reference or "", "tool_calls": example.calls}
    with run.tokenizer_lock:
        pieces = render(profile.template, example.messages + [message], run.tokenizer, example.tools)
    written = []
    for piece in reversed(pieces):  # the last answer: the trained pieces at the end
        if not piece.trained:
            break
        written.append(piece)
    return "".join(p.text for p in reversed(written) if p.role in CALL_ANSWER_ROLES).strip()


def score(text: str, label: str) -> dict[str, float]:
    """An answer's scores against its label: ROUGE-1/2/L, BLEU-4 and exact match (0-100)."""
    return {**similarity(text, label), "exact_match": exact_match(text, label)}


def generation_settings(max_new_tokens: int | None = None, **overrides) -> dict:
    """Sampling overrides for eval: greedy unless a temperature or do_sample is given."""
    settings = {k: v for k, v in overrides.items() if v is not None}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    if "temperature" not in settings:
        settings.setdefault("do_sample", False)
    return settings


def generate_rows(run: LoadedRun, profile: str, data: EvalData, *, batch_size: int = 8, log=print,
                  failed: list[tuple[EvalExample, str]] | None = None, **settings) -> list[RowResult]:
    """Answer every example (``batch_size`` rows per decoder batch) and score those with a reference.

    A row whose images cannot be used (:func:`answer_each`) is left out and, with ``failed``,
    appended to it with the reason; without ``failed`` its error is raised."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    results = []
    examples = data.examples
    chosen = run.profile(profile)
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        seqs = answer_each(answer, run, [e.messages for e in batch], profile, [e.tools for e in batch], **settings)
        for example, seq in zip(batch, seqs, strict=True):
            if isinstance(seq, ChattuneError):
                if failed is None:
                    raise seq
                failed.append((example, f"{example.source}: {seq}"))
                continue
            text = seq.text.text
            prompt = run.decode(seq.prompt_ids)
            label = call_label(run, chosen, example) if example.calls is not None else example.reference
            calls = answer_calls(run, chosen, seq, example.tools)[0] if example.tools or example.calls else None
            scores = None
            if label is not None:
                scores = score(text, label)
            if example.calls is not None:
                scores.update(call_scores(calls, example.calls))
            results.append(RowResult(example, prompt, text, len(seq.generated), scores, label, calls))
        log(f"generated {min(start + batch_size, len(examples))}/{len(examples)}")
    return results


def reference_rows(run: LoadedRun, served: ServedModel, data: EvalData, *, max_seq_length: int) -> list[dict]:
    """The answered rows encoded as training encodes them (``input_ids``, ``labels``, and a row
    with images its ``images``, expanded into the processor's image tokens; rows too long for
    ``max_seq_length``, rows whose images the model cannot read and text rows holding its image
    token left out, as training drops them)."""
    encoded = []
    options = EncodeOptions(max_seq_length=max_seq_length)
    vision = getattr(run, "vision", None)
    for example in data.examples:
        if not example.answered:
            continue
        last = {"role": "assistant", "content": example.reference or ""}
        if example.calls is not None:
            last["tool_calls"] = example.calls
        messages = [{k: v for k, v in m.items() if k != "images"} for m in example.messages] + [last]
        with run.tokenizer_lock:
            if example.images:
                record = Record(messages, example.source, example.tools, example.images)
                row = encode_image_record(record, served.template, run.encoder, options, vision)[0]
            else:
                row = stray_image_token(encode_conversation(messages, served.template, run.encoder, options,
                                                            tools=example.tools), vision)
        if row.dropped is None:
            encoded.append({"input_ids": row.input_ids, "labels": row.labels,
                            **({"images": example.images} if example.images else {})})
    return encoded


@torch.no_grad()
def reference_loss(run: LoadedRun, profile: ServedModel, data: EvalData, *, max_seq_length: int,
                   batch_size: int = 8) -> tuple[float | None, int]:
    """Teacher-forced loss of the references (mean over their supervised tokens, as training's
    eval loss) and the number of those tokens; (None, 0) when no row has a reference. The rows
    (with their images' pixels) are batched by training's collator and scored by training's loss
    (:class:`chattune.training.loss.CausalLMLoss`, chunked where exact, so memory does not grow
    with the vocabulary)."""
    from chattune.training.collate import ImageCollator, PadCollator
    from chattune.training.loss import auto_loss

    rows = reference_rows(run, profile, data, max_seq_length=max_seq_length)
    if not rows:
        return None, 0
    model = run.model
    vision = getattr(run, "vision", None)
    images = vision is not None and any("images" in row for row in rows)
    collate = ImageCollator(run.tokenizer.pad_token_id, vision) if images else PadCollator(run.tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with ActiveAdapter(run, profile.adapter):
            loss = auto_loss(model, model.get_input_embeddings().weight.shape[0])[0]
            for start in range(0, len(rows), batch_size):
                batch_total, count = loss.batch_sum(model, collate(rows[start:start + batch_size]))
                total += float(batch_total)
                tokens += int(count)
    finally:
        model.train(was_training)
    return (total / tokens if tokens else None), tokens


class ActiveAdapter:
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
    """The figures over all rows: metrics averaged over scored rows, mean answer length (tokens);
    with rows whose reference is a call, ``tool_name_match`` and ``tool_args_match`` averaged
    over those rows."""
    scored = [r.scores for r in results if r.scores is not None]
    figures = {name: None for name in SCORE_NAMES}
    figures.update(average([{name: s[name] for name in SCORE_NAMES} for s in scored]) if scored else {})
    called = [{name: s[name] for name in CALL_METRIC_NAMES} for s in scored if CALL_METRIC_NAMES[0] in s]
    if called:
        figures.update(average(called))
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
    ``eval.json`` figures (without ``compare``) and the rows. Rows the model cannot answer for
    their images (:func:`usable_rows`, :func:`generate_rows`) count as unreadable."""
    chosen = run.profile(profile)
    data = usable_rows(run, data)
    started = time.perf_counter()
    failed: list[tuple[EvalExample, str]] = []
    results = generate_rows(run, chosen.name, data, batch_size=batch_size, log=log, failed=failed, **settings)
    runtime = time.perf_counter() - started
    if failed:
        left_out = {id(example) for example, _ in failed}
        data = dataclasses.replace(data, examples=[e for e in data.examples if id(e) not in left_out],
                                   unreadable=data.unreadable + [reason for _, reason in failed])
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
                 "call_references": sum(r.example.calls is not None for r in results),
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
    worse or stayed the same (the call metrics over rows whose reference is a call), and the
    ``most`` rows whose ROUGE-L changed most."""
    names = SCORE_NAMES + (CALL_METRIC_NAMES if any(r.example.calls is not None for r in ours) else ())
    better = {m: 0 for m in names}
    worse = {m: 0 for m in names}
    same = {m: 0 for m in names}
    changes = []
    others = {row.example.index: row for row in theirs}  # a row one side could not answer is not compared
    for mine in ours:
        other = others.get(mine.example.index)
        if other is None or mine.scores is None or other.scores is None:
            continue
        for metric in names:
            if metric not in mine.scores:
                continue
            delta = mine.scores[metric] - other.scores[metric]
            (better if delta > 0 else worse if delta < 0 else same)[metric] += 1
        changes.append((mine.scores["rouge-l"] - other.scores["rouge-l"], mine, other))
    changes.sort(key=lambda item: (-abs(item[0]), item[1].example.index))
    changed = [{"index": mine.example.index, "prompt": mine.prompt, "label": mine.label,
                "predict": mine.predict, "other": other.predict, "delta": round(delta, 4), "metric": "rouge-l"}
               for delta, mine, other in changes[:most]]
    return {"name": name, "metrics": their_figures, "better": better, "worse": worse, "same": same,
            "changed_most": changed}


def write_eval(out_dir: str | Path, result: dict, results: list[RowResult],
               other: list[RowResult] | None = None) -> Path:
    """Write the eval files into ``out_dir`` (made if missing); returns it. ``eval.json`` is
    written last, so a folder without it is incomplete; a failed write (disk full) ends in a
    ConfigError naming the folder."""
    out = Path(out_dir)
    try:
        _write_eval_files(out, result, results, other)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (out / "eval.json").unlink(missing_ok=True)
        raise ConfigError(f"--out {out}: cannot write the eval files ({exc.strerror or exc}); "
                          "expected a writable folder with free space") from exc
    return out


def _write_eval_files(out: Path, result: dict, results: list[RowResult], other: list[RowResult] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "generated_predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in results:
            if row.scores is None:  # no reference: in eval_rows.jsonl only, as in the scores
                continue
            handle.write(json.dumps({"prompt": row.prompt, "predict": row.predict,
                                     "label": row.label or ""}, ensure_ascii=False) + "\n")
    figures = result["metrics"]
    predict_results = {f"predict_{name}": figures[name] for name in METRIC_NAMES + CALL_METRIC_NAMES
                       if figures.get(name) is not None}
    predict_results.update({"predict_runtime": result["runtime_s"],
                            "predict_samples_per_second": result["samples_per_second"]})
    (out / "predict_results.json").write_text(json.dumps(predict_results, indent=2) + "\n", encoding="utf-8")
    _write_rows(out / "eval_rows.jsonl", results)
    if other is not None:
        _write_rows(out / "compare_rows.jsonl", other)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def format_written(out: Path, result: dict) -> str:
    """What :func:`write_eval` wrote into ``out``, and where the rows without a reference are."""
    names = ["generated_predictions.jsonl", "predict_results.json", "eval_rows.jsonl"]
    if result.get("compare") is not None:
        names.append("compare_rows.jsonl")
    lines = [f"wrote {out}/eval.json, {', '.join(names)}"]
    missing = result["data"]["no_reference"]
    if missing:
        lines.append(f"{missing} row{'s' if missing != 1 else ''} without a reference: answered in "
                     f"{out}/eval_rows.jsonl (\"no_reference\": true), not scored and not in "
                     "generated_predictions.jsonl")
    return "\n".join(lines)


def _write_rows(path: Path, results: list[RowResult]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in results:
            line = {"index": row.example.index, "source": row.example.source, "prompt": row.prompt,
                    "label": row.label, "predict": row.predict, "tokens": row.tokens,
                    "no_reference": row.scores is None, "scores": row.scores}
            if row.calls is not None:  # a row with tools: the answer's calls, and the reference's
                line.update({"calls": row.calls, "reference_calls": row.example.calls})
            if row.example.images:  # data: URLs by their start and length
                line["images"] = [describe(ref) for ref in row.example.images]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_eval(result: dict) -> str:
    """The figures as a table; with a comparison, both sides and the row counts, then the rows
    that changed most."""
    figures, other = result["metrics"], result.get("compare")
    data = result["data"]
    lines = [f"{data['rows']} rows: {data['scored']} scored, {data['no_reference']} without a reference"
             + (f", {data['unreadable']} unreadable" if data.get("unreadable") else "")
             + (f", {data['call_references']} with a call as reference" if data.get("call_references") else "")
             + f"; {result['runtime_s']:.1f} s ({result['samples_per_second']} rows/s)"]
    name = result["run"]["name"]
    shown = SCORE_NAMES + tuple(m for m in CALL_METRIC_NAMES if m in figures) + FIGURES[len(SCORE_NAMES):]
    w = max(14, max(len(m) for m in shown) + 1)
    if other is None:
        lines.append(f"{'metric':<{w}}{name:>12}")
        lines += [f"{m:<{w}}{_number(figures.get(m)):>12}" for m in shown]
        return "\n".join(lines)
    lines.append(f"{'metric':<{w}}{other['name']:>12}{name:>12}   better / worse / same (rows)")
    for metric in shown:
        counts = (f"   {other['better'][metric]:>6} / {other['worse'][metric]:>5} / {other['same'][metric]:>4}"
                  if metric in other["better"] else "")
        lines.append(f"{metric:<{w}}{_number(other['metrics'].get(metric)):>12}{_number(figures.get(metric)):>12}"
                     f"{counts}")
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
    in place (a run that replaced or prefixed the base, or whose rows cannot pick their adapter
    in a batch, :func:`_rows_pick_adapters`: load the base on its own)."""
    chosen = run.profile(profile)
    if not run.uses_adapters or not _rows_pick_adapters(run):
        return None
    base = dataclasses.replace(chosen, name="base", adapter=BASE_ADAPTER, run_dir=None, manifest=None)
    return dataclasses.replace(run, profiles={**run.profiles, "base": base})


def _rows_pick_adapters(run: LoadedRun) -> bool:
    """Whether each row of a batch can pick its adapter (or none): peft's ``adapter_names``
    works on the trained layers' rows, but not through a module trained in full
    (``modules_to_save``) that is not a Linear, Embedding or Conv layer, nor through a vision-language
    model's projector or tower, whose inputs are the images, not the rows."""
    from peft.utils.other import ModulesToSaveWrapper

    supported = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    saved = [m for m in run.model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if saved and getattr(run, "vision", None) is not None:
        return False
    return all(isinstance(m.original_module, supported) for m in saved)


def default_out_dir(run_dir: str | Path, data_path: str) -> Path:
    """``RUN/eval/<data file name without suffix>``; for a model file (``model.gguf``),
    ``model-eval/<data file name without suffix>`` beside it."""
    run = Path(run_dir)
    if run.is_file():
        return run.parent / f"{run.stem}-eval" / Path(data_path).stem
    return run / "eval" / Path(data_path).stem


def sample_rows(dataset, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """A fixed sample (same ``seed``, same rows) of ``count`` encoded rows as (prompt ids,
    reference ids): a row's last supervised span is the reference, all before it the prompt;
    rows supervised from their first token (nothing to prompt with), and rows with images, are left out."""
    import random

    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    samples = []
    images = "images" in (getattr(dataset, "column_names", None) or [])
    for index in order:
        if images and dataset[index]["images"]:
            continue  # its prompt needs its pixels
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
    """Greedy answers to ``samples`` (built and decoded as every batch is,
    :func:`chattune.inference.generate.sequence` and :func:`chattune.inference.generate.decode`)
    scored against their references as ``chattune eval`` scores them (:func:`score`): the averaged
    ROUGE-1/2/L, BLEU-4 and exact match, and the mean answer length in tokens. For
    ``eval_generate`` during training."""
    from chattune.inference.generate import decode, sequence
    from chattune.inference.runs import in_memory_run
    from chattune.inference.sampling import SamplingParams

    run = in_memory_run(model, tokenizer, template)
    served = run.profile()
    was_training = model.training
    model.eval()
    rows, lengths = [], []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            seqs = decode(run, [sequence(run, served, prompt, SamplingParams(max_tokens=max_new_tokens))
                                for prompt, _ in batch])
            for seq, (_, reference_ids) in zip(seqs, batch, strict=True):
                reference = run.decode([i for i in reference_ids if i not in served.stop_token_ids]).strip()
                rows.append(score(seq.text.text, reference))
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
    from chattune.inference.runs import LoadOptions, load_run

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
