"""chattune report: one self-contained HTML page about a real (tiny) run folder, its plots
drawn from exactly what metrics.jsonl holds, and clear lines for what the run lacks."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from chattune.errors import ChattuneError, ManifestError
from chattune.evaluation.report import PLOTS, figure_png, make_figure, plot_series, write_report
from chattune.training.recipe import train
from tests.training.test_recipe import make_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENERATION_KEYS = ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4", "eval_exact_match")

EVAL = {
    "run": {"path": "RUN", "method": "lora", "global_step": 8, "template": "tokenizer", "base_model": {}},
    "data": {"path": "/data/dev.json", "rows": 12, "scored": 11, "no_reference": 1},
    "generation": {"max_new_tokens": 12, "do_sample": False},
    "metrics": {"rouge-1": 41.25, "rouge-2": 17.5, "rouge-l": 38.75, "bleu-4": 12.5,
                "exact_match": 9.375, "answer_length": 23.5, "eval_loss": 2.375, "perplexity": 10.75,
                "eval_tokens": 3210},
    "runtime_s": 3.5, "samples_per_second": 3.4375,
    "compare": {
        "name": "base",
        "metrics": {"rouge-1": 20.5, "rouge-2": 6.25, "rouge-l": 18.5, "bleu-4": 4.5, "exact_match": 0.0,
                    "answer_length": 40.25, "eval_loss": 3.125, "perplexity": 22.75, "eval_tokens": 3210},
        "better": {"rouge-1": 7, "rouge-2": 6, "rouge-l": 7, "bleu-4": 5, "exact_match": 1},
        "worse": {"rouge-1": 3, "rouge-2": 2, "rouge-l": 3, "bleu-4": 4, "exact_match": 0},
        "same": {"rouge-1": 1, "rouge-2": 3, "rouge-l": 1, "bleu-4": 2, "exact_match": 10},
        "changed_most": [{"index": 4, "prompt": "Who made you?", "label": "The chattune team.",
                          "predict": "The chattune team.", "other": "I am a large model by someone else.",
                          "delta": 87.5, "metric": "rouge-l"}],
    },
}


def eval_rows() -> list[dict]:
    rows = []
    for index in range(12):
        if index == 2:
            rows.append({"index": index, "prompt": "Say anything <b>bold</b> https://example.com",
                         "label": None, "predict": "anything", "no_reference": True, "scores": None})
        else:
            rows.append({"index": index, "prompt": f"prompt number {index}", "label": f"label {index}",
                         "predict": f"answer {index}", "no_reference": False,
                         "scores": {"rouge-1": 50.0, "rouge-2": 25.0, "rouge-l": 50.0, "bleu-4": 10.0,
                                    "exact_match": 0.0}})
    return rows


def write_eval(run: Path, name: str = "dev") -> Path:
    folder = run / "eval" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(EVAL))
    (folder / "eval_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows()))
    return folder


@pytest.fixture(scope="module")
def trained(tiny_models, data_file, tmp_path_factory) -> Path:
    """A tiny glm4 run (8 steps, eval every 4, logging every 2) with a fake evaluation."""
    out = tmp_path_factory.mktemp("report-run") / "run"
    train(make_config(tiny_models("glm4"), data_file, out), log=lambda *_: None)
    write_eval(out)
    return out


@pytest.fixture(scope="module")
def report(trained) -> tuple[Path, str]:
    path = write_report(trained)
    return path, path.read_text(encoding="utf-8")


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(float(r["step"]), float(r[key])) for r in rows if key in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def test_the_page_is_self_contained(report, trained):
    path, page = report
    assert path == trained / "report.html"
    assert page.startswith("<!DOCTYPE html>")
    for forbidden in ("http://", "https://", 'src="http', "<script", "<link", "@import", "url("):
        assert forbidden not in page.lower(), forbidden
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(images) == 4, "loss, learning rate, grad norm, tokens/s (no generation metrics logged)"
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_plot_series_are_what_metrics_jsonl_holds(trained):
    rows = metrics_rows(trained)
    series = plot_series(rows)
    assert list(series) == list(PLOTS)
    assert series["loss"] == {"loss": points(rows, "loss"), "eval_loss": points(rows, "eval_loss")}
    assert len(series["loss"]["loss"][0]) == 4 and series["loss"]["eval_loss"][0] == [4.0, 8.0]
    for key in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert series[key] == {key: points(rows, key)}
        assert series[key][key][0] == [2.0, 4.0, 6.0, 8.0]
    # this run logs no generation metrics: the plot is empty, and the page says so
    assert series["eval_metrics"] == {} and series["eval_other"] == {}


def test_generation_metrics_and_resumed_steps():
    rows = [
        {"step": 2, "loss": 3.0, "learning_rate": 1e-4, "grad_norm": 1.5},
        {"step": 4, "loss": 2.5, "learning_rate": 5e-5},
        {"step": 4, "eval_loss": 2.75, "eval_runtime": 1.0, "eval_samples_per_second": 9.0,
         "eval_steps_per_second": 3.0, "eval_rouge-1": 20.0, "eval_rouge-2": 5.0, "eval_rouge-l": 18.0,
         "eval_bleu-4": 4.0, "eval_exact_match": 0.0, "eval_perplexity": 15.6},
        {"step": 4, "loss": 2.25},  # resumed from checkpoint-2: the later row wins
        {"step": 6, "loss": float("nan"), "grad_norm": "n/a"},
        {"loss": 1.0},  # no step: not a point
        {"step": 8, "eval_rouge-1": 30.0, "train_loss": 2.0, "train_runtime": 5.0},
    ]
    series = plot_series(rows)
    assert series["loss"] == {"loss": ([2.0, 4.0], [3.0, 2.25]), "eval_loss": ([4.0], [2.75])}
    assert series["grad_norm"] == {"grad_norm": ([2.0], [1.5])}
    assert list(series["eval_metrics"]) == list(GENERATION_KEYS)
    assert series["eval_metrics"]["eval_rouge-1"] == ([4.0, 8.0], [20.0, 30.0])
    assert series["eval_metrics"]["eval_exact_match"] == ([4.0], [0.0])
    assert series["eval_other"] == {"eval_perplexity": ([4.0], [15.6])}
    assert series["tokens_per_second"] == {}


def test_each_figure_draws_exactly_its_series():
    series = plot_series([{"step": s, "loss": 3.0 / s, "eval_loss": 3.5 / s} for s in (1, 2, 3)]
                         + [{"step": 3, "eval_rouge-1": 10.0, "eval_bleu-4": 2.0}])
    for name in ("loss", "eval_metrics"):
        lines = make_figure(name, series[name]).axes[0].get_lines()
        assert [(list(line.get_xdata()), list(line.get_ydata())) for line in lines] \
            == [tuple(map(list, s)) for s in series[name].values()]
    assert b"matplotlib.org" not in figure_png(make_figure("loss", series["loss"]))


def test_pngs_are_written_beside_the_page(report, trained):
    folder = trained / "report"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["grad_norm.png", "learning_rate.png", "loss.png", "tokens_per_second.png"]
    for path in folder.iterdir():
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
        assert b"http" not in data, "matplotlib's Software metadata carries a URL"


def test_empty_plots_are_named_in_the_page(report):
    _, page = report
    assert "Eval generation metrics: not plotted" in page
    assert "Loss (train and eval): not plotted" not in page


def test_the_audit_manifest_and_config_are_shown(report, trained):
    _, page = report
    audit = json.loads((trained / "data_audit.json").read_text())
    for split in ("train", "eval"):
        for key in ("rows_in", "rows_out", "tokens", "supervised_tokens"):
            assert f"<td class=\"num\">{audit[split][key]:,}</td>" in page, (split, key)
    assert f"{audit['batching']['train']['bins']:,}" in page
    assert audit["fingerprint"] in page
    manifest = json.loads((trained / "chattune.json").read_text())
    assert manifest["base_model"]["path"] in page
    assert f"{manifest['trainable_parameters']:,}" in page
    assert ">lora <span" in page and manifest["template"]["name"] in page
    assert "model_name_or_path: " in page and "lr_scheduler_type: linear" in page


def test_eval_metrics_compare_and_samples(report):
    _, page = report
    assert "no evaluation yet" not in page
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match", "answer_length", "perplexity"):
        assert f"<th>{key}</th><td class=\"num\">{EVAL['metrics'][key]:g}</td>" in page, key
    compare = EVAL["compare"]
    for key in compare["better"]:
        counts = "".join(f"<td class=\"num\">{compare[c][key]}</td>" for c in ("better", "worse", "same"))
        assert f"<td class=\"num\">{compare['metrics'][key]:g}</td>" in page
        assert counts in page, key
    assert "Compared with base" in page and "+20.75" in page  # rouge-1 41.25 vs 20.5
    assert "I am a large model by someone else." in page and "<td class=num>+87.5</td>" in page
    assert "first 10 of 12 rows" in page
    assert "prompt number 9" in page and "prompt number 10" not in page
    assert "no reference" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "example.com" in page


def test_a_run_without_evaluation_or_metrics(trained, tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    for name in ("chattune.json", "chattune.yaml"):
        shutil.copy(trained / name, run / name)
    out = write_report(run, tmp_path / "elsewhere" / "page.html")
    page = out.read_text()
    assert out == tmp_path / "elsewhere" / "page.html"
    assert f"no evaluation yet: chattune eval {run} --data F" in page
    assert "no training curves: metrics.jsonl not found" in page
    assert "no data audit: data_audit.json not found" in page
    assert "<img" not in page and not (tmp_path / "elsewhere" / "page").exists()


def test_broken_files_are_lines_not_crashes(trained, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "*.safetensors", "report*"))
    (run / "metrics.jsonl").write_text((trained / "metrics.jsonl").read_text()
                                       + '{"step": 9, "loss": NaN}\n{"step": 10, "lo')
    (run / "data_audit.json").write_text("{not json")
    (run / "eval" / "dev" / "eval.json").write_text('{"metrics": {"rouge-1": 1.5}}')
    (run / "eval" / "dev" / "eval_rows.jsonl").unlink()
    page = write_report(run).read_text()
    assert "1 line(s) of metrics.jsonl were not JSON objects" in page
    assert "1 NaN or infinite value(s) not drawn, the first: loss at step 9" in page
    assert "data_audit.json could not be read" in page
    assert "<th>rouge-1</th><td class=\"num\">1.5</td>" in page
    assert "eval_rows.jsonl not found" in page


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ManifestError, match=re.escape(str(tmp_path / "nope")) + ".*no such run folder"):
        write_report(tmp_path / "nope")
    with pytest.raises(ManifestError, match=re.escape(str(tmp_path)) + ".*no chattune.json"):
        write_report(tmp_path)
    (tmp_path / "chattune.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        write_report(tmp_path)
    assert issubclass(ManifestError, ChattuneError)


def test_importing_the_module_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, chattune.evaluation.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
