"""Every command against hostile arguments: files where folders are expected and folders where
files are, paths under a file or in ``/proc``, out-of-range numbers, empty and binary input.
Each ends in exit code 0 or 2 with at most one error line, never in a traceback.

The CLI runs in-process (``chattune.cli.main``): an exception that escapes it fails the case,
with its traceback, where a user would have seen one.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from chattune.cli import main

GARBAGE = bytes(range(256)) * 16


@pytest.fixture(scope="module")
def place(tiny_models, data_file, tmp_path_factory) -> dict[str, str]:
    """Names used in the cases -> paths: a trained run, a BM25 knowledge base, and hostile entries."""
    from chattune.config_io import load_config
    from chattune.kb import store
    from chattune.training.recipe import train

    root = tmp_path_factory.mktemp("hostile")
    (root / "afile").write_text("x")
    (root / "adir").mkdir()
    (root / "empty.json").write_text("")
    (root / "binary.json").write_bytes(GARBAGE)
    (root / "good.json").write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": "Lumi."}]))
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("Veldmoor stands on the Sel river. Arno trades smoked eel.")
    for name in ("garbage.txt", "garbage.pdf", "garbage.docx", "garbage.html", "garbage.gguf"):
        (root / name).write_bytes(GARBAGE)
    (root / "empty.gguf").write_bytes(b"")
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(GARBAGE)
    junk_modules = root / "junk-modules"
    junk_modules.mkdir()
    (junk_modules / "model.safetensors").write_bytes(GARBAGE)
    (junk_modules / "modules.json").write_text("[1, 2]")
    store.build([root / "docs"], root / "kb")
    run = train(load_config(None, [f"model_name_or_path={tiny_models('glm4')}", f"train_files={data_file}",
                                   f"output_dir={root / 'run'}", "max_steps=1", "save_steps=1", "report_to=none",
                                   "max_seq_length=64", "max_new_tokens=2"]),
                log=lambda *_: None).output_dir
    names = {child.name: str(child) for child in root.iterdir()}
    return {**names, "run": str(run), "model": str(tiny_models("glm4")), "root": str(root)}


@pytest.fixture(scope="module")
def port_in_use():
    """A port of 127.0.0.1 another socket listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield str(listener.getsockname()[1])


TRAIN = ["model_name_or_path={model}", "train_files={good.json}", "report_to=none", "max_steps=1",
         "output_dir={root}/train-out"]

CASES: dict[str, list[str]] = {
    # data convert / inspect / prepare
    "convert input is a folder": ["data", "convert", "{adir}", "--out", "{root}/o.jsonl"],
    "convert empty input": ["data", "convert", "{empty.json}", "--out", "{root}/o.jsonl"],
    "convert binary input": ["data", "convert", "{binary.json}", "--out", "{root}/o.jsonl"],
    "convert out is a folder": ["data", "convert", "{good.json}", "--out", "{adir}"],
    "convert out in /proc": ["data", "convert", "{good.json}", "--out", "/proc/x.jsonl"],
    "convert out under a file": ["data", "convert", "{good.json}", "--out", "{afile}/x.jsonl"],
    "convert bad columns": ["data", "convert", "{good.json}", "--out", "{root}/o.jsonl", "--columns", "junk"],
    "convert unknown format": ["data", "convert", "{good.json}", "--out", "{root}/o.jsonl", "--format", "x"],
    "inspect a folder": ["data", "inspect", "{adir}"],
    "inspect binary": ["data", "inspect", "{binary.json}"],
    "inspect negative show": ["data", "inspect", "{good.json}", "--show", "-1"],
    "prepare config is a folder": ["data", "prepare", "{adir}"],
    "prepare binary config": ["data", "prepare", "{binary.json}"],
    # train
    "dry-run seed -1": ["train", "--dry-run", *TRAIN, "seed=-1"],
    "dry-run seed 2**70": ["train", "--dry-run", *TRAIN, f"seed={2**70}"],
    "dry-run config is a folder": ["train", "--dry-run", "{adir}"],
    "dry-run binary config": ["train", "--dry-run", "{binary.json}"],
    "dry-run empty config": ["train", "--dry-run", "{empty.json}"],
    "dry-run model is a file": ["train", "--dry-run", "model_name_or_path={afile}"],
    "dry-run model is missing": ["train", "--dry-run", "model_name_or_path={root}/missing"],
    "dry-run model not a model": ["train", "--dry-run", "model_name_or_path={adir}"],
    "dry-run nproc 0": ["train", "--dry-run", *TRAIN, "--nproc", "0"],
    "dry-run max_seq_length -5": ["train", "--dry-run", *TRAIN, "max_seq_length=-5"],
    "train seed -1": ["train", *TRAIN, "seed=-1"],
    "train seed 2**70": ["train", *TRAIN, f"seed={2**70}"],
    "train learning_rate nan": ["train", *TRAIN, "learning_rate=nan"],
    "train save_steps 0": ["train", *TRAIN, "save_steps=0"],
    "train output_dir in /proc": ["train", *TRAIN, "output_dir=/proc/x"],
    "train output_dir under a file": ["train", *TRAIN, "output_dir={afile}/sub"],
    "train output_dir is a file": ["train", *TRAIN, "output_dir={afile}"],
    "train data is a folder": ["train", *TRAIN, "train_files={adir}"],
    "train data is binary": ["train", *TRAIN, "train_files={binary.json}"],
    "train data is empty": ["train", *TRAIN, "train_files={empty.json}"],
    "train model is a file": ["train", *TRAIN, "model_name_or_path={afile}"],
    "train nproc 0": ["train", *TRAIN, "--nproc", "0"],
    # predict / eval / chat
    "predict run is a file": ["predict", "{afile}", "--data", "{good.json}", "--out", "{root}/p.jsonl"],
    "predict run is an empty folder": ["predict", "{adir}", "--data", "{good.json}", "--out", "{root}/p.jsonl"],
    "predict data is a folder": ["predict", "{run}", "--data", "{adir}", "--out", "{root}/p.jsonl"],
    "predict data is empty": ["predict", "{run}", "--data", "{empty.json}", "--out", "{root}/p.jsonl"],
    "predict data is binary": ["predict", "{run}", "--data", "{binary.json}", "--out", "{root}/p.jsonl"],
    "predict out in /proc": ["predict", "{run}", "--data", "{good.json}", "--out", "/proc/x.jsonl"],
    "predict out under a file": ["predict", "{run}", "--data", "{good.json}", "--out", "{afile}/x.jsonl"],
    "predict out is a folder": ["predict", "{run}", "--data", "{good.json}", "--out", "{adir}"],
    "predict batch size 0": ["predict", "{run}", "--data", "{good.json}", "--out", "{root}/p.jsonl",
                             "--batch-size", "0"],
    "predict limit -1": ["predict", "{run}", "--data", "{good.json}", "--out", "{root}/p.jsonl", "--limit", "-1"],
    "predict top-p 2": ["predict", "{run}", "--data", "{good.json}", "--out", "{root}/p.jsonl", "--top-p", "2"],
    "eval out in /proc": ["eval", "{run}", "--data", "{good.json}", "--out", "/proc/x"],
    "eval out under a file": ["eval", "{run}", "--data", "{good.json}", "--out", "{afile}/x"],
    "eval out is a file": ["eval", "{run}", "--data", "{good.json}", "--out", "{afile}"],
    "eval data is binary": ["eval", "{run}", "--data", "{binary.json}", "--out", "{root}/e"],
    "eval data is empty": ["eval", "{run}", "--data", "{empty.json}", "--out", "{root}/e"],
    "eval data is a folder": ["eval", "{run}", "--data", "{adir}", "--out", "{root}/e"],
    "eval limit 0": ["eval", "{run}", "--data", "{good.json}", "--out", "{root}/e", "--limit", "0"],
    "eval compare is a file": ["eval", "{run}", "--data", "{good.json}", "--out", "{root}/e", "--compare", "{afile}"],
    "chat run is a file": ["chat", "{afile}"],
    "chat max-new-tokens 0": ["chat", "{run}", "--max-new-tokens", "0"],
    "chat kb is a file": ["chat", "{run}", "--kb", "{afile}"],
    # export / report
    "export run is missing": ["export", "{root}/missing", "--out", "{root}/x"],
    "export run is a file": ["export", "{afile}", "--out", "{root}/x"],
    "export out is a file": ["export", "{run}", "--out", "{afile}"],
    "export out in /proc": ["export", "{run}", "--out", "/proc/x"],
    "export out under a file": ["export", "{run}", "--out", "{afile}/sub"],
    "export shard size junk": ["export", "{run}", "--out", "{root}/x", "--shard-size", "junk"],
    "export shard size 0": ["export", "{run}", "--out", "{root}/x", "--shard-size", "0"],
    "report run is missing": ["report", "{root}/missing"],
    "report run is a file": ["report", "{afile}"],
    "report out in /proc": ["report", "{run}", "--out", "/proc/x.html"],
    "report out under a file": ["report", "{run}", "--out", "{afile}/x.html"],
    # kb
    "kb build missing docs": ["kb", "build", "{root}/missing", "--out", "{root}/k"],
    "kb build empty file": ["kb", "build", "{empty.json}", "--out", "{root}/k"],
    "kb build empty folder": ["kb", "build", "{adir}", "--out", "{root}/k"],
    "kb build binary text": ["kb", "build", "{garbage.txt}", "--out", "{root}/k"],
    "kb build binary pdf docx html": ["kb", "build", "{garbage.pdf}", "{garbage.docx}", "{garbage.html}",
                                      "--out", "{root}/k"],
    "kb build out is a file": ["kb", "build", "{docs}", "--out", "{afile}"],
    "kb build out in /proc": ["kb", "build", "{docs}", "--out", "/proc/x"],
    "kb build out under a file": ["kb", "build", "{docs}", "--out", "{afile}/sub"],
    "kb build chunk size 0": ["kb", "build", "{docs}", "--out", "{root}/k", "--chunk-size", "0"],
    "kb build overlap too big": ["kb", "build", "{docs}", "--out", "{root}/k", "--chunk-overlap", "1000"],
    "kb build embedding is a file": ["kb", "build", "{docs}", "--out", "{root}/k", "--embedding", "{afile}"],
    "kb build embedding empty folder": ["kb", "build", "{docs}", "--out", "{root}/k", "--embedding", "{adir}"],
    "kb build embedding not a model": ["kb", "build", "{docs}", "--out", "{root}/k", "--embedding",
                                       "{not-a-model}"],
    "kb build embedding junk modules": ["kb", "build", "{docs}", "--out", "{root}/k", "--embedding",
                                        "{junk-modules}"],
    "kb search missing kb": ["kb", "search", "{root}/missing", "q"],
    "kb search kb is a file": ["kb", "search", "{afile}", "q"],
    "kb search top-k 0": ["kb", "search", "{kb}", "q", "--top-k", "0"],
    "kb search threshold nan": ["kb", "search", "{kb}", "q", "--threshold", "nan"],
    "kb search threshold 2": ["kb", "search", "{kb}", "q", "--threshold", "2"],
    "kb search empty query": ["kb", "search", "{kb}", ""],
    "kb add to a file": ["kb", "add", "{afile}", "{docs}"],
    "kb rm from a folder": ["kb", "rm", "{adir}", "a.txt"],
    # convert / fetch / templates / tiny-model / serve
    "convert missing": ["convert", "{root}/missing"],
    "convert binary file": ["convert", "{binary.json}"],
    "convert empty gguf": ["convert", "{empty.gguf}"],
    "convert garbage gguf": ["convert", "{garbage.gguf}"],
    "convert a folder": ["convert", "{adir}"],
    "convert dtype of a non-gguf": ["convert", "{adir}", "--dtype", "bfloat16"],
    "fetch unknown name": ["fetch", "no-such-model"],
    "templates unknown": ["templates", "no-such-template"],
    "templates messages binary": ["templates", "default", "--messages", "{binary.json}"],
    "templates messages empty": ["templates", "default", "--messages", "{empty.json}"],
    "templates messages folder": ["templates", "default", "--messages", "{adir}"],
    "templates model is a file": ["templates", "--model", "{afile}"],
    "tiny-model out is a file": ["tiny-model", "{afile}"],
    "tiny-model out in /proc": ["tiny-model", "/proc/x"],
    "tiny-model out under a file": ["tiny-model", "{afile}/sub"],
    "tiny-model hidden size 0": ["tiny-model", "{root}/t", "--hidden-size", "0"],
    "tiny-model layers -1": ["tiny-model", "{root}/t", "--num-layers", "-1"],
    "serve port -1": ["serve", "{root}/never-loaded", "--port", "-1"],
    "serve port 70000": ["serve", "{root}/never-loaded", "--port", "70000"],
    "serve port in use": ["serve", "{root}/never-loaded", "--port", "{port in use}"],
    "serve max-batch 0": ["serve", "{root}/never-loaded", "--max-batch", "0"],
}


EXPECTED = {
    "dry-run seed -1": "seed: must be an integer from 0 to 2**32 - 1",
    "train seed 2**70": "seed: must be an integer from 0 to 2**32 - 1",
    "train output_dir in /proc": "output_dir: cannot write /proc/x",
    "train output_dir under a file": "output_dir: {afile}/sub: {afile} is a file",
    "predict out in /proc": "--out: cannot write /proc/x.jsonl",
    "predict out under a file": "--out: {afile}/x.jsonl: {afile} is a file",
    "eval out in /proc": "--out: cannot write /proc/x",
    "export out under a file": "--out: {afile}/sub: {afile} is a file",
    "kb build embedding junk modules": "not a sentence-transformers embedding model",
    "serve port -1": "--port: must be from 0 to 65535, got -1",
    "serve port 70000": "--port: must be from 0 to 65535, got 70000",
    "serve port in use": "cannot listen there",
}
"""The error line of the cases where the point is which check answers (before any model loads)."""


def _fill(text: str, names: dict[str, str]) -> str:
    for name, path in names.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_argument_ends_in_one_line_not_a_traceback(case, place, port_in_use, capsys):
    if "/proc/" in " ".join(CASES[case]) and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    names = {**place, "port in use": port_in_use}
    capsys.readouterr()
    try:
        code = main([_fill(arg, names) for arg in CASES[case]])
    except SystemExit as exc:  # argparse's own errors (an unknown choice)
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err[-2000:])
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("chattune") and ": error: " in line]
        assert len(errors) == 1, err[-2000:]
    if case in EXPECTED:
        assert code == 2 and _fill(EXPECTED[case], names) in errors[0], err[-2000:]
