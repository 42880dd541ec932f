"""Tool-calling conversations in chattune's canonical schema (built by hand, as a reader
produces them) and a Qwen2-style chat template with tools, shared by the template and
encoding tests."""

from __future__ import annotations

TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

TOOLS_JSON = ('[{"name": "get_weather", "description": "Current weather of a city", "parameters": '
              '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]')
"""``json.dumps(TOOLS, ensure_ascii=False)``, written out."""

WEATHER = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
    {"role": "assistant", "content": "It is 21 C."},
]
"""system + tools + user + call + result + answer."""

PARALLEL = [
    {"role": "user", "content": "Paris or Rome: which is warmer?"},
    {"role": "assistant", "content": "Checking both.",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}},
                    {"name": "get_weather", "arguments": {"city": "Rome"}}]},
    {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
    {"role": "tool", "content": '{"temp": 25}', "name": "get_weather"},
    {"role": "assistant", "content": "Rome."},
]
"""Two calls in one assistant message (with text before them), two results, the answer."""

QWEN_TOOLS_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
"""Qwen2.5-Instruct's chat template (its tokenizer_config.json ``chat_template``: the tools
block in the system message, Hermes-style ``<tool_call>`` JSON per call, results as
``<tool_response>`` blocks in one user turn), with a shorter default system text."""


def char_tokenizer_with(char_tokenizer, *, chat_template=None, specials=(), eos="</s>"):
    """A new one-character-per-token tokenizer with these special tokens (one id each), EOS
    and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(char_tokenizer.backend_tokenizer.to_str()),
        eos_token=eos, bos_token="<s>", pad_token="</s>", additional_special_tokens=list(specials),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def qwen_tokenizer(char_tokenizer):
    """A character tokenizer with QWEN_TOOLS_TEMPLATE, ``<|im_start|>`` and EOS ``<|im_end|>``."""
    return char_tokenizer_with(char_tokenizer, chat_template=QWEN_TOOLS_TEMPLATE,
                               specials=["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")


def glm3_tokenizer(char_tokenizer):
    """A character tokenizer with ChatGLM3's four role tokens as single ids."""
    return char_tokenizer_with(char_tokenizer,
                               specials=["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"])
