"""Tool calling rows in LLaMA-Factory's ShareGPT layout (``glaive_toolcall_en_demo.json``), shared
by the reader, summary and CLI tests: the glaive row exactly as that file has it, and a
generated 300-row file mixing calls, plain rows and broken rows, each labelled with what the
readers must make of it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GLAIVE_ROW = {
    "conversations": [
        {
            "from": "human",
            "value": "Hi, I need to convert 1000 US dollars to Euros. Can you help me with that?",
        },
        {
            "from": "function_call",
            "value": '{"name": "convert_currency", "arguments": {"amount": 1000, '
            '"from_currency": "USD", "to_currency": "EUR"}}',
        },
        {
            "from": "observation",
            "value": '{"converted_amount": 850.0, "from_currency": "USD", "to_currency": "EUR"}',
        },
        {"from": "gpt", "value": "Sure, 1000 US dollars is approximately 850 Euros."},
    ],
    "tools": '[{"name": "convert_currency", "description": "Convert currency from one type to '
    'another", "parameters": {"type": "object", "properties": {"amount": {"type": "number", '
    '"description": "The amount to convert"}, "from_currency": {"type": "string", '
    '"description": "The currency to convert from"}, "to_currency": {"type": "string", '
    '"description": "The currency to convert to"}}, "required": ["amount", "from_currency", '
    '"to_currency"]}}]',
}

CONVERT_CURRENCY = {
    "name": "convert_currency",
    "description": "Convert currency from one type to another",
    "parameters": {
        "type": "object",
        "properties": {
            "amount": {"type": "number", "description": "The amount to convert"},
            "from_currency": {"type": "string", "description": "The currency to convert from"},
            "to_currency": {"type": "string", "description": "The currency to convert to"},
        },
        "required": ["amount", "from_currency", "to_currency"],
    },
}
GET_WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALCULATE_TIP = {
    "name": "calculate_tip",
    "description": "Calculate the tip for a bill",
    "parameters": {
        "type": "object",
        "properties": {"bill": {"type": "number"}, "percent": {"type": "number"}},
        "required": ["bill", "percent"],
    },
}


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def call(value) -> dict:
    return {"from": "function_call", "value": json.dumps(value)}


def observation(value) -> dict:
    return {"from": "observation", "value": value if isinstance(value, str) else json.dumps(value)}


def tools_column(*tools: dict) -> str:
    return json.dumps(list(tools))


@dataclass
class Expected:
    """What the readers must make of one generated row."""

    kind: str
    outcome: str  # "converted", "skipped" or "duplicated"
    tool_calls: int = 0
    has_tools: bool = False
    reason: str = ""


def _row(kind: str, i: int) -> tuple[dict, Expected]:
    """Row ``i`` of kind ``kind`` (every text carries ``i``, so no two rows are alike by chance)."""
    weather = {"name": "get_weather", "arguments": {"city": f"City {i}"}}
    tip = {"name": "calculate_tip", "arguments": {"bill": 10 + i, "percent": 15}}
    both = tools_column(GET_WEATHER, CALCULATE_TIP)
    if kind == "single":
        amount = 100 + i
        row = {
            "conversations": [
                human(f"Convert {amount} USD to EUR, please."),
                call({
                    "name": "convert_currency",
                    "arguments": {"amount": amount, "from_currency": "USD", "to_currency": "EUR"},
                }),
                observation({"converted_amount": amount * 0.85}),
                gpt(f"{amount} USD is about {amount * 0.85:.2f} EUR."),
            ],
            "tools": tools_column(CONVERT_CURRENCY),
        }
        return row, Expected(kind, "converted", 1, True)
    if kind == "parallel_split":  # LLaMA-Factory: N calls in one turn, their N results in one
        row = {
            "conversations": [
                human(f"Weather in City {i}, and the tip on {10 + i} dollars?"),
                call([weather, tip]),
                observation([{"temperature": i % 30}, {"tip": (10 + i) * 0.15}]),
                gpt(f"It is {i % 30} degrees; the tip is {(10 + i) * 0.15:.2f}."),
            ],
            "tools": both,
        }
        return row, Expected(kind, "converted", 2, True)
    if kind == "parallel_turns":  # N calls, then one observation turn per call
        row = {
            "conversations": [
                human(f"Weather in City {i}, and the tip on {10 + i} dollars? (turns)"),
                call([weather, tip]),
                observation({"temperature": i % 30}),
                observation({"tip": (10 + i) * 0.15}),
                gpt(f"{i % 30} degrees, tip {(10 + i) * 0.15:.2f}."),
            ],
            "tools": both,
        }
        return row, Expected(kind, "converted", 2, True)
    if kind == "multi_step":  # a system prompt; a call, its result, a second call, an answer
        row = {
            "system": "You are a helpful assistant with tools.",
            "conversations": [
                human(f"What is the weather in City {i}? Then tip 15% on {10 + i}."),
                call(weather),
                observation({"temperature": i % 30}),
                call(tip),
                observation({"tip": (10 + i) * 0.15}),
                gpt(f"Done for row {i}."),
            ],
            "tools": both,
        }
        return row, Expected(kind, "converted", 2, True)
    if kind == "args_string":  # the arguments themselves a JSON string
        row = {
            "conversations": [
                human(f"Weather in City {i}?"),
                call({"name": "get_weather", "arguments": json.dumps({"city": f"City {i}"})}),
                observation({"temperature": i % 30}),
                gpt(f"It is {i % 30} degrees in City {i}."),
            ],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "converted", 1, True)
    if kind == "tools_no_call":  # tools offered, none needed
        row = {
            "conversations": [human(f"Tell me a joke number {i}."), gpt(f"Joke {i}: ...")],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "converted", 0, True)
    if kind == "plain":  # glaive's rows without tools: "tools": "[]"
        row = {"conversations": [human(f"Hello {i}"), gpt(f"Hi {i}!")], "tools": "[]"}
        return row, Expected(kind, "converted")
    if kind == "no_tools_column":
        row = {"conversations": [human(f"Plain question {i}"), gpt(f"Plain answer {i}")]}
        return row, Expected(kind, "converted")
    if kind == "bad_call_json":
        row = {
            "conversations": [
                human(f"Weather {i}?"),
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {'},
                observation({"temperature": 1}),
                gpt("Warm."),
            ],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "skipped", reason="function call is not valid JSON")
    if kind == "bad_tools_json":
        row = {
            "conversations": [human(f"Weather {i}?"), call(weather), observation("{}"), gpt("Ok.")],
            "tools": '[{"name": "get_weather",',
        }
        return row, Expected(kind, "skipped", reason="tools are not valid JSON")
    if kind == "unknown_tool":
        row = {
            "conversations": [human(f"Tip {i}?"), call(tip), observation("{}"), gpt("Ok.")],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "skipped", reason="unknown tool")
    if kind == "no_result":
        row = {
            "conversations": [human(f"Weather {i}?"), call(weather), gpt("It is warm.")],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "skipped", reason="has no tool result")
    if kind == "stray_observation":
        row = {
            "conversations": [human(f"Hi {i}"), observation("{}"), gpt("Hello.")],
            "tools": "[]",
        }
        return row, Expected(kind, "skipped", reason="a tool message must answer")
    if kind == "args_list":
        row = {
            "conversations": [
                human(f"Weather {i}?"),
                call({"name": "get_weather", "arguments": [f"City {i}"]}),
                observation("{}"),
                gpt("Ok."),
            ],
            "tools": tools_column(GET_WEATHER),
        }
        return row, Expected(kind, "skipped", reason="expected a JSON object")
    raise ValueError(kind)


CYCLE = (
    ["single", "duplicate", "tools_differ"]
    + ["single"] * 5
    + ["parallel_split", "parallel_turns"] * 2
    + ["multi_step", "args_string"] * 2
    + ["tools_no_call"] * 3
    + ["plain"] * 4
    + ["no_tools_column"]
    + ["bad_call_json", "bad_tools_json", "unknown_tool", "no_result", "stray_observation",
       "args_list"]
)
"""One cycle of 30 rows: 23 convert, 1 is a duplicate, 6 are broken."""


def toolcall_rows(n: int = 300) -> tuple[list[dict], list[Expected]]:
    """``n`` rows cycling through :data:`CYCLE`, and what each must become."""
    assert len(CYCLE) == 30
    rows, expected = [], []
    for i in range(n):
        kind = CYCLE[i % len(CYCLE)]
        if kind == "duplicate":  # the row just before it, again
            rows.append(json.loads(json.dumps(rows[-1])))
            expected.append(Expected(kind, "duplicated"))
            continue
        if kind == "tools_differ":  # the conversation of the row two before, other tools
            rows.append({**rows[-2], "tools": tools_column(CONVERT_CURRENCY, GET_WEATHER)})
            expected.append(Expected(kind, "converted", 1, True))
            continue
        row, what = _row(kind, i)
        rows.append(row)
        expected.append(what)
    return rows, expected


def write_toolcall_file(path: Path, n: int = 300) -> tuple[Path, list[Expected]]:
    """The generated rows as one JSON array (as LLaMA-Factory ships its demo files)."""
    rows, expected = toolcall_rows(n)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path, expected
