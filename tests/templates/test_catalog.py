"""``chattune templates``: every template listed with its description, source and rendering;
one conversation rendered with trained spans marked."""

from __future__ import annotations

import json

from chattune.cli import main
from chattune.templates.registry import NAMED_TEMPLATES


def test_the_list_shows_every_template_with_its_source_and_rendering(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    for name, template in NAMED_TEMPLATES.items():
        assert f"\n{name}: " in "\n" + out, name
        assert f"  source: {template.source}" in out, name
    assert out.count("renders (system + two turns; ⟪trained⟫):") == len(NAMED_TEMPLATES)
    assert "tokenizer: the tokenizer's own chat template" in out


def test_a_conversation_is_rendered_with_its_trained_spans_marked(tmp_path, capsys):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(messages))
    assert main(["templates", "chatglm3", "--messages", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        "<specials><|system|>\nS<|user|>\nQ1<|assistant|>⟪\nA1⟫<|user|>\nQ2<|assistant|>⟪\nA2<eos>⟫\n")
    assert main(["templates", "tutorial-alpaca", "--messages", str(path)]) == 0
    assert "### Response:\n⟪A2\nEND\n<eos>⟫" in capsys.readouterr().out


def test_an_alpaca_data_file_and_a_real_tokenizer(tiny_models, tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    assert main(["templates", "tutorial-alpaca", "--messages", str(path), "--model", str(tiny_models("glm4"))]) == 0
    out = capsys.readouterr().out
    assert "### Instruction:\nAdd\n\n### Input:\n1 and 2\n\n### Response:\n⟪3\nEND\n<|endoftext|>⟫" in out


def test_unknown_names_and_bad_files(tmp_path, capsys):
    assert main(["templates", "nope"]) == 2
    assert "unknown template 'nope'; expected" in capsys.readouterr().err
    assert main(["templates", "tokenizer"]) == 2
    assert "add --model PATH" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["templates", "chatglm3", "--messages", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
