"""The Ollama Modelfile: its TEMPLATE, rendered here by a small evaluator of the Go-template
subset it uses (tests/templates/go_template.py) and compared with chattune's own rendering; its
stop strings, BOS handling and generation parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chattune.config import GenerateArgs
from chattune.errors import ConfigError
from chattune.export.modelfile import _gguf_add_bos, write_modelfile
from chattune.templates.forms import ollama_template
from tests.templates.go_template import GoTemplate

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm"


def test_go_template_evaluator_follows_go_semantics():
    source = ('{{ $n := "" }}{{ range .Messages }}{{ $n = print $n "x" }}{{ len $n }}:{{ .Role }}'
              '{{ if eq .Role "user" }}U{{ else if eq (len $n) 2 }}two{{ else }}other{{ end }};{{ end }}'
              '{{ if .System }}S={{ $.System }}{{ end }}')
    data = {"System": "s", "Messages": [{"Role": "user"}, {"Role": "assistant"}, {"Role": "tool"}]}
    assert GoTemplate(source).render(data) == "1:userU;2:assistanttwo;3:toolother;S=s"


def _ollama_render(go_template: str, messages: list[dict]) -> str:
    """What Ollama renders for a chat request: ``.System`` the system messages' text,
    ``.Messages`` every message (system ones too) as Role/Content."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return GoTemplate(go_template).render(
        {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def _chattune_prompt(template: str, messages: list[dict], tokenizer, specials: str = "") -> str:
    from chattune.templates.pieces import render_text
    from chattune.templates.registry import render

    return render_text(render(template, messages, tokenizer), eos=tokenizer.eos_token, specials=specials)


SYSTEM, Q1, A1, Q2, A2, Q3 = "Be brief.", "Hi there", "Hello!", "Name 3 colors", "red, blue, yellow", "是吗？"
CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
     {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}],
    [{"role": "user", "content": Q1}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}],
    [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
     {"role": "assistant", "content": A2}, {"role": "user", "content": Q3}],
]
NAMED = ["default", "tutorial-alpaca", "chatglm-tuning", "chatglm", "chatglm2", "chatglm3", "vicuna", "alpaca",
         "chinese-alpaca", "chinese-alpaca-2", "moss", "gpt4all"]


def _modelfile_template(path: Path) -> str:
    """The TEMPLATE value as Ollama's parser reads it (triple-quoted, verbatim)."""
    found = re.search(r'^TEMPLATE """(.*?)"""$', path.read_text(encoding="utf-8"), re.S | re.M)
    assert found, "no TEMPLATE"
    return found[1]


@pytest.mark.parametrize("template", NAMED + ["tokenizer"])
@pytest.mark.parametrize("arch", ["qwen2", "glm4"])
def test_modelfile_template_renders_chattunes_prompt(template, arch, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models(arch))
    path = write_modelfile(tmp_path, "m.gguf", template, tokenizer, GenerateArgs(), system=SYSTEM)
    go_template = _modelfile_template(path)
    assert "NOTE" not in path.read_text()  # the tiny chat templates translate
    for messages in CONVERSATIONS:
        assert _ollama_render(go_template, messages) == _chattune_prompt(template, messages, tokenizer), messages
    if template == "tokenizer" and arch == "qwen2":  # ChatML: its answers end with the EOS token
        for messages in CONVERSATIONS:
            assert _ollama_render(go_template, messages) == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)


def test_modelfile_lines(tiny_models, ggufs, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    greedy = write_modelfile(tmp_path / "a", "model.f16.gguf", "chatglm3", tokenizer,
                             GenerateArgs(max_new_tokens=64), system="You are ChatGLM3.")
    lines = greedy.read_text(encoding="utf-8").splitlines()
    assert greedy == tmp_path / "a" / "Modelfile"
    assert "FROM ./model.f16.gguf" in lines
    assert 'SYSTEM "You are ChatGLM3."' in lines
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == ['PARAMETER stop "<|user|>"', 'PARAMETER stop "<|observation|>"',
                     'PARAMETER stop "<|endoftext|>"']
    assert {"PARAMETER temperature 0", "PARAMETER num_predict 64", "PARAMETER repeat_penalty 1"} <= set(lines)
    assert not any(line.startswith(("PARAMETER top_p", "PARAMETER top_k")) for line in lines)
    assert _modelfile_template(greedy) == (
        '{{ if .System }}<|system|>\n{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
        '<|user|>\n{{ .Content }}<|assistant|>{{ else if eq .Role "assistant" }}\n{{ .Content }}{{ end }}{{ end }}')

    sampling = GenerateArgs(do_sample=True, temperature=0.6, top_p=0.8, repetition_penalty=1.2)
    text = write_modelfile(tmp_path / "b", "m.gguf", "default", tokenizer, sampling).read_text(encoding="utf-8")
    assert "SYSTEM" not in text
    assert 'PARAMETER stop "\nHuman:"\n' in text  # a newline inside quotes: Ollama keeps it
    for line in ("PARAMETER temperature 0.6", "PARAMETER top_p 0.8", "PARAMETER top_k 0",
                 "PARAMETER repeat_penalty 1.2", "PARAMETER repeat_last_n -1", "PARAMETER num_predict 256"):
        assert line in text.splitlines()

    beside = tmp_path / "e"  # the GGUF already there: its add_bos_token is read (ChatGLM's: false)
    beside.mkdir()
    (beside / "m.gguf").symlink_to(ggufs("glm")[1])
    assert _gguf_add_bos(beside / "m.gguf") is False and _gguf_add_bos(beside / "none.gguf") is None
    assert _modelfile_template(write_modelfile(beside, "m.gguf", "chatglm3", tokenizer, GenerateArgs())) \
        == _modelfile_template(greedy)

    auto = write_modelfile(tmp_path / "f", "m.gguf", "auto", tokenizer, GenerateArgs()).read_text()
    assert "(template 'tokenizer')" in auto.splitlines()[0]  # the tiny tokenizer has a chat template

    quoted = write_modelfile(tmp_path / "c", "m.gguf", "vicuna", tokenizer, GenerateArgs(), system='Say "hi".')
    assert 'SYSTEM """Say "hi"."""' in quoted.read_text(encoding="utf-8").splitlines()
    with pytest.raises(ConfigError, match="system prompt"):
        write_modelfile(tmp_path / "d", "m.gguf", "vicuna", tokenizer, GenerateArgs(), system='a """ b')


def test_chat_template_bos_is_left_to_the_runtime(tiny_models):
    """A chat template that writes the BOS token itself (Llama 3's ``{{ bos_token }}``):
    the TEMPLATE leaves it out where llama.cpp adds BOS (``add_bos_token``), else keeps it."""
    from transformers import AutoTokenizer

    from chattune.tiny import CHATML_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_CHAT_TEMPLATE
    for add_bos in (True, None, False):
        go_template, note = ollama_template("tokenizer", tokenizer, add_bos=add_bos)
        assert note is None
        for messages in CONVERSATIONS:
            want = _chattune_prompt("tokenizer", messages, tokenizer)
            assert want.startswith("<|endoftext|><|im_start|>")
            if add_bos is not False:
                want = want[len("<|endoftext|>"):]
            assert _ollama_render(go_template, messages) == want


def test_a_bos_per_turn_is_written_after_the_first(tiny_models):
    """chinese-alpaca-2 puts the tokenizer's BOS before every turn: the runtime adds only the
    first one (add_bos_token), so the TEMPLATE writes the others."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    bos = "<|endoftext|>"
    tokenizer.bos_token = bos
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    for add_bos in (True, False):
        go_template, _ = ollama_template("chinese-alpaca-2", tokenizer, add_bos=add_bos)
        for messages in CONVERSATIONS:
            want = _chattune_prompt("chinese-alpaca-2", messages, tokenizer, specials=bos)
            assert want.startswith(bos + "[INST] <<SYS>>")
            if add_bos:
                want = want[len(bos):]
            assert _ollama_render(go_template, messages) == want
    history = CONVERSATIONS[3]
    assert _ollama_render(go_template, history).count(bos + "[INST] ") == 3


def test_modelfile_stops_of_the_new_templates(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("qwen2"))

    def stops(template):
        text = write_modelfile(tmp_path / template, "m.gguf", template, tokenizer, GenerateArgs()).read_text()
        return [line.removeprefix("PARAMETER stop ") for line in text.splitlines() if line.startswith("PARAMETER stop")]

    assert stops("alpaca") == ['"### Instruction:"', '"<|im_end|>"']
    assert stops("chinese-alpaca-2") == ['"[INST]"', '"<|im_end|>"']
    assert stops("moss") == ['"<eom>"', '"<eoh>"', '"<|Human|>:"', '"<|im_end|>"']
    assert stops("gpt4all") == ['"### Human"', '"### Assistant"', '"<|im_end|>"']
    moss = (tmp_path / "moss" / "Modelfile").read_text(encoding="utf-8")
    assert "Capabilities and tools that MOSS can possess.{{ end }}\n" in moss  # its meta_instruction, quotes and all
    assert '"in this context a human might say...", "some people might think..."' in _modelfile_template(
        tmp_path / "moss" / "Modelfile")


def test_untranslatable_chat_template_gets_the_generic_one(tiny_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    # questions numbered by their place in the conversation: no fixed prefix per message
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q{{ loop.index }}: {{ m['content'] }}\nA: "
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}")
    go_template, note = ollama_template("tokenizer", tokenizer)
    assert note and "could not be translated" in note
    assert go_template == ollama_template("default", tokenizer)[0]
    text = write_modelfile(tmp_path, "m.gguf", "tokenizer", tokenizer, GenerateArgs()).read_text()
    assert "# NOTE: the tokenizer's chat template could not be translated" in text
    assert "could not be translated" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chatglm3_tokenizer(tmp_path_factory):
    """chattune's ChatGLM3 tokenizer, as loaded from the folder converted from THUDM's (once
    for the module: every template reads the same one)."""
    from transformers import AutoTokenizer

    from chattune.chatglm import native_model_path
    from tests.chatglm.thudm_folder import build_thudm_folder

    if not (FIXTURES / "chatglm3-6b" / "config.json").is_file():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES}")
    root = tmp_path_factory.mktemp("modelfile-chatglm3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_CACHE", str(root / "cache"))
        native = native_model_path(str(build_thudm_folder(root / "m", FIXTURES / "chatglm3-6b")))
    return AutoTokenizer.from_pretrained(native)


@pytest.mark.parametrize("template", NAMED)
def test_prefix_tokens_of_the_tokenizer_are_written(template, chatglm3_tokenizer):
    """chattune's ChatGLM3 tokenizer adds ``[gMASK]`` ``sop`` to every text (chattune's
    ``specials`` piece): each TEMPLATE writes them where chattune places them (first, or
    closing the last prompt for the ChatGLM-6B-style templates)."""
    tokenizer = chatglm3_tokenizer
    go_template, note = ollama_template(template, tokenizer)
    assert note is None and "[gMASK]sop" in go_template
    for messages in CONVERSATIONS:
        assert _ollama_render(go_template, messages) == _chattune_prompt(
            template, messages, tokenizer, specials="[gMASK]sop"), messages


