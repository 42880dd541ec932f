"""``chattune chat``: multi-turn in the terminal, through stdin and a pseudo-terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

import chattune.chat
from chattune.chat import chat_loop
from chattune.inference.generate import generate
from chattune.inference.runs import load_run
from tests.inference.test_generate import run_dir  # noqa: F401  (the module's trained run)


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


# -- with a knowledge base (--kb) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    from chattune.kb import store
    from chattune.kb.ask import open_for_answers

    docs = tmp_path_factory.mktemp("chat-kb")
    (docs / "veldmoor.md").write_text("Veldmoor was founded by Oren Tal in 812.", encoding="utf-8")
    (docs / "qinglan.txt").write_text("青岚港由渔夫林墨于公元620年创建。", encoding="utf-8")
    store.build([docs / "veldmoor.md", docs / "qinglan.txt"], docs / "kb")
    return open_for_answers(docs / "kb")


def test_chat_with_a_kb_prints_the_sources_under_each_answer(run, kb, monkeypatch):
    from chattune.kb import store
    from chattune.kb.prompt import CANNOT_ANSWER_EN, CANNOT_ANSWER_ZH, kb_prompt

    sent = []

    def scripted_stream(loaded, messages, **kw):
        sent.append(messages)
        yield from ["Oren ", "Tal."]

    monkeypatch.setattr(chattune.chat.generate, "stream", scripted_stream)
    out = io.StringIO()
    question = "Who founded Veldmoor?"
    chat_loop(run, stdin=io.StringIO(f"{question}\nWhat is the capital of France?\n法国的首都是哪里？\n"
                                     f"{'x' * 1001}\n/exit\n"), stdout=out, kb=kb)
    [hit] = store.search(kb, question)
    assert sent == [[{"role": "user", "content": kb_prompt(question, [hit]).content}]]  # the cannot-answers: no call
    lines = out.getvalue().splitlines()
    at = lines.index("User: Assistant: Oren Tal. [1]")
    assert lines[at + 1] == f"[1] {hit.file}, chunk 0 (score {hit.score:.2f})"
    assert f"User: Assistant: {CANNOT_ANSWER_EN}" in lines and f"User: Assistant: {CANNOT_ANSWER_ZH}" in lines
    assert "User: chattune: error: query: 1001 characters, more than the limit of 1000; expected a shorter " \
           "question" in lines


def test_chat_with_a_kb_keeps_the_questions_as_typed_in_the_history(run, kb, monkeypatch):
    sent = []

    def scripted_stream(loaded, messages, **kw):
        sent.append(messages)
        yield "Oren Tal."

    monkeypatch.setattr(chattune.chat.generate, "stream", scripted_stream)
    chat_loop(run, stdin=io.StringIO("Who founded Veldmoor?\n谁创建了青岚港？\n"), stdout=io.StringIO(), kb=kb)
    assert [m["role"] for m in sent[1]] == ["user", "assistant", "user"]
    assert sent[1][:2] == [{"role": "user", "content": "Who founded Veldmoor?"},
                           {"role": "assistant", "content": "Oren Tal."}]
    assert sent[1][2]["content"].startswith("<指令>") and "青岚港由渔夫林墨" in sent[1][2]["content"]


def test_chat_command_with_a_kb_answers_and_cites(run_dir, kb):  # noqa: F811
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "3",
                           "--kb", str(kb.root)], input="Who founded Veldmoor?\nWho painted the Mona Lisa?\n/exit\n",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Assistant: The question cannot be answered from the known information.\n" in proc.stdout
    assert f"[1] {kb.chunks[0]['file']}, chunk 0 (score " in proc.stdout


def test_chat_command_refuses_a_folder_that_is_not_a_kb(run_dir, tmp_path):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--kb", str(tmp_path)],
                          input="", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"chattune: error: --kb: {tmp_path}: no kb.json in it; expected a knowledge-base "
                           "folder made by `chattune kb build`\n")


# -- images (/image PATH) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm(tiny_vlms):
    """The tiny LLaVA, a bare base model."""
    return load_run(str(tiny_vlms("llava")))


@pytest.fixture
def pictures(tmp_path, monkeypatch):
    """Two PNGs and a corrupt one in the current folder (``/image`` resolves relative paths from it)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (220, 30, 30)).save("red.png")
    Image.new("RGB", (30, 40), (30, 60, 220)).save("blue.png")
    (tmp_path / "broken.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:20])
    return tmp_path


def recorded(monkeypatch) -> list:
    """``stream`` records the conversations it is given and answers them as it does."""
    seen = []
    original = chattune.chat.generate.stream

    def recording_stream(loaded, messages, **kw):
        seen.append([dict(m) for m in messages])
        yield from original(loaded, messages, **kw)

    monkeypatch.setattr(chattune.chat.generate, "stream", recording_stream)
    return seen


def test_image_attaches_to_the_next_message(vlm, pictures, monkeypatch):
    seen = recorded(monkeypatch)
    out = io.StringIO()
    chat_loop(vlm, stdin=io.StringIO("/image red.png\n/image 'blue.png'\nWhich colours?\nAnd now?\n/exit\n"),
              stdout=out, max_new_tokens=3)
    red, blue = str(pictures / "red.png"), str(pictures / "blue.png")
    images = seen[0][0].pop("images")  # decoded when attached: the chat goes on if a file moves later
    assert [image.tobytes() for image in images] == [Image.open(p).convert("RGB").tobytes() for p in (red, blue)]
    assert seen[0] == [{"role": "user", "content": "<image><image>Which colours?"}]
    seen[1][0].pop("images")
    assert seen[1][0] == seen[0][0] and seen[1][-1] == {"role": "user", "content": "And now?"}  # kept in history
    text = out.getvalue()
    assert text.startswith("chattune chat: type a message; /image PATH attaches an image to your next message;")
    assert f"(image 1 attached to your next message: {red})" in text
    assert f"(image 2 attached to your next message: {blue})" in text
    assert text.count("Assistant: ") == 2


def test_chat_answers_with_the_image_as_generate_does(vlm, pictures):
    out = io.StringIO()
    chat_loop(vlm, stdin=io.StringIO("/image red.png\nWhat colour is it?\n/exit\n"), stdout=out, max_new_tokens=6)
    asked = [{"role": "user", "content": "<image>What colour is it?", "images": [str(pictures / "red.png")]}]
    expected = generate(vlm, [asked], max_new_tokens=6)[0]
    assert f"Assistant: {expected}\n" in out.getvalue()


def test_a_bad_image_is_one_line_and_the_chat_goes_on(vlm, pictures, monkeypatch):
    seen = recorded(monkeypatch)
    out = io.StringIO()
    chat_loop(vlm, stdin=io.StringIO("/image missing.png\n/image broken.png\n/image\n/image https://x.org/a.png\n"
                                     "/image red.png\n/clear\nhello\n/exit\n"), stdout=out, max_new_tokens=2)
    lines = out.getvalue().splitlines()
    assert f"User: chattune: error: /image: image {pictures / 'missing.png'} not found" in lines
    broken = f"User: chattune: error: /image: {pictures / 'broken.png'}: not an image"
    assert any(line.startswith(broken) for line in lines)
    assert "User: chattune: error: /image: expected an image path, e.g. /image photo.jpg" in lines
    assert any("remote image URLs are not fetched" in line for line in lines)
    assert seen == [[{"role": "user", "content": "hello"}]]  # /clear dropped the attached image too


def test_image_on_a_text_only_model_says_it_reads_no_images(run, pictures, monkeypatch):
    seen = recorded(monkeypatch)
    out = io.StringIO()
    chat_loop(run, stdin=io.StringIO("/image red.png\nhello\n/exit\n"), stdout=out, max_new_tokens=2)
    text = out.getvalue()
    assert "/image" not in text.splitlines()[0]  # the greeting offers it to vision-language models only
    assert "User: chattune: error: /image: this model reads no images (not a vision-language model); " \
           "send text only\n" in text
    assert seen == [[{"role": "user", "content": "hello"}]] and "Assistant: " in text


def test_image_is_refused_with_a_kb(vlm, kb, pictures):
    out = io.StringIO()
    chat_loop(vlm, stdin=io.StringIO("/image red.png\n/exit\n"), stdout=out, kb=kb)
    assert "chattune: error: /image: not with --kb (answers from a knowledge base are text only)\n" in out.getvalue()


def test_an_image_that_no_longer_fits_leaves_the_turn_out(vlm, pictures, monkeypatch):
    """A message whose image tokens do not fit the context is one error line; the chat goes on."""
    import dataclasses

    small = dataclasses.replace(vlm, context_length=16)
    seen = recorded(monkeypatch)
    out = io.StringIO()
    chat_loop(small, stdin=io.StringIO("/image red.png\nWhat colour?\nhi\n/exit\n"), stdout=out, max_new_tokens=2)
    text = out.getvalue()
    assert "chattune: error: the prompt is at least" in text and "this message is left out of the history" in text
    assert seen[-1] == [{"role": "user", "content": "hi"}]


def test_chat_command_attaches_an_image_on_stdin(tiny_vlms, pictures):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(tiny_vlms("llava")),
                           "--max-new-tokens", "3"], input="/image red.png\nWhat colour?\n/exit\n",
                          capture_output=True, text=True, timeout=120, env=env, cwd=pictures)
    assert proc.returncode == 0, proc.stderr
    assert f"(image 1 attached to your next message: {pictures / 'red.png'})" in proc.stdout
    assert "Assistant: " in proc.stdout and "error" not in proc.stdout
