"""``chattune chat``: multi-turn in the terminal, through stdin and a pseudo-terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import chattune.chat
from chattune.chat import chat_loop
from chattune.generate import generate
from chattune.runs import load_run
from tests.test_generate import run_dir  # noqa: F401  (the module's trained run)


@pytest.fixture(scope="module")
def run(run_dir):  # noqa: F811
    return load_run(str(run_dir))


def test_chat_loop_multi_turn_clear_and_exit(run, monkeypatch):
    seen = []
    original = chattune.chat.generate.stream

    def recording_stream(loaded, messages, **kw):
        seen.append([m["content"] for m in messages])
        yield from original(loaded, messages, **kw)

    monkeypatch.setattr(chattune.chat.generate, "stream", recording_stream)
    out = io.StringIO()
    chat_loop(run, stdin=io.StringIO("hello\nagain\n/clear\nfresh\n/exit\nnever\n"), stdout=out, max_new_tokens=3)
    assert seen[0] == ["hello"]
    assert seen[1][0] == "hello" and seen[1][-1] == "again" and len(seen[1]) == 3
    assert seen[2] == ["fresh"]
    assert len(seen) == 3
    assert out.getvalue().count("Assistant: ") == 3 and "(history cleared)" in out.getvalue()


def test_chat_prints_the_answer_generate_gives(run):
    out = io.StringIO()
    chat_loop(run, stdin=io.StringIO("Who are you?\n/exit\n"), stdout=out, max_new_tokens=6)
    expected = generate(run, [[{"role": "user", "content": "Who are you?"}]], max_new_tokens=6)[0]
    assert f"Assistant: {expected}\n" in out.getvalue()


def test_chat_command_answers_on_stdin(run_dir):  # noqa: F811
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4",
                           "--repetition-penalty", "1.3", "--top-k", "5"],
                          input="Who are you?\n/exit\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "User: " in proc.stdout and "Assistant: " in proc.stdout


def test_chat_command_through_a_pseudo_terminal(run_dir):  # noqa: F811
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4"])
    output = b""

    def read_until(marker: bytes, count: int = 1, seconds: float = 120) -> None:
        nonlocal output
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
