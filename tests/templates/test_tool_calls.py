"""parse_calls, streamable and call_prefix: each template's call text read back (golden strings),
and the round trip render -> parse for the three templates that render tools."""

from __future__ import annotations

import json

import pytest

from chattune.templates.pieces import render_text
from chattune.templates.registry import render
from chattune.templates.tool_calls import (
    ParsedCall,
    ParsedOutput,
    call_prefix,
    parse_calls,
    python_call_arguments,
    streamable,
)
from tests.templates.tool_cases import PARALLEL, TOOLS, WEATHER, glm3_tokenizer, qwen_tokenizer

TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
TWO = [*TOOLS, TIME]
PARIS = ParsedCall("get_weather", '{"city": "Paris"}')
ROME = ParsedCall("get_weather", '{"city": "Rome"}')
NAMED = {"type": "function", "function": {"name": "get_weather"}}


# -- default ---------------------------------------------------------------------------------

DEFAULT = {
    "a call": ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
               ParsedOutput(None, [PARIS])),
    "text, then parallel calls": (
        'Checking both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
        ParsedOutput("Checking both.", [PARIS, ROME])),
    "no call": ("It is sunny.", ParsedOutput("It is sunny.")),
    "other spacing and key order": ('<tool_call> {"arguments":{"city":"Paris"},"name":"get_weather"} </tool_call>',
                                    ParsedOutput(None, [PARIS])),
    "no arguments": ('<tool_call>{"name": "get_time"}</tool_call>', ParsedOutput(None, [ParsedCall("get_time", "{}")])),
    "arguments as a JSON text": ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'
                                 '</tool_call>', ParsedOutput(None, [PARIS])),
    "parameters for arguments": ('<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>',
                                 ParsedOutput(None, [PARIS])),
    "no closing tag (cut by a stop string)": ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                              ParsedOutput(None, [PARIS])),
    "the call's closing brace missing": ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}'
                                         '</tool_call>', ParsedOutput(None, [PARIS])),
    "arguments not JSON": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call>',
        ParsedOutput(None, [ParsedCall("get_weather", '{"city": Paris}', False)],
                     ["function get_weather: arguments are not valid JSON: Expecting value (character 9)"])),
    "arguments cut off": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',
        ParsedOutput(None, [ParsedCall("get_weather", '{"city": "Pa', False)],
                     ["function get_weather: arguments are not valid JSON: Unterminated string starting at "
                      "(character 9)"])),
    "arguments NaN": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": NaN}}</tool_call>',
        ParsedOutput(None, [ParsedCall("get_weather", '{"city": NaN}', False)],
                     ["function get_weather: arguments are not valid JSON: NaN is not a JSON number"])),
    "arguments not an object": (
        '<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>',
        ParsedOutput(None, [ParsedCall("get_weather", '["Paris"]', False)],
                     ["function get_weather: arguments are not a JSON object (got list)"])),
    "cut before the arguments": (
        '<tool_call>{"name": "get_weather"',
        ParsedOutput(None, [ParsedCall("get_weather", "", False)],
                     ["function get_weather: the call has no arguments (its text ends before them)"])),
    "a function not offered": (
        '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
        ParsedOutput(None, [ParsedCall("launch", "{}")],
                     ["function 'launch' is not one of the request's tools (get_weather, get_time)"])),
    "garbage in a block": (
        "<tool_call>not a call</tool_call> and text",
        ParsedOutput("<tool_call>not a call</tool_call> and text", [],
                     ['a <tool_call> block is not a call {"name": ..., "arguments": {...}}; it is returned as content'])),
    "a name cut off": ('<tool_call>{"name": "get_wea', ParsedOutput('<tool_call>{"name": "get_wea', [], [
        'a <tool_call> block is not a call {"name": ..., "arguments": {...}}; it is returned as content'])),
    "a call, then garbage": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>{{{',
        ParsedOutput("<tool_call>{{{", [PARIS],
                     ['a <tool_call> block is not a call {"name": ..., "arguments": {...}}; it is returned as content'])),
    "a block opened inside a block": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}\n<tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Rome"}}</tool_call>', ParsedOutput(None, [PARIS, ROME])),
}


@pytest.mark.parametrize("case", list(DEFAULT))
def test_default_golden(case):
    text, expected = DEFAULT[case]
    assert parse_calls("default", text, TWO) == expected


@pytest.mark.parametrize("text", ["", "<", "<tool_call>", "{", "\x00\ud800", "<tool_call>" * 3 + "}" * 5,
                                  "<tool_call>" + "[" * 100_000, '<tool_call>{"name": "\\ud800", "arguments": 1e999}'])
@pytest.mark.parametrize("template", ["default", "tokenizer", "chatglm3"])
def test_garbage_never_raises(template, text):
    parsed = parse_calls(template, text, TWO)
    assert isinstance(parsed, ParsedOutput)
    if not parsed.calls:
        assert parsed.content == text


# -- tokenizer (Hermes / Qwen2, GLM-4) ----------------------------------------------------------

TOKENIZER = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               ParsedOutput(None, [PARIS])),
    "hermes, parallel": (
        'Both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        ParsedOutput("Both.", [PARIS, ROME])),
    "glm-4": ('get_weather\n{"city": "Paris"}', ParsedOutput(None, [PARIS])),
    "glm-4, bad arguments": ("get_weather\n{city: Paris}", ParsedOutput(None, [
        ParsedCall("get_weather", "{city: Paris}", False)],
        ["function get_weather: arguments are not valid JSON: Expecting property name enclosed in double quotes "
         "(character 1)"])),
    "glm-4 form needs an offered name": ('launch\n{"x": 1}', ParsedOutput('launch\n{"x": 1}')),
    "text": ("Hello\nthere", ParsedOutput("Hello\nthere")),
}


@pytest.mark.parametrize("case", list(TOKENIZER))
def test_tokenizer_golden(case):
    text, expected = TOKENIZER[case]
    assert parse_calls("tokenizer", text, TWO) == expected


# -- chatglm3 --------------------------------------------------------------------------------------

CHATGLM3 = {
    "a call": ("get_weather\n```python\ntool_call(city='Paris')\n```", ParsedOutput(None, [PARIS])),
    "text, <|assistant|>, a call": (
        "\nChecking.<|assistant|>get_weather\n```python\ntool_call(city='Paris')\n```",
        ParsedOutput("Checking.", [PARIS])),
    "literals to JSON": ("get_weather\n```python\ntool_call(city=\"it's\", days=(1, 2), metric=True, x=None, "
                         "m={'a': 1.5})\n```", ParsedOutput(None, [ParsedCall(
                             "get_weather", '{"city": "it\'s", "days": [1, 2], "metric": true, "x": null, '
                             '"m": {"a": 1.5}}')])),
    "no closing fence": ("get_weather\n```python\ntool_call(city='Paris')", ParsedOutput(None, [PARIS])),
    "not a literal": ("get_weather\n```python\ntool_call(city=Paris)\n```", ParsedOutput(None, [
        ParsedCall("get_weather", "city=Paris", False)],
        ["function get_weather: arguments are not valid Python keyword literals (tool_call(name=value, ...)): "
         "city=Paris is not a Python literal"])),
    "positional": ("get_weather\n```python\ntool_call('Paris')\n```", ParsedOutput(None, [
        ParsedCall("get_weather", "'Paris'", False)],
        ["function get_weather: arguments are not valid Python keyword literals (tool_call(name=value, ...)): "
         "expected keyword arguments only, tool_call(name=value, ...)"])),
    "cut off": ("get_weather\n```python\ntool_call(city='Par", ParsedOutput(None, [
        ParsedCall("get_weather", "city='Par", False)],
        ["function get_weather: arguments are not valid Python keyword literals (tool_call(name=value, ...)): "
         "SyntaxError: unterminated string literal (detected at line 1) (<unknown>, line 1)"])),
    "an answer": ("It is sunny.", ParsedOutput("It is sunny.")),
    "an answer with code": ("Like this:\n```python\nprint(1)\n```", ParsedOutput("Like this:\n```python\nprint(1)\n```")),
    "two answers, marker dropped": ("\nOne.<|assistant|>\nTwo.", ParsedOutput("\nOne.\nTwo.")),
}


@pytest.mark.parametrize("case", list(CHATGLM3))
def test_chatglm3_golden(case):
    text, expected = CHATGLM3[case]
    assert parse_calls("chatglm3", text, TWO) == expected


def test_python_call_arguments():
    assert python_call_arguments("tool_call(a=1, b='x', c=[1, {'k': None}])") == {"a": 1, "b": "x",
                                                                               "c": [1, {"k": None}]}
    for code in ("print(a=1)", "tool_call(**{'a': 1})", "tool_call(a=f())", "import os"):
        with pytest.raises((ValueError, SyntaxError)):
            python_call_arguments(code)


# -- round trips: what a template trains, parsed back -----------------------------------------------

def generated(template: str, messages: list[dict], tokenizer=None, tools=TOOLS) -> str:
    """The text a model trained on ``messages`` writes for their last (calling) assistant message:
    the rendering past the prompt, up to the end token it stops on."""
    prompt = render_text(render(template, messages[:-1], tokenizer, tools))
    whole = render_text(render(template, messages, tokenizer, tools))
    assert whole.startswith(prompt)
    text = whole[len(prompt):]
    for end in ("<|observation|>", "<|im_end|>"):
        text = text.split(end)[0]
    return text


def calling(conversation: list[dict]) -> list[dict]:
    """The conversation up to and with its first calling assistant message."""
    at = next(i for i, m in enumerate(conversation) if m.get("tool_calls"))
    return conversation[:at + 1]


def expected_calls(message: dict) -> list[ParsedCall]:
    return [ParsedCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False))
            for call in message["tool_calls"]]


ONE_CALL_WITH_TEXT = [PARALLEL[0], {**PARALLEL[1], "tool_calls": PARALLEL[1]["tool_calls"][:1]}]


@pytest.mark.parametrize("conversation", [WEATHER, PARALLEL, ONE_CALL_WITH_TEXT], ids=["call", "parallel", "text"])
@pytest.mark.parametrize("template", ["default", "tokenizer", "chatglm3"])
def test_round_trip_render_then_parse(char_tokenizer, template, conversation):
    messages = calling(conversation)
    if template == "chatglm3" and len(messages[-1]["tool_calls"]) > 1:
        pytest.skip("chatglm3 renders one call per message")
    tokenizer = {"tokenizer": qwen_tokenizer(char_tokenizer), "chatglm3": glm3_tokenizer(char_tokenizer)}.get(template)
    text = generated(template, messages, tokenizer)
    if template == "chatglm3":  # the server keeps <|assistant|> in the text; the stream strips it
        text = text.strip()
    parsed = parse_calls(template, text, TOOLS)
    assert parsed == ParsedOutput(messages[-1]["content"] or None, expected_calls(messages[-1]))


@pytest.mark.parametrize("template", ["default", "tokenizer", "chatglm3"])
def test_a_forced_prefix_opens_the_call_the_template_trains(char_tokenizer, template):
    """The named prefix is the start of the rendered call (up to its arguments, less a trailing
    space); the prefix and the rest of the call parse back to the call."""
    tokenizer = {"tokenizer": qwen_tokenizer(char_tokenizer), "chatglm3": glm3_tokenizer(char_tokenizer)}.get(template)
    text = generated(template, calling(WEATHER), tokenizer)
    pieces = call_prefix(template, NAMED, TOOLS, tokenizer)
    prefix = "".join(p.text for p in pieces)
    assert pieces and all(p.role == "tool_call" for p in pieces)
    assert text.startswith(prefix) and prefix.rstrip() == prefix
    assert parse_calls(template, prefix + text[len(prefix):].lstrip(), TOOLS).calls == [PARIS]


def test_call_prefix_per_template(char_tokenizer):
    qwen = qwen_tokenizer(char_tokenizer)
    assert [p.text for p in call_prefix("default", NAMED, TWO)] == ['<tool_call>{"name": "get_weather", "arguments":']
    assert [p.text for p in call_prefix("default", "required", TWO)] == ['<tool_call>{"name":']
    assert [p.text for p in call_prefix("tokenizer", "required", TWO, qwen)] == ['<tool_call>\n{"name":']
    assert [p.text for p in call_prefix("chatglm3", NAMED, TWO)] == ["get_weather\n", "```python\ntool_call("]
    assert call_prefix("chatglm3", "required", TWO) == []  # calls begin with the bare name
    # required with one tool is that tool, named
    assert call_prefix("chatglm3", "required", TOOLS) == call_prefix("chatglm3", NAMED, TOOLS)
    assert call_prefix("default", "required", TOOLS) == call_prefix("default", NAMED, TOOLS)
    for choice in ("auto", "none", None):
        assert call_prefix("default", choice, TWO) == []
    quoted = {"type": "function", "function": {"name": 'say "hi"'}}
    assert call_prefix("default", quoted, [{"name": 'say "hi"'}])[0].text.startswith('<tool_call>{"name": "say \\"hi\\""')


# -- streaming ----------------------------------------------------------------------------------------

def test_streamable_stops_where_a_call_may_begin():
    assert streamable("default", "Checking both.", TOOLS) == len("Checking both.")
    assert streamable("default", "Checking both.\n<tool", TOOLS) == len("Checking both.")
    assert streamable("default", "Checking both.\n<tool_call>{", TOOLS) == len("Checking both.")
    assert streamable("default", "a < b", TOOLS) == len("a < b")
    assert streamable("chatglm3", "It is sunny.", TOOLS) == 0
    assert streamable("tokenizer", "get_wea", TOOLS) == 0  # may become GLM-4's name line
    assert streamable("tokenizer", "get_weather\n{", TOOLS) == 0
    assert streamable("tokenizer", "Hello\nthere", TOOLS) == len("Hello\nthere")


@pytest.mark.parametrize("text", list(t for t, _ in DEFAULT.values()) + ["Hi <tool_call>x</tool_call> there"])
def test_what_was_streamed_is_the_start_of_the_content(text):
    """Content sent before the end is never taken back: at every length, what streamable allows
    is the start of the final content."""
    final = parse_calls("default", text, TWO).content or ""
    for n in range(len(text) + 1):
        assert final.startswith(text[:streamable("default", text[:n], TWO)])
