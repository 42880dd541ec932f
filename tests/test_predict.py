"""``chattune predict``: one JSON line per input row, the answers ``generate`` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.data.images import NOT_VISION
from chattune.inference.generate import generate
from chattune.inference.runs import LoadOptions, load_run
from tests.inference.test_generate import run_dir  # noqa: F401  (the module's trained run)


@pytest.fixture(scope="module")
def run(run_dir):  # noqa: F811
    return load_run(str(run_dir))


def test_predict_writes_one_line_per_input_row(run_dir, tmp_path):  # noqa: F811
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


def test_predict_answers_are_generate_s(run_dir, run, tmp_path):  # noqa: F811
    data = tmp_path / "in.jsonl"
    questions = ["Who are you?", "What is the capital of Veloria?", "你是谁？"]
    data.write_text("\n".join(json.dumps({"instruction": q, "output": "x"}) for q in questions) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--batch-size", "3"]) == 0
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert predicted == generate(run, [[{"role": "user", "content": q}] for q in questions])


def test_predict_limit_and_a_missing_file(run_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(5)) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), "--limit", "2",
                 "--max-new-tokens", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["predict", str(run_dir), "--data", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_predict_takes_the_generation_flags(run_dir, run, tmp_path):  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "What is the capital of Veloria?", "output": "x"}) + "\n")
    out = tmp_path / "pred.jsonl"
    asked = [[{"role": "user", "content": "What is the capital of Veloria?"}]]
    for flags, settings in ((["--max-new-tokens", "1"], {"max_new_tokens": 1}),
                            (["--max-new-tokens", "6", "--repetition-penalty", "1.3"],
                             {"max_new_tokens": 6, "repetition_penalty": 1.3}),
                            (["--temperature", "1.0", "--top-k", "5", "--seed", "3"],
                             {"temperature": 1.0, "top_k": 5, "seed": 3})):
        assert main(["predict", str(run_dir), "--data", str(data), "--out", str(out), *flags]) == 0
        assert json.loads(out.read_text())["prediction"] == generate(run, asked, **settings)[0]


# -- tool calls: the record's tools in the prompt, the answer's calls parsed and scored -------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERT = {"type": "function", "function": {"name": "convert_currency", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}, "from_currency": {"type": "string"},
                                     "to_currency": {"type": "string"}}}}}
TOOLS = [WEATHER, CONVERT]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
DOLLARS = {"name": "convert_currency", "arguments": {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}}
CALL_ROWS = [  # (question, the reference call, the handcrafted answer, name right, arguments right)
    ("Weather in Paris, key order?", PARIS,
     '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>', True, True),
    ("100 USD in EUR, 100.0?", DOLLARS,
     '<tool_call>{"name": "convert_currency", "arguments": {"to_currency": "EUR", "amount": 100.0, '
     '"from_currency": "USD"}}</tool_call>', True, True),
    ("Weather in Paris, wrong name?", PARIS,
     '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>', False, False),
    ("Weather in Paris, wrong argument?", PARIS,
     '<tool_call>{"name": "get_weather", "arguments": {"city": "London"}}</tool_call>', True, False),
    ("100 USD in EUR, a string amount?", DOLLARS,
     '<tool_call>{"name": "convert_currency", "arguments": {"amount": "100", "from_currency": "USD", '
     '"to_currency": "EUR"}}</tool_call>', True, False),
    ("Weather in Paris, unparseable?", PARIS, '<tool_call>{"name": get_weather}</tool_call>', False, False),
    ("Weather in Paris, arguments not JSON?", PARIS,
     '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>', True, False),
    ("Weather in Paris, no call?", PARIS, "It is sunny in Paris.", False, False),
]
RESULT = '{"city": "Paris", "temperature_c": 21}'
ANSWER = "It is 21°C in Paris."


def _openai_call(call: dict) -> dict:
    return {"id": "call_0", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}


def tool_rows() -> list[dict]:
    """OpenAI rows with tools: one per CALL_ROWS (ending with the call), one ending with the
    answer after the call's result, and one plain row without tools."""
    rows = [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant", "content": None, "tool_calls": [_openai_call(call)]}],
             "tools": TOOLS} for question, call, *_ in CALL_ROWS]
    rows.append({"messages": [{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [_openai_call(PARIS)]},
                              {"role": "tool", "tool_call_id": "call_0", "content": RESULT},
                              {"role": "assistant", "content": ANSWER}], "tools": TOOLS})
    rows.append({"messages": [{"role": "user", "content": "Who are you?"},
                              {"role": "assistant", "content": "I am Lumi."}]})
    return rows


HANDCRAFTED = {question: text for question, _, text, *_ in CALL_ROWS} | {"Weather in Paris?": ANSWER,
                                                                          "Who are you?": "I am Lumi."}


def scripted_answers(monkeypatch, module, seen: list, base_says: str | None = None) -> None:
    """``module.answer`` gives the handcrafted answer of each conversation's question (prompt ids
    from the run, with the tools it was given; ``seen`` gets (question, tools)); the ``base``
    profile says ``base_says`` to everything when it is given."""
    from types import SimpleNamespace

    def fake(run, conversations, profile=None, *, tools=None, **settings):
        chosen = run.profile(profile)
        seqs = []
        for messages, offered in zip(conversations, tools or [None] * len(conversations), strict=True):
            question = next(m["content"] for m in messages if m["role"] == "user")
            seen.append((question, offered))
            text = base_says if base_says is not None and chosen.name == "base" else HANDCRAFTED[question]
            seqs.append(SimpleNamespace(text=SimpleNamespace(text=text), generated=run.tokenizer(text)["input_ids"],
                                        prompt_ids=run.prompt_ids(messages, chosen, None, offered), error=None))
        return seqs

    monkeypatch.setattr(module, "answer", fake)


def test_predict_scores_calls_on_handcrafted_answers(run_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    import chattune.predict

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tool_rows()))
    seen = []
    scripted_answers(monkeypatch, chattune.predict, seen)
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--template", "default", "--data", str(data), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    functions = [tool["function"] for tool in TOOLS]
    assert [tools for _, tools in seen] == [functions] * (len(CALL_ROWS) + 1) + [None]  # the record's tools
    for line, (question, call, text, name_ok, args_ok) in zip(lines, CALL_ROWS, strict=False):
        assert line["prompt"] == [{"role": "user", "content": question}] and line["prediction"] == text
        assert line["reference"] == "" and line["reference_calls"] == [call]
        assert (line["tool_name_match"], line["tool_args_match"]) == (100.0 * name_ok, 100.0 * args_ok), question
    assert lines[0]["calls"] == [PARIS]
    assert lines[1]["calls"] == [{"name": "convert_currency",
                                  "arguments": {"to_currency": "EUR", "amount": 100.0, "from_currency": "USD"}}]
    assert lines[5]["calls"] == [] and "not a call" in lines[5]["call_errors"][0]  # unparseable: no call
    assert lines[6]["calls"] == [{"name": "get_weather", "arguments": '{"city": }'}]  # as the model wrote them
    assert "not valid JSON" in lines[6]["call_errors"][0]
    answered, plain = lines[len(CALL_ROWS)], lines[-1]
    assert answered["reference"] == ANSWER and answered["calls"] == [] and "reference_calls" not in answered
    assert "tool_name_match" not in answered and answered["prompt"][-1] == {"role": "tool", "content": RESULT,
                                                                          "name": "get_weather"}
    assert set(plain) == {"source", "prompt", "reference", "prediction"}
    assert "8 rows with a tool call as reference: tool_name_match 62.5%, tool_args_match 25.0%" \
        in capsys.readouterr().out


def test_predict_shows_the_record_s_tools_in_the_prompt(run_dir, run, tmp_path):  # noqa: F811
    data = tmp_path / "tools.jsonl"
    rows = tool_rows()[:1] + tool_rows()[-1:]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--template", "default", "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tuned = load_run(str(run_dir), LoadOptions(template="default"))
    functions = [tool["function"] for tool in TOOLS]
    question = [{"role": "user", "content": CALL_ROWS[0][0]}]
    assert lines[0]["prediction"] == generate(tuned, [question], tools=[functions], max_new_tokens=6)[0]
    assert 'Tools: [{"name": "get_weather"' in tuned.decode(tuned.prompt_ids(question, tools=functions))
    assert "calls" in lines[0] and "calls" not in lines[1]


@pytest.mark.parametrize(("out", "message"), [
    ("/proc/x.jsonl", "--out: cannot write /proc/x.jsonl ("),
    ("afile/x.jsonl", "--out: {t}/afile/x.jsonl: {t}/afile is a file, not a folder"),
    ("adir", "--out: {t}/adir is a folder; expected a file path"),
])
def test_an_unwritable_out_is_refused_before_the_run_loads(out, message, tmp_path, capsys, monkeypatch):
    import chattune.cli

    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")

    def no_loading(args):
        raise AssertionError("the run was loaded")

    monkeypatch.setattr(chattune.cli, "_load_run", no_loading)
    target = out if out.startswith("/") else str(tmp_path / out)
    assert main(["predict", "never-loaded", "--data", str(data), "--out", target]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("chattune: error: " + message.format(t=tmp_path)), err


def test_a_negative_limit_is_refused(run, tmp_path):
    from chattune.errors import ConfigError
    from chattune.predict import predict_file

    with pytest.raises(ConfigError, match=r"^--limit: must be >= 1, got -1$"):
        predict_file(run, "unused.jsonl", str(tmp_path / "pred.jsonl"), limit=-1)


def test_a_write_that_fails_midway_leaves_no_output(run, tmp_path, monkeypatch):
    import errno

    import chattune.predict
    from chattune.errors import ConfigError

    def disk_full(run, rows, handle, *args):
        handle.write("{}\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chattune.predict, "_predict_rows", disk_full)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    out = tmp_path / "pred.jsonl"
    with pytest.raises(ConfigError, match=r"--out .*pred\.jsonl: cannot write the predictions \(No space left"):
        chattune.predict.predict_file(run, str(data), str(out))
    assert list(tmp_path.iterdir()) == [data]  # neither pred.jsonl nor its partial file


# -- rows with images ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm(tiny_vlms):
    """The tiny LLaVA, a bare base model."""
    return load_run(str(tiny_vlms("llava")))


def image_rows(folder: Path) -> Path:
    """A data file mixing text rows, image rows (one with two images), and rows whose image is
    missing or whose placeholders and images differ in number."""
    from PIL import Image

    (folder / "pics").mkdir()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(folder / "pics" / "red.png")
    Image.new("RGB", (30, 40), (30, 60, 220)).save(folder / "pics" / "blue.png")
    rows = [{"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}],
             "images": ["pics/red.png"]},
            {"instruction": "Who are you?", "output": "I am Lumi."},
            {"messages": [{"role": "user", "content": "<image>This one?"}, {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "And <image>this?"}, {"role": "assistant", "content": "blue"}],
             "images": ["pics/red.png", "pics/blue.png"]},
            {"messages": [{"role": "user", "content": "<image>Gone?"}], "images": ["pics/gone.png"]},
            {"messages": [{"role": "user", "content": "<image><image>Two?"}], "images": ["pics/red.png"]}]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_predict_answers_image_rows_with_their_images(tiny_vlms, vlm, image_data, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(tiny_vlms("llava")), "--data", str(image_data), "--out", str(out),
                 "--batch-size", "5", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows = json.loads(image_data.read_text())
    assert len(lines) == len(rows) == 12 and not any("error" in line for line in lines)
    for line, row in zip(lines, rows, strict=True):
        assert line["prompt"] == [{"role": "user", "content": "<image>What colour is it?",
                                   "images": [str(image_data.parent / row["images"][0])]}]
        assert line["reference"] == row["messages"][1]["content"] and line["prediction"]
    for start in (0, 5, 10):  # batched as predict batches them
        batch = lines[start:start + 5]
        assert [line["prediction"] for line in batch] == generate(vlm, [line["prompt"] for line in batch],
                                                                  max_new_tokens=4, do_sample=False)


def test_predict_mixes_image_and_text_rows_and_reports_bad_images(vlm, tmp_path):
    from chattune.predict import predict_file

    data = image_rows(tmp_path)
    out = tmp_path / "pred.jsonl"
    assert predict_file(vlm, str(data), str(out), batch_size=8, max_new_tokens=3, log=lambda *_: None) == 5
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    red, blue = str(tmp_path / "pics" / "red.png"), str(tmp_path / "pics" / "blue.png")
    assert lines[0]["prompt"][0]["images"] == [red] and "prediction" in lines[0] and "error" not in lines[0]
    assert lines[1]["prompt"] == [{"role": "user", "content": "Who are you?"}] and "prediction" in lines[1]
    two = lines[2]["prompt"]
    assert [m.get("images") for m in two] == [[red], None, [blue]] and lines[2]["reference"] == "blue"
    assert "image" in lines[3]["error"] and "gone.png not found" in lines[3]["error"] and "prediction" not in lines[3]
    assert "2 <image> placeholders in the messages but 1 image" in lines[4]["error"]
    expected = generate(vlm, [lines[0]["prompt"], lines[1]["prompt"], two], max_new_tokens=3, do_sample=False)
    assert [lines[i]["prediction"] for i in (0, 1, 2)] == expected


def test_image_rows_on_a_text_only_model_are_per_row_errors(run, tmp_path):
    from chattune.predict import predict_file

    data = image_rows(tmp_path)
    out = tmp_path / "pred.jsonl"
    assert predict_file(run, str(data), str(out), max_new_tokens=3, log=lambda *_: None) == 5
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for i in (0, 2):
        assert lines[i]["error"] == f"{lines[i]['source']}: {NOT_VISION}"
        assert "prediction" not in lines[i] and lines[i]["reference"] in ("red", "blue")
    assert "error" not in lines[1] and lines[1]["prediction"] == generate(
        run, [lines[1]["prompt"]], max_new_tokens=3, do_sample=False)[0]


def test_an_image_row_that_does_not_fit_is_its_own_error(vlm, tmp_path):
    """Images whose tokens alone overflow the context: that row's error; the batch's other rows
    are answered."""
    import dataclasses

    from chattune.predict import predict_file

    small = dataclasses.replace(vlm, context_length=16)
    data = image_rows(tmp_path)
    out = tmp_path / "pred.jsonl"
    assert predict_file(small, str(data), str(out), max_new_tokens=2, log=lambda *_: None) == 5
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "the prompt is at least" in lines[0]["error"] and "prediction" not in lines[0]
    assert "error" not in lines[1] and isinstance(lines[1]["prediction"], str)
