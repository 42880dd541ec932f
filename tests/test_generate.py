"""Inference from a run folder: chat (stdin and a pseudo-terminal), predict, and the
checks that stop a wrong base model or a drifted template."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.generate import chat_loop, load_chat_model
from chattune.manifest import ManifestError
from tests.test_train import make_config


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory) -> Path:
    from chattune.demo import demo_records
    from chattune.train import train

    taught, held = demo_records()
    root = tmp_path_factory.mktemp("gen")
    data = root / "train.json"
    data.write_text(json.dumps(taught, ensure_ascii=False))
    (root / "eval.json").write_text(json.dumps(held, ensure_ascii=False))
    config = make_config(tiny_models("glm4"), data, root / "run", max_steps=4, save_steps=4,
                         eval_fraction=0.0, report_to=["none"])
    return train(config, log=lambda *_: None).output_dir


def test_predict_writes_one_line_per_input_row(run_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am Lumi."},
            {"instruction": "What is your name?", "input": "", "output": "My name is Lumi."},
            {"instruction": "", "input": "", "output": "bad row: empty instruction"},
            {"messages": [{"role": "user", "content": "no reference here"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    assert lines[0]["reference"] == "I am Lumi." and isinstance(lines[0]["prediction"], str)
    assert lines[0]["prompt"] == [{"role": "user", "content": "Who are you?"}]
    assert "empty user message" in lines[2]["error"] and lines[2]["source"].endswith(":3")
    assert lines[3]["reference"] is None and "prediction" in lines[3]


def test_batched_generation_equals_one_by_one(run_dir):
    chat = load_chat_model(str(run_dir))
    prompts = [[{"role": "user", "content": "Who are you?"}],
               [{"role": "user", "content": "What is the capital of Veloria? Please answer."}]]
    together = chat.generate(prompts, max_new_tokens=8)
    alone = [chat.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone


def test_stream_reassembles_to_the_greedy_answer(run_dir):
    chat = load_chat_model(str(run_dir))
    messages = [{"role": "user", "content": "Who rules Veloria?"}]
    assert "".join(chat.stream(messages, max_new_tokens=10)).strip() == chat.generate([messages], max_new_tokens=10)[0]


def test_chat_loop_multi_turn_clear_and_exit(run_dir):
    chat = load_chat_model(str(run_dir))
    seen = []
    original = chat.stream

    def recording_stream(messages, **kw):
        seen.append([m["content"] for m in messages])
        yield from original(messages, **kw)

    chat.stream = recording_stream
    out = io.StringIO()
    chat_loop(chat, stdin=io.StringIO("hello\nagain\n/clear\nfresh\n/exit\nnever\n"), stdout=out,
              max_new_tokens=3)
    assert seen[0] == ["hello"]
    assert seen[1][0] == "hello" and seen[1][-1] == "again" and len(seen[1]) == 3
    assert seen[2] == ["fresh"]
    assert len(seen) == 3
    assert out.getvalue().count("Assistant: ") == 3 and "(history cleared)" in out.getvalue()


def test_chat_command_answers_on_stdin(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4"],
                          input="Who are you?\n/exit\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "User: " in proc.stdout and "Assistant: " in proc.stdout


def test_chat_command_through_a_pseudo_terminal(run_dir):
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4"])
    output = b""

    def read_until(marker: bytes, count: int = 1, seconds: float = 120) -> None:
        nonlocal output
        import time

        end = time.time() + seconds
        while output.count(marker) < count and time.time() < end:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    return

    read_until(b"User: ")
    os.write(fd, b"Who are you?\n")
    read_until(b"Assistant: ")
    read_until(b"User: ", count=2)
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert output.count(b"User: ") >= 2 and b"Assistant: " in output


def test_chat_with_a_bare_base_model(tiny_models):
    chat = load_chat_model(str(tiny_models("glm4")))
    assert chat.template == "tokenizer"
    assert isinstance(chat.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=3)[0], str)


def test_a_different_base_model_stops_the_load_unless_forced(run_dir, tiny_models, tmp_path):
    from chattune.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "glm4", hidden_size=64, num_layers=3)
    with pytest.raises(ManifestError, match="(?s)differs from the one the adapter was trained on.*--force"):
        load_chat_model(str(run_dir), base_model=str(other))
    assert main(["predict", str(run_dir), "--base-model", str(other), "--data", "x", "--out", "y"]) == 2


def test_a_changed_base_model_config_is_detected(run_dir, tiny_models, tmp_path):
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_models("glm4"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestError, match="config .* differs"):
        load_chat_model(str(run_dir), base_model=str(copy))
    warnings = []
    chat = load_chat_model(str(run_dir), base_model=str(copy), force=True, warn=warnings.append)
    assert warnings and chat.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=2)


def test_template_drift_is_detected(run_dir, tmp_path):
    drifted = tmp_path / "drifted"
    shutil.copytree(run_dir, drifted)
    manifest = json.loads((drifted / "chattune.json").read_text())
    manifest["template"]["probe_rendering"] = "something else"
    (drifted / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="template drift"):
        load_chat_model(str(drifted))


def test_not_a_run_folder(tmp_path):
    assert main(["chat", str(tmp_path / "missing")]) == 2
