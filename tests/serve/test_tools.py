"""Tool calls over the API, with the official ``openai`` client: ``tools`` and ``tool_choice`` in,
OpenAI ``tool_calls`` out (whole and streamed), histories with calls and results, and the 400s.

A random tiny model writes no calls, so most tests script the engine's output: the ``scripted``
fixture replaces the decoder's sampling with the tokens of a given text (then EOS), and the
rest of the path (prefill, stop tokens and strings, text streaming, parsing, the response) is
the server's own. The forced-call tests run the real tiny model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from chattune.templates.tool_calls import call_prefix
from tests.serve import helpers
from tests.templates.tool_cases import QWEN_TOOLS_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
FUNCTIONS = [WEATHER["function"], TIME["function"]]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
ROME = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(client, model="tpl-default", **kw):
    """A greedy chat completion with room for a scripted output."""
    return helpers.chat(client, model, **{"max_tokens": 200, **kw})


def streamed(client, **kw):
    """A streamed chat completion: its chunks, and the official client's accumulation of them."""
    chunks = list(chat(client, stream=True, **kw))
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    try:
        return chunks, state.get_final_completion()
    except openai.LengthFinishReasonError:  # (it will not parse a cut output; the snapshot is the same)
        return chunks, state.current_completion_snapshot


def errors_of(response) -> list[str]:
    """The ``chattune.tool_call_errors`` of a response or chunk ([] when there are none)."""
    return ((response.model_extra or {}).get("chattune") or {}).get("tool_call_errors", [])


def fed_prompt(server, prefilled, model: str) -> list[int]:
    fed = [ids for adapter, ids in prefilled if adapter == server.served.profiles[model].adapter]
    assert len(fed) == 1
    return fed[0]


# -- calls out -----------------------------------------------------------------------------------

def test_a_call_comes_back_as_tool_calls(client, scripted):
    scripted(PARIS)
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert errors_of(reply) == []


def test_a_streamed_call_reassembles_in_the_official_client(client, scripted):
    scripted(PARIS, PARIS)
    whole = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    chunks, final = streamed(client, model="tpl-default", messages=ASK, tools=TOOLS,
                             stream_options={"include_usage": True})
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == whole.choices[0].message.tool_calls[
        0].function.arguments
    assert call.id.startswith("call_") and final.choices[0].finish_reason == "tool_calls"
    assert not final.choices[0].message.content
    opening = next(c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert opening.index == 0 and opening.id == call.id and opening.type == "function"
    assert opening.function.name == "get_weather" and opening.function.arguments == ""
    argument_chunks = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls][1:]
    assert len(argument_chunks) > 1  # the arguments come in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_parallel_calls_with_text_before_them(client, scripted):
    """default: the text, then one call per line, then EOS, which alone ends the output (no stop
    string cuts a second call); streamed, the text goes out before the calls are read."""
    output = f"Checking both.\n{PARIS}\n{ROME}"
    scripted(output, output)
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS, max_tokens=200)
    message = reply.choices[0].message
    assert message.content == "Checking both." and reply.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == ["Paris", "Rome"]
    assert len({c.id for c in message.tool_calls}) == 2
    chunks, final = streamed(client, model="tpl-default", messages=ASK, tools=TOOLS, max_tokens=200)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Checking both."
    assert final.choices[0].message.content == "Checking both."
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls]


def test_a_default_model_that_writes_the_result_itself_is_cut_at_it(client, scripted):
    """default: after its calls the model should write EOS; one that goes on with the result
    (``\nTool: ...``) is stopped there."""
    scripted(PARIS + '\nTool: {"temp": 99}\nAssistant: It is hot.')
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    assert reply.choices[0].message.content is None and reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]


def test_parallel_tool_calls_false_stops_after_the_first_call(client, server, scripted):
    scripted(f"{PARIS}\n{ROME}")
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=200)
    assert [json.loads(c.function.arguments) for c in reply.choices[0].message.tool_calls] == [{"city": "Paris"}]
    assert reply.usage.completion_tokens == len(server.served.tokenizer(PARIS)["input_ids"])


def test_plain_text_with_tools_is_content(client, scripted):
    scripted("It is sunny.", "It is sunny.")
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop" and errors_of(reply) == []
    chunks, final = streamed(client, model="tpl-default", messages=ASK, tools=TOOLS)
    assert final.choices[0].message.content == "It is sunny." and not final.choices[0].message.tool_calls


def test_garbage_is_content_never_a_500(client, scripted):
    garbage = "<tool_call>not a call</tool_call> <tool_call>{{{"
    scripted(garbage, garbage)
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS, max_tokens=100)
    assert reply.choices[0].message.content == garbage and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    assert errors_of(reply) and all("returned as content" in e for e in errors_of(reply))
    chunks, final = streamed(client, model="tpl-default", messages=ASK, tools=TOOLS, max_tokens=100)
    assert final.choices[0].message.content == garbage and errors_of(chunks[-1])


def test_arguments_that_are_not_json_are_returned_and_flagged(client, scripted):
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call>'
    scripted(bad, bad)
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": Paris}'
    assert errors_of(reply) == ["function get_weather: arguments are not valid JSON: Expecting value (character 9)"]
    chunks, final = streamed(client, model="tpl-default", messages=ASK, tools=TOOLS)
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": Paris}'
    assert errors_of(chunks[-1]) == errors_of(reply) and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_to_a_function_not_offered_is_flagged(client, scripted):
    scripted('<tool_call>{"name": "launch", "arguments": {}}</tool_call>')
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS)
    assert reply.choices[0].message.tool_calls[0].function.name == "launch"
    assert errors_of(reply) == ["function 'launch' is not one of the request's tools (get_weather, get_time)"]


def test_chatglm3_call_with_text_before_it(client, server, scripted):
    """ChatGLM3: a text message, ``<|assistant|>`` (kept in the text), the call as Python keyword
    literals, ending at the ``<|observation|>`` token."""
    scripted("\nLet me check.<|assistant|>get_weather\n```python\ntool_call(city='Paris', days=(1, 2))\n```"
             "<|observation|>never read")
    reply = chat(client, "tpl-chatglm3", messages=ASK, tools=TOOLS)
    message = reply.choices[0].message
    assert message.content == "Let me check." and reply.choices[0].finish_reason == "tool_calls"
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}
    scripted("\nJust text.")
    assert chat(client, "tpl-chatglm3", messages=ASK, tools=TOOLS).choices[0].message.content == "Just text."


def test_the_tokenizer_template_reads_hermes_calls(client, server, scripted, prefilled, monkeypatch):
    """A tokenizer whose chat template renders tools (Qwen2.5's): its ``<tool_call>`` blocks come
    back as calls, and ``required`` forces the opening that the chat template itself writes."""
    monkeypatch.setattr(server.served.tokenizer, "chat_template", QWEN_TOOLS_TEMPLATE)
    scripted('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    reply = chat(client, "tpl-tokenizer", messages=ASK, tools=TOOLS)
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "CET"})
    prefilled.clear()
    scripted(' "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    reply = chat(client, "tpl-tokenizer", messages=ASK, tools=TOOLS, tool_choice="required")
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    text = server.served.tokenizer.decode(fed_prompt(server, prefilled, "tpl-tokenizer"))
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name":')
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) in text


GLM4_LIKE_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n{% for tool in tools %}{{ tool.function | tojson }}\n{% endfor %}"
    "{% endif %}{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{% for c in m.tool_calls %}{{ c.function.name }}\n{{ c.function.arguments | tojson }}{% endfor %}"
    "{% elif m.role == 'tool' %}<|observation|>\n{{ m.content }}{% else %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""GLM-4's tool form, shortened: the tools in a system message, a call ``<|assistant|>{name}\n{json}``,
a result ``<|observation|>\n{result}``, an answer ``<|assistant|>\n{text}``."""


def test_the_tokenizer_template_reads_glm4_calls(client, server, scripted, prefilled, monkeypatch):
    """GLM-4's form (no copy of its template: the first line is a tool's name, then JSON), ended
    by the ``<|observation|>`` token; a named choice forces ``{name}\n``; streamed, nothing is
    sent while the first line may be a tool's name."""
    monkeypatch.setattr(server.served.tokenizer, "chat_template", GLM4_LIKE_TEMPLATE)
    scripted('get_weather\n{"city": "Paris"}<|observation|>\n{"temp": 5}')
    reply = chat(client, "tpl-tokenizer", messages=ASK, tools=TOOLS)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    prefilled.clear()
    scripted('{"city": "Oslo"}<|observation|>')
    reply = chat(client, "tpl-tokenizer", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert server.served.tokenizer.decode(fed_prompt(server, prefilled, "tpl-tokenizer")).endswith(
        "<|assistant|>get_weather\n")
    scripted("get_weather is a tool.\nNo call.", 'get_time\n{"zone": "UTC"}')
    chunks, final = streamed(client, model="tpl-tokenizer", messages=ASK, tools=TOOLS)
    assert final.choices[0].message.content == "get_weather is a tool.\nNo call."
    assert not final.choices[0].message.tool_calls
    chunks, final = streamed(client, model="tpl-tokenizer", messages=ASK, tools=TOOLS)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert final.choices[0].message.tool_calls[0].function.name == "get_time"


# -- tool_choice ---------------------------------------------------------------------------------

def test_tool_choice_none_renders_no_tools_and_parses_nothing(client, server, scripted, prefilled):
    scripted(PARIS)
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.content == PARIS and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    profile = server.served.profiles["tpl-default"]
    assert fed_prompt(server, prefilled, "tpl-default") == server.served.prompt_ids(ASK, profile)


def test_tool_choice_required_forces_the_opening_of_a_call(client, server, scripted, prefilled):
    scripted(' "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    reply = chat(client, "tpl-default", messages=ASK, tools=TOOLS, tool_choice="required")
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "UTC"})
    served, profile = server.served, server.served.profiles["tpl-default"]
    prompt = served.prompt_ids(ASK, profile, tools=FUNCTIONS)
    forced = served.tokenizer('<tool_call>{"name":', add_special_tokens=False)["input_ids"]
    assert fed_prompt(server, prefilled, "tpl-default") == prompt + forced
    assert reply.usage.prompt_tokens == len(prompt) + len(forced)


def test_tool_choice_required_that_cannot_be_forced_is_flagged(client, scripted):
    """ChatGLM3's calls begin with the bare name: with two tools nothing can be forced, and an
    output that is not a call says so."""
    scripted("\nNo call.")
    reply = chat(client, "tpl-chatglm3", messages=ASK, tools=TOOLS, tool_choice="required")
    assert reply.choices[0].message.content == "No call."
    assert errors_of(reply) == ["tool_choice: a call was required, but the output is not a call (this "
                                "template's calls cannot be forced with several tools)"]


@pytest.mark.parametrize("model", ["tpl-default", "tpl-chatglm3"])
def test_a_named_tool_choice_forces_the_call_on_the_real_model(client, server, prefilled, model):
    """The random tiny model itself: the output starts with the forced call to get_weather; its
    random arguments come back as written, flagged, never a 500."""
    template = server.served.profiles[model].template
    for stream in (False, True):
        prefilled.clear()
        kw = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 6,
              "extra_body": {"ignore_eos": True}}
        if stream:
            chunks, reply = streamed(client, **kw)
            errors = errors_of(chunks[-1])
        else:
            reply = chat(client, **kw)
            errors = errors_of(reply)
        choice = reply.choices[0]
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and choice.finish_reason == "length"
        assert any(e.startswith("function get_weather: arguments are not valid") for e in errors), errors
        assert not choice.message.content
        fed = fed_prompt(server, prefilled, model)
        prefix = "".join(p.text for p in call_prefix(template, NAMED, FUNCTIONS))
        assert server.served.tokenizer.decode(fed).endswith(prefix)


# -- calls in ------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]
CANONICAL = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
]
OBSERVED = {
    "tpl-default": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|endoftext|>'
                   '\nTool: {"temp": 21}\nAssistant: ',
    "tpl-chatglm3": "<|assistant|>get_weather\n```python\ntool_call(city='Paris')\n```<|observation|>\n"
                    '{"temp": 21}<|assistant|>',
}


@pytest.mark.parametrize("model", list(OBSERVED))
def test_a_history_with_calls_and_results_is_rendered_in_the_templates_form(client, server, prefilled,
                                                                            scripted, model):
    scripted("It is 21 C.")
    reply = chat(client, model, messages=HISTORY, tools=TOOLS)
    assert reply.choices[0].message.content == "It is 21 C."
    fed = fed_prompt(server, prefilled, model)
    served = server.served
    assert fed == served.prompt_ids(CANONICAL, served.profiles[model], tools=FUNCTIONS)
    assert served.tokenizer.decode(fed, skip_special_tokens=False).endswith(OBSERVED[model])


def test_parallel_results_are_put_in_call_order(client, server, prefilled, scripted):
    history = [ASK[0], {"role": "assistant", "content": "Both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    scripted("Done.")
    chat(client, "tpl-default", messages=history, tools=TOOLS)
    text = server.served.tokenizer.decode(fed_prompt(server, prefilled, "tpl-default"))
    assert text.endswith("\nTool: sunny\nTool: noon\nAssistant: ")


# -- bad requests --------------------------------------------------------------------------------

BAD = {
    "tool without a name": ({"tools": [{"type": "function", "function": {"description": "x"}}]},
                            "tools[0].function.name"),
    "tool of another type": ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    "parameters not an object": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
                                 "tools[0].function.parameters"),
    "duplicate tool": ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    "unknown function in tool_choice": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "launch"}}}, "tool_choice"),
    "unknown tool_choice": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "a result for no call": ({"messages": [*ASK, {"role": "tool", "content": "1"}]},
                             "messages[1].role"),
    "an unknown call id": ({"messages": [*HISTORY[:3], {**HISTORY[3], "tool_call_id": "call_9"}]},
                           "messages[3].tool_call_id"),
    "a call without its result": ({"messages": [*HISTORY[:3], {"role": "user", "content": "?"}]},
                                  "messages[2].tool_calls[0]"),
    "arguments not JSON": ({"messages": [*HISTORY[:2], {**HISTORY[2], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]},
        HISTORY[3]]}, "messages[2].tool_calls[0].function.arguments"),
    "null content without calls": ({"messages": [*ASK, {"role": "assistant", "content": None}, *ASK]},
                                   "messages[1].content"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_requests_get_a_400_naming_the_field(server, case):
    extra, param = BAD[case]
    body = {"model": "tpl-default", "messages": ASK, **extra}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"].startswith(param), error


@pytest.mark.parametrize("model", ["tpl-vicuna", "a"])
def test_tools_with_a_template_that_cannot_render_them_are_a_400(client, model):
    """vicuna renders no tools; run a's template is its tokenizer's, whose chat template has none."""
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, model, messages=ASK, tools=TOOLS, max_tokens=2)
    assert caught.value.body["param"] == "tools"
    assert "chatglm3" in caught.value.body["message"] and "default" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, model, messages=HISTORY, max_tokens=2)
    assert caught.value.body["param"] == "messages"
    # tool_choice none: the tools are not rendered, so any template answers
    assert chat(client, model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=2).choices
