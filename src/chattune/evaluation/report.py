"""``chattune report RUN``: one self-contained HTML page about a run folder.

:func:`write_report` reads what training and evaluation left in a run folder and writes
``RUN/report.html`` (or ``out``), a single file that opens in a browser with no server and
no network: the plots are PNGs embedded as ``data:`` URIs, the CSS is inline, there is no
script and no URL (a ``://`` in the run's own text, a prompt or a path, is written as
``&#58;//``, which a browser shows the same). The PNGs are also written beside it, in
``RUN/report/<plot>.png``.

The page holds:

1. the training curves from ``metrics.jsonl`` (:data:`PLOTS`; :func:`plot_series` gives the
   exact points each plot is drawn from, :func:`make_figure` draws them);
2. the data audit ``data_audit.json`` as tables;
3. the manifest ``chattune.json`` (method, base model, template, global step, trainable
   parameters) and the resolved config ``chattune.yaml``;
4. each evaluation ``eval/<name>/eval.json``: its metrics, the comparison with another run
   when it holds one, and the first generations of ``eval/<name>/eval_rows.jsonl``.

A missing or unreadable file gives a line in the page saying so; only a ``RUN`` that is
not a run folder (no ``chattune.json``) is an error. matplotlib is imported on the first
drawing, never by ``import chattune``, and is used through its object API on the Agg
canvas: no pyplot, no global backend switch, no display needed.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from pathlib import Path

from chattune.errors import ChattuneError, ManifestError

MANIFEST_NAME = "chattune.json"
CONFIG_NAME = "chattune.yaml"
METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"
EVAL_DIR = "eval"
EVAL_NAME = "eval.json"
EVAL_ROWS_NAME = "eval_rows.jsonl"
SAMPLE_ROWS = 10

PLOTS: dict[str, str] = {
    "loss": "Loss (train and eval)",
    "learning_rate": "Learning rate",
    "grad_norm": "Gradient norm",
    "tokens_per_second": "Throughput (tokens/s)",
    "eval_metrics": "Eval generation metrics",
    "eval_other": "Other eval metrics",
}
"""Plot name -> title, in page order. ``eval_other`` holds the ``eval_*`` quantities on
another scale than the scores (perplexity, answer length, token counts); it is left out of
the page silently when empty, the others say they had nothing to draw."""

Y_LABELS = {"loss": "loss", "learning_rate": "learning rate", "grad_norm": "gradient norm",
            "tokens_per_second": "tokens / s", "eval_metrics": "score", "eval_other": "value"}
EVAL_NOT_PLOTTED = frozenset({"eval_loss", "eval_runtime", "eval_samples_per_second",
                              "eval_steps_per_second", "eval_model_preparation_time"})
SCORE_ORDER = ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4", "eval_exact_match")
OTHER_SCALE_WORDS = ("perplexity", "length", "tokens")
METRIC_ORDER = ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match", "answer_length",
                "eval_loss", "perplexity", "eval_tokens")
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})
NEUTRAL = frozenset({"answer_length", "eval_tokens"})

Series = dict[str, tuple[list[float], list[float]]]


# --------------------------------------------------------------------------- plot data


def _number(value) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN and inf are not points)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plot_of(key: str) -> str | None:
    """Which plot a metrics.jsonl key is drawn on, or None."""
    if key in ("loss", "eval_loss"):
        return "loss"
    if key in ("learning_rate", "grad_norm", "tokens_per_second"):
        return key
    if key.startswith("eval_") and key not in EVAL_NOT_PLOTTED:
        if any(word in key for word in OTHER_SCALE_WORDS):
            return "eval_other"
        return "eval_metrics"
    return None


def _series_order(name: str, key: str) -> tuple:
    if name == "loss":
        return (0 if key == "loss" else 1, key)
    if key in SCORE_ORDER:
        return (0, SCORE_ORDER.index(key), key)
    return (1, 0, key)


def plot_series(metrics_rows: list[dict]) -> dict[str, Series]:
    """For each plot of :data:`PLOTS` (all of them, in order), each series' ``(steps, values)``.

    A series is named by its metrics.jsonl key (``loss``, ``eval_loss``, ``learning_rate``,
    ``grad_norm``, ``tokens_per_second``, ``eval_rouge-1``, ...) and holds the rows that have
    a numeric ``step`` and a finite number under that key, sorted by step; where a step
    appears twice (a run resumed from an earlier checkpoint logs its steps again) the later
    row wins. A plot with nothing to draw maps to ``{}``; a series is never empty.
    """
    points: dict[str, dict[str, dict[float, float]]] = {name: {} for name in PLOTS}
    for row in metrics_rows:
        if not isinstance(row, dict):
            continue
        step = _number(row.get("step"))
        if step is None:
            continue
        for key, raw in row.items():
            name = _plot_of(key)
            value = _number(raw)
            if name is None or value is None:
                continue
            points[name].setdefault(key, {})[step] = value
    result: dict[str, Series] = {}
    for name, by_key in points.items():
        result[name] = {}
        for key in sorted(by_key, key=lambda k: _series_order(name, k)):
            steps = sorted(by_key[key])
            result[name][key] = (steps, [by_key[key][s] for s in steps])
    return result


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a metrics.jsonl, and how many non-empty lines were not one
    (a line cut short by a crash, say)."""
    rows, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


# --------------------------------------------------------------------------- drawing


def _series_label(key: str) -> str:
    if key == "loss":
        return "train loss"
    if key == "eval_loss":
        return "eval loss"
    if key.startswith("eval_"):
        return key[len("eval_"):]
    return key.replace("_", " ")


def make_figure(name: str, series: Series):
    """The matplotlib Figure of plot ``name`` drawing exactly ``series``: one line per series,
    x = steps, y = values, in order, on one axes (``eval_other``, whose quantities have
    nothing in common but the step, gets one axes per series). The loss goes on a log scale
    when it spans more than a factor of 5."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [{key: value} for key, value in series.items()] if name == "eval_other" else [series]
    width = 6.4 if len(panels) == 1 else min(4.2 * len(panels), 12.8)
    figure = Figure(figsize=(width, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        _draw(axes, name, panel)
        if len(panels) > 1:
            axes.set_title(_series_label(next(iter(panel))), fontsize=10)
            axes.set_ylabel("")
    if len(panels) > 1:
        figure.suptitle(PLOTS.get(name, name), fontsize=11)
    return figure


def _draw(axes, name: str, series: Series) -> None:
    from matplotlib import ticker

    for key, (steps, values) in series.items():
        many = len(steps) > 60
        axes.plot(steps, values, label=_series_label(key), linewidth=1.3 if many else 1.6,
                  marker=None if many else "o", markersize=3.5,
                  linestyle="--" if key == "eval_loss" else "-")
    axes.set_title(PLOTS.get(name, name), fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(Y_LABELS.get(name, name))
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    values = [v for _, ys in series.values() for v in ys]
    if name == "loss" and values and min(values) > 0 and max(values) / min(values) > 5:
        axes.set_yscale("log")
        decades = math.log10(max(values) / min(values))
        subs = (1, 1.5, 2, 3, 4, 5, 6, 8) if decades < 1.5 else (1, 2, 5) if decades < 3 else (1,)
        axes.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    elif name == "learning_rate":
        formatter = ticker.ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-3, 3))
        axes.yaxis.set_major_formatter(formatter)
    elif name == "tokens_per_second":
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    else:
        axes.ticklabel_format(axis="y", useOffset=False, style="plain")
    if name in ("learning_rate", "tokens_per_second") and values and min(values) >= 0:
        axes.set_ylim(bottom=0)
    if len(series) > 2:
        axes.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    elif len(series) > 1:
        axes.legend(fontsize=9, loc="best", frameon=True, framealpha=0.85)


def figure_png(figure) -> bytes:
    """The figure as PNG bytes, without the ``Software`` metadata (it carries a URL)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------- html helpers


def _e(value) -> str:
    """HTML-escaped text in which no ``scheme://`` survives literally (the page holds no URL)."""
    return html.escape(str(value)).replace("://", "&#58;//")


def _fmt(value) -> str:
    """A value for a table cell: ints with thousands separators, floats to 4 significant
    digits, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) >= 1000:
            return f"{value:,.1f}" if abs(value) < 1e4 else f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        if not value:
            return "—"
        return f"<code>{_e(json.dumps(value, ensure_ascii=False))}</code>"
    return _e(value)


def _cell(value) -> str:
    cls = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"<td{cls}>{_fmt(value)}</td>"


def _kv_table(pairs, cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f'<table class="{cls}">{rows}</table>'


def _columns_table(columns: dict[str, dict], first: str = "") -> str:
    """Rows = the union of the columns' (flattened) keys, one column per entry."""
    flat = {name: _flatten(values) for name, values in columns.items()}
    keys: list[str] = []
    for values in flat.values():
        keys += [k for k in values if k not in keys]
    head = f"<tr><th>{_e(first)}</th>" + "".join(f"<th>{_e(n)}</th>" for n in flat) + "</tr>"
    body = "".join(f"<tr><th>{_e(k)}</th>" + "".join(_cell(flat[n].get(k)) for n in flat) + "</tr>"
                   for k in keys)
    return f'<table class="grid">{head}{body}</table>'


def _records_table(records: list[dict]) -> str:
    """One row per record, one column per (flattened) key."""
    flat = [_flatten(r) for r in records]
    keys: list[str] = []
    for values in flat:
        keys += [k for k in values if k not in keys]
    head = "<tr>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + "</tr>"
    body = "".join("<tr>" + "".join(_cell(values.get(k)) for k in keys) + "</tr>" for values in flat)
    return f'<table class="grid">{head}{body}</table>'


def _flatten(values: dict, prefix: str = "") -> dict:
    """``{"length": {"p50": 3}}`` -> ``{"length.p50": 3}``; an empty dict stays one cell."""
    out: dict = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()) \
                and len(value) <= 8:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{_e(text)}</p>'


def _read_json(path: Path):
    """(data, None) or (None, why it could not be read)."""
    if not path.is_file():
        return None, f"{path.name} not found in the run folder"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} could not be read: {exc}"


# --------------------------------------------------------------------------- sections


def _summary_section(manifest: dict) -> str:
    method = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    base = manifest.get("base_model") if isinstance(manifest.get("base_model"), dict) else {}
    template = manifest.get("template") if isinstance(manifest.get("template"), dict) else {}
    settings = ", ".join(f"{k} {_fmt(v)}" for k, v in method.items()
                         if k != "name" and v not in (None, False, [], {}))
    method_text = _e(method.get("name", "—")) + (f" <span class=dim>({settings})</span>" if settings else "")
    cards = [("method", method_text), ("global step", _fmt(manifest.get("global_step"))),
             ("trainable parameters", _fmt(manifest.get("trainable_parameters"))),
             ("train loss", _fmt(manifest.get("train_loss"))), ("eval loss", _fmt(manifest.get("eval_loss")))]
    card_html = "".join(f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{v}</div></div>'
                        for k, v in cards)
    rows = [
        ("base model", base.get("path")),
        ("model type", base.get("model_type")),
        (("converted from GGUF at" if base.get("gguf_sha256") else "converted from THUDM format at"),
         base.get("native_path")) if base.get("native_path") else None,
        ("GGUF file", f"{base.get('gguf_file_type')}, sha256 {base['gguf_sha256']}") if base.get("gguf_sha256") else None,
        ("template", template.get("name")),
        ("template source", template.get("source")),
        ("max sequence length", manifest.get("max_seq_length")),
        ("data fingerprint", manifest.get("data_fingerprint")),
        ("generation defaults", manifest.get("generation")),
        ("chattune version", manifest.get("chattune_version")),
    ]
    return f'<div class="cards">{card_html}</div>' + _kv_table([r for r in rows if r is not None])


def _curves_section(run: Path, png_dir: Path) -> tuple[str, dict[str, bytes]]:
    """The plots' HTML and the PNGs drawn, by plot name."""
    path = run / METRICS_NAME
    if not path.is_file():
        return _note(f"no training curves: {METRICS_NAME} not found in the run folder "
                     "(it is written while chattune trains)", "missing"), {}
    try:
        rows, bad = read_metrics(path)
    except OSError as exc:
        return _note(f"no training curves: {METRICS_NAME} could not be read: {exc}", "missing"), {}
    series = plot_series(rows)
    parts, pngs = [], {}
    if bad:
        parts.append(_note(f"{bad} line(s) of {METRICS_NAME} were not JSON objects and were skipped"))
    infinite = [(key, row.get("step")) for row in rows for key, value in row.items()
                if _plot_of(key) and isinstance(value, float) and not math.isfinite(value)]
    if infinite:
        key, step = infinite[0]
        parts.append(_note(f"{len(infinite)} NaN or infinite value(s) not drawn, the first: {key} at "
                           f"step {step} (a diverged run; see the end of the curves)", "missing"))
    figures, skipped = [], []
    for name, title in PLOTS.items():
        if not series[name]:
            if name != "eval_other":
                skipped.append(title)
            continue
        figure = make_figure(name, series[name])
        pngs[name] = png = figure_png(figure)
        data = base64.b64encode(png).decode("ascii")
        points = sum(len(steps) for steps, _ in series[name].values())
        figures.append(f'<figure id="plot-{name}"><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_e(title)}: {points} point(s); <code>{_e(png_dir.name)}/{name}.png"
                       "</code></figcaption></figure>")
    if figures:
        parts.append('<div class="plots">' + "".join(figures) + "</div>")
    for title in skipped:
        parts.append(_note(f"{title}: not plotted, {METRICS_NAME} holds no values for it"))
    return "".join(parts), pngs


def _audit_section(run: Path) -> str:
    audit, why = _read_json(run / AUDIT_NAME)
    if audit is None:
        return _note(f"no data audit: {why} (chattune writes it when it prepares the data)", "missing")
    if not isinstance(audit, dict):
        return _note(f"no data audit: {AUDIT_NAME} is not a JSON object", "missing")
    parts, done = [], set()
    scalars = [(k, v) for k, v in audit.items() if not isinstance(v, (dict, list))]
    done.update(k for k, _ in scalars)
    if scalars:
        parts.append(_kv_table(scalars))
    files = [dict(role="train", **f) for f in audit.get("files") or [] if isinstance(f, dict)]
    files += [dict(role="eval", **f) for f in audit.get("eval_files") or [] if isinstance(f, dict)]
    done.update(("files", "eval_files"))
    if files:
        parts.append("<h3>Files read</h3>" + _records_table(files))
    splits = {k: audit[k] for k in ("train", "eval") if isinstance(audit.get(k), dict)}
    done.update(splits)
    if splits:
        parts.append("<h3>Rows and tokens</h3>" + _columns_table(splits))
    batching = audit.get("batching")
    if isinstance(batching, dict):
        done.add("batching")
        parts.append("<h3>Batching</h3>")
        plain = [(k, v) for k, v in batching.items() if not isinstance(v, dict)]
        if plain:
            parts.append(_kv_table(plain))
        sides = {k: v for k, v in batching.items() if isinstance(v, dict)}
        if sides:
            parts.append(_columns_table(sides))
    rest = [(k, v) for k, v in audit.items() if k not in done]
    if rest:
        parts.append("<h3>Other</h3>" + _kv_table(rest))
    return "".join(parts)


def _config_section(run: Path) -> str:
    path = run / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return _note(f"no resolved config: {CONFIG_NAME} not found in the run folder", "missing")
    return f"<details open><summary>{_e(CONFIG_NAME)}</summary><pre>{_e(text)}</pre></details>"


def _ordered_metrics(*dicts: dict) -> list[str]:
    keys = [k for k in METRIC_ORDER if any(k in d for d in dicts)]
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys


def _delta_class(metric: str, delta: float | None) -> str:
    if delta is None or delta == 0 or metric in NEUTRAL:
        return ""
    good = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
    return ' class="num good"' if good else ' class="num bad"'


def _signed(value) -> str:
    number = _number(value)
    return _fmt(value) if number is None else ("+" if number > 0 else "") + _fmt(number)


def _compare_table(ours: dict, compare: dict) -> str:
    other = compare.get("name") or "other"
    theirs = compare.get("metrics") if isinstance(compare.get("metrics"), dict) else {}
    counts = {k: compare.get(k) if isinstance(compare.get(k), dict) else {} for k in ("better", "worse", "same")}
    keys = _ordered_metrics(ours, theirs, *counts.values())
    head = (f"<tr><th>metric</th><th>this run</th><th>{_e(other)}</th><th>difference</th>"
            "<th>rows better</th><th>rows worse</th><th>rows same</th></tr>")
    body = []
    for key in keys:
        a, b = _number(ours.get(key)), _number(theirs.get(key))
        delta = a - b if a is not None and b is not None else None
        body.append(f"<tr><th>{_e(key)}</th>{_cell(ours.get(key))}{_cell(theirs.get(key))}"
                    f"<td{_delta_class(key, delta) or ' class=num'}>{_signed(delta)}</td>"
                    + "".join(_cell(counts[c].get(key)) for c in ("better", "worse", "same")) + "</tr>")
    return (f"<h4>Compared with {_e(other)}</h4>"
            f'<p class="dim">rows better / worse / same: per row, this run\'s score against {_e(other)}\'s.</p>'
            f'<table class="grid">{head}{"".join(body)}</table>')


def _text_cell(value, missing: str = "—") -> str:
    if value is None:
        return f'<td class="dim">{_e(missing)}</td>'
    return f'<td><div class="text">{_e(value)}</div></td>'


def _scores_cell(scores) -> str:
    if not isinstance(scores, dict) or not scores:
        return '<td class="dim">—</td>'
    return "<td>" + "<br>".join(f"{_e(k)} {_fmt(v)}" for k, v in scores.items()) + "</td>"


def _changed_most(rows: list, other: str) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return ""
    head = (f"<tr><th>#</th><th>metric</th><th>difference</th><th>prompt</th><th>label</th>"
            f"<th>this run</th><th>{_e(other)}</th></tr>")
    body = "".join(
        f"<tr>{_cell(r.get('index'))}<td>{_e(r.get('metric', '—'))}</td><td class=num>{_signed(r.get('delta'))}</td>"
        f"{_text_cell(r.get('prompt'))}{_text_cell(r.get('label'), 'no reference')}"
        f"{_text_cell(r.get('predict'))}{_text_cell(r.get('other'))}</tr>" for r in rows)
    return f"<h4>Rows that changed most</h4><table class=\"grid rows\">{head}{body}</table>"


def _sample_rows(path: Path) -> str:
    if not path.is_file():
        return _note(f"no generations: {EVAL_ROWS_NAME} not found beside {EVAL_NAME}", "missing")
    rows, total, bad = [], 0, 0
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                total += 1
                if len(rows) < SAMPLE_ROWS:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None
                    if isinstance(row, dict):
                        rows.append(row)
                    else:
                        bad += 1
    except OSError as exc:
        return _note(f"no generations: {EVAL_ROWS_NAME} could not be read: {exc}", "missing")
    if not rows:
        return _note(f"no generations: {EVAL_ROWS_NAME} holds no rows", "missing")
    head = "<tr><th>#</th><th>prompt</th><th>label</th><th>prediction</th><th>scores</th></tr>"
    body = []
    for position, row in enumerate(rows):
        no_reference = bool(row.get("no_reference")) or row.get("label") is None
        label = ('<td class="dim"><span class="badge">no reference</span> (not scored)</td>' if no_reference
                 else _text_cell(row.get("label")))
        body.append(f"<tr>{_cell(row.get('index', position))}{_text_cell(row.get('prompt'))}{label}"
                    f"{_text_cell(row.get('predict'))}{_scores_cell(row.get('scores'))}</tr>")
    shown = f"first {len(rows)} of {total:,} rows" + (f"; {bad} unreadable line(s) skipped" if bad else "")
    return (f"<h4>Sample generations</h4><p class=\"dim\">{_e(shown)} of {_e(EVAL_ROWS_NAME)}</p>"
            f'<table class="grid rows">{head}{"".join(body)}</table>')


def _part(data: dict, key: str) -> dict:
    """``data[key]`` when it is a dict, else ``{}`` (the eval.json schema may lack a part)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _one_eval(name: str, folder: Path) -> str:
    data, why = _read_json(folder / EVAL_NAME)
    parts = [f'<h3 id="eval-{_e(name)}">{_e(name)}</h3>']
    if not isinstance(data, dict):
        parts.append(_note(f"{EVAL_DIR}/{name}/{EVAL_NAME}: " + (why or "not a JSON object"), "missing"))
        return "".join(parts)
    info, generation, metrics = _part(data, "data"), _part(data, "generation"), _part(data, "metrics")
    facts = [("data", info.get("path")), ("rows", info.get("rows")), ("scored", info.get("scored")),
             ("without a reference", info.get("no_reference")),
             ("max new tokens", generation.get("max_new_tokens")), ("sampling", generation.get("do_sample")),
             ("runtime (s)", data.get("runtime_s")), ("samples / s", data.get("samples_per_second"))]
    run_info = _part(data, "run")
    if run_info.get("global_step") is not None:
        facts.insert(0, ("at global step", run_info.get("global_step")))
    parts.append(_kv_table([(k, v) for k, v in facts if v is not None]))
    if metrics:
        keys = _ordered_metrics(metrics)
        parts.append('<h4>Metrics</h4><table class="grid"><tr><th>metric</th><th>value</th></tr>'
                     + "".join(f"<tr><th>{_e(k)}</th>{_cell(metrics[k])}</tr>" for k in keys) + "</table>")
    else:
        parts.append(_note(f"{EVAL_NAME} holds no metrics", "missing"))
    compare = data.get("compare")
    if isinstance(compare, dict):
        parts.append(_compare_table(metrics, compare))
        changed = compare.get("changed_most")
        if isinstance(changed, list):
            parts.append(_changed_most(changed, compare.get("name") or "other"))
    parts.append(_sample_rows(folder / EVAL_ROWS_NAME))
    return "".join(parts)


def _eval_section(run: Path, run_arg: str) -> str:
    root = run / EVAL_DIR
    folders = sorted(p for p in root.iterdir() if (p / EVAL_NAME).is_file()) if root.is_dir() else []
    if not folders:
        return _note(f"no evaluation yet: chattune eval {run_arg} --data F", "missing")
    return "".join(_one_eval(folder.name, folder) for folder in folders)


# --------------------------------------------------------------------------- page

CSS = """
:root { --fg: #1d2430; --dim: #5f6b7a; --line: #d8dee6; --bg: #f6f8fa; --accent: #2f6fd0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "PingFang SC",
       "Microsoft YaHei", sans-serif; color: var(--fg); margin: 0 auto; padding: 24px 32px 64px;
       max-width: 1500px; }
h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 18px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 18px 0 6px; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.dim { color: var(--dim); }
.note { color: var(--dim); font-style: italic; margin: 6px 0; }
.missing { background: #fff8e1; border-left: 4px solid #e0a800; padding: 8px 12px; margin: 8px 0; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.good { color: #137333; } td.bad { color: #b3261e; }
table.kv th { min-width: 180px; }
table.rows { width: 100%; table-layout: fixed; }
table.rows th:first-child { width: 48px; }
.text { white-space: pre-wrap; word-break: break-word; max-height: 14em; overflow: auto; }
code { font-size: 12px; word-break: break-all; }
pre { background: var(--bg); border: 1px solid var(--line); padding: 10px 12px; font-size: 12px;
      max-height: 480px; overflow: auto; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 14px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .label { color: var(--dim); font-size: 12px; }
.card .value { font-size: 17px; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--dim); font-size: 12px; padding: 2px 4px; }
.badge { background: #eceff3; border-radius: 4px; padding: 1px 6px; font-size: 12px; }
"""


def _read_manifest(run: Path) -> dict:
    if not run.is_dir():
        raise ManifestError(f"{run}: no such run folder (expected a folder holding {MANIFEST_NAME})")
    path = run / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{run}: no {MANIFEST_NAME}; not a chattune run folder "
                            "(expected the output_dir of chattune train, or one of its checkpoints)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); expected a chattune manifest") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object (a chattune manifest), found {type(data).__name__}")
    return data


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report, one self-contained HTML file, and return its path.

    ``out`` defaults to ``RUN/report.html``; the plots are also written as PNGs in the folder
    named like ``out`` without its suffix (``RUN/report/<plot>.png``). Raises
    :class:`~chattune.errors.ManifestError` when ``run_dir`` is not a run folder, and
    :class:`~chattune.errors.ChattuneError` when the report cannot be written.
    """
    run_arg = str(run_dir)
    run = Path(run_dir)
    manifest = _read_manifest(run)
    out = Path(out) if out is not None else run / "report.html"
    if out.is_dir():
        out = out / "report.html"
    png_dir = out.with_suffix("") if out.suffix else out.with_name(out.name + "_plots")

    curves, pngs = _curves_section(run, png_dir)
    sections = [
        ("summary", "Run", _summary_section(manifest)),
        ("curves", "Training curves", curves),
        ("audit", "Data audit", _audit_section(run)),
        ("eval", "Evaluation", _eval_section(run, run_arg)),
        ("config", "Resolved config", _config_section(run)),
    ]
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{content}</section>'
                   for key, title, content in sections)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>chattune report: {_e(run.resolve().name)}</title><style>{CSS}</style></head><body>"
        f"<h1>chattune report: {_e(run.resolve().name)}</h1>"
        f"<p class=\"dim\">{_e(run.resolve())} · written {_e(created)} by chattune "
        f"{_e(manifest.get('chattune_version', ''))}</p><nav>{nav}</nav>{body}</body></html>\n"
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if pngs or png_dir.is_dir():
            png_dir.mkdir(parents=True, exist_ok=True)
            for name in PLOTS:
                stale = png_dir / f"{name}.png"
                if name not in pngs and stale.is_file():
                    stale.unlink()
            for name, png in pngs.items():
                _write(png_dir / f"{name}.png", png)
        _write(out, page.encode("utf-8"))
    except OSError as exc:
        raise ChattuneError(f"{out}: cannot write the report: {exc.strerror or exc}") from exc
    return out
