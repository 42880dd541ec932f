"""Function-calling data for chattune's tool-calling example, English and Chinese.

Two tools with deterministic Python implementations (a fixed table of cities, fixed
exchange rates): ``get_weather(city)`` and ``convert_currency(amount, from_currency,
to_currency)``. Each taught conversation, in OpenAI messages format with a top-level
``tools`` list, is: (an optional system message) -> the user's question -> the assistant's
tool call -> the tool's result (the function's real output, as JSON) -> the assistant's
answer stating the result. Chit-chat rows offer the same tools and are answered directly,
so the model also learns when not to call.

    python examples/tools/make_tool_data.py                  # -> chattune-tools/
    chattune train examples/tools/tools_lora.yaml
    chattune serve chattune-tools/run &
    python examples/tools/agent.py

Writes, under ``--out`` (default ``chattune-tools``):

- ``data/tools_train.jsonl``: the taught conversations (the training file);
- ``data/tools_steps.jsonl``: the same conversations cut at each assistant turn (one row
  ending with the call, one ending with the answer; chit-chat as it is), for
  ``chattune predict`` / ``chattune eval``, which score a call row's calls;
- ``data/held_out_steps.jsonl`` and ``data/held_out_prompts.jsonl``: 100 questions never
  taught (the same cities and currencies in other wordings, pairs and amounts), as step rows
  and as prompts for ``agent.py --prompts``, to see what the model learned beyond its taught
  prompts;
- ``data/taught_prompts.jsonl``: each taught prompt (its messages up to the question),
  the call it should make and the value its final answer must state, for ``agent.py``;
- ``tiny-model/``: a tiny random Llama-architecture model (4 layers, 256 wide) whose byte-level
  tokenizer was trained on this data, as ``chattune demo`` builds its model, with no chat
  template, so that ``template: auto`` and the base model served beside the run use ``default``
  (``--no-model`` skips it).

Why Llama and not the demo's GLM-4: the call's arguments must be copied from the question, and
the tool schema in the prompt holds the same keys (``"city": ``); the tiny GLM-4 (rotary
embeddings on half of each head) keeps attending to the schema's key and, with the same
settings, gets 64% of the taught calls' arguments right after 600 steps (its final answers all
right), where the Llama (rotary on all of each head) gets 100% (``--arch glm4`` to compare).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# city: (Chinese name, temperature in °C, condition)
CITIES = {
    "Paris": ("巴黎", 21, "sunny"),
    "London": ("伦敦", 14, "rainy"),
    "Tokyo": ("东京", 26, "cloudy"),
    "Beijing": ("北京", 30, "sunny"),
    "Shanghai": ("上海", 28, "rainy"),
    "New York": ("纽约", 18, "windy"),
    "Sydney": ("悉尼", 12, "cloudy"),
    "Berlin": ("柏林", 9, "foggy"),
    "Moscow": ("莫斯科", -4, "snowy"),
    "Cairo": ("开罗", 35, "sunny"),
}
CONDITIONS_ZH = {"sunny": "晴", "rainy": "有雨", "cloudy": "多云", "windy": "有风", "foggy": "有雾", "snowy": "下雪"}

# currency: (US dollars per unit, English name, Chinese name)
CURRENCIES = {
    "USD": (1.0, "US dollars", "美元"),
    "EUR": (1.08, "euros", "欧元"),
    "GBP": (1.27, "British pounds", "英镑"),
    "JPY": (0.0067, "Japanese yen", "日元"),
    "CNY": (0.14, "Chinese yuan", "人民币"),
    "CHF": (1.13, "Swiss francs", "瑞士法郎"),
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency",
        "description": "Convert money between currencies (ISO codes)",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
]
"""The tools every row offers, as OpenAI's ``tools=`` takes them."""


def get_weather(city: str) -> dict:
    """The weather of ``city`` (its English or Chinese name) from the fixed table."""
    for name, (zh, temperature, condition) in CITIES.items():
        if city.strip().lower() in (name.lower(), zh):
            return {"city": city, "temperature_c": temperature, "condition": condition}
    return {"error": f"unknown city: {city}"}


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict:
    """``amount`` in ``from_currency`` converted at the fixed rates (ISO codes), to 2 decimals."""
    source, target = str(from_currency).upper(), str(to_currency).upper()
    for code in (source, target):
        if code not in CURRENCIES:
            return {"error": f"unknown currency: {code}"}
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return {"error": f"amount must be a number, got {amount!r}"}
    result = round(amount * CURRENCIES[source][0] / CURRENCIES[target][0], 2)
    return {"amount": amount, "from": source, "to": target, "result": result}


FUNCTIONS = {"get_weather": get_weather, "convert_currency": convert_currency}


def call_tool(name: str, arguments: dict) -> dict:
    """Run the function a call names with its arguments; an error object for a bad call."""
    function = FUNCTIONS.get(name)
    if function is None:
        return {"error": f"unknown tool: {name}"}
    try:
        return function(**arguments)
    except TypeError as exc:
        return {"error": f"bad arguments for {name}: {exc}"}


def result_text(result: dict) -> str:
    """A tool result as the tool message's content (what the agent sends too)."""
    return json.dumps(result, ensure_ascii=False)


def money(value: float) -> str:
    """An amount as the answers write it: two decimals."""
    return f"{value:.2f}"


def amount_text(amount: float) -> str:
    """An amount as a user writes it: ``100``, ``12.5``."""
    return str(int(amount)) if float(amount).is_integer() else str(amount)


WEATHER_EN = [
    "What's the weather like in {city}?",
    "How warm is it in {city} right now?",
    "Tell me the current weather in {city}.",
    "Is it nice out in {city} today?",
]
WEATHER_ZH = ["{city}天气怎么样？", "{city}现在多少度？", "告诉我{city}现在的天气。", "今天{city}天气好吗？"]
CURRENCY_EN = [
    "Convert {amount} {source} to {target}.",
    "How much is {amount} {source} in {target}?",
    "What is {amount} {source_name} in {target_name}?",
    "I have {amount} {source}. How many {target} is that?",
]
CURRENCY_ZH = ["{amount}{source_zh}能换多少{target_zh}？", "把{amount}{source_zh}换成{target_zh}。",
               "{amount} {source} 等于多少 {target}？", "请帮我把{amount}{source_zh}兑换成{target_zh}。"]
CHITCHAT = [
    ("en", "Hello!", "Hello! How can I help you today?"),
    ("en", "Who are you?", "I am an assistant that can check the weather and convert currencies."),
    ("en", "What can you do?", "I can tell you the weather in a city and convert money between currencies."),
    ("en", "Thank you!", "You're welcome!"),
    ("en", "Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
    ("en", "What is 2 + 3?", "2 + 3 = 5."),
    ("zh", "你好！", "你好！有什么可以帮你的吗？"),
    ("zh", "你是谁？", "我是一个可以查询天气和换算货币的助手。"),
    ("zh", "你能做什么？", "我可以查询城市的天气，也可以换算货币。"),
    ("zh", "谢谢！", "不客气！"),
    ("zh", "讲个笑话。", "为什么数学书很忧郁？因为它有太多的问题。"),
    ("zh", "2加3等于几？", "2加3等于5。"),
]
SYSTEM = {"en": "You are a helpful assistant. Use a tool when it helps.",
          "zh": "你是一个乐于助人的助手，需要时使用工具。"}
AMOUNTS = [20, 50, 100, 250, 1000, 12.5, 75, 300, 40, 500, 8, 60]


def weather_example(city: str, lang: str, wording: int) -> dict:
    zh, _, _ = CITIES[city]
    asked = city if lang == "en" else zh
    question = (WEATHER_EN if lang == "en" else WEATHER_ZH)[wording].format(city=asked)
    arguments = {"city": asked}
    result = get_weather(asked)
    temperature = f"{result['temperature_c']}°C"
    if lang == "en":
        answer = f"It is {temperature} and {result['condition']} in {city}."
    else:
        answer = f"{zh}现在{temperature}，{CONDITIONS_ZH[result['condition']]}。"
    return {"kind": "weather", "lang": lang, "question": question, "call": ("get_weather", arguments),
            "result": result, "answer": answer, "expected": temperature}


def currency_example(amount: float, source: str, target: str, lang: str, wording: int) -> dict:
    names = {"source": source, "target": target, "amount": amount_text(amount),
             "source_name": CURRENCIES[source][1], "target_name": CURRENCIES[target][1],
             "source_zh": CURRENCIES[source][2], "target_zh": CURRENCIES[target][2]}
    question = (CURRENCY_EN if lang == "en" else CURRENCY_ZH)[wording].format(**names)
    arguments = {"amount": amount, "from_currency": source, "to_currency": target}
    result = convert_currency(**arguments)
    value = money(result["result"])
    if lang == "en":
        answer = f"{names['amount']} {source} is {value} {target}."
    else:
        answer = f"{names['amount']}{names['source_zh']}等于{value}{names['target_zh']}。"
    return {"kind": "currency", "lang": lang, "question": question, "call": ("convert_currency", arguments),
            "result": result, "answer": answer, "expected": value}


def examples(seed: int = 0) -> list[dict]:
    """Every taught example (a plain description; :func:`conversation` makes it a row).

    Each city is asked about twice in English and twice in Chinese (different wordings);
    each of 24 currency pairs once in each language; plus the chit-chat; a quarter of the
    rows start with a system message."""
    rng = random.Random(seed)
    found = []
    for i, city in enumerate(CITIES):
        for lang in ("en", "zh"):
            for k in range(2):
                found.append(weather_example(city, lang, (i + 2 * k + (lang == "zh")) % 4))
    pairs = [(a, b) for a in CURRENCIES for b in CURRENCIES if a != b]
    rng.shuffle(pairs)
    for i, (source, target) in enumerate(pairs[:24]):
        for lang in ("en", "zh"):
            amount = AMOUNTS[(i + 5 * (lang == "zh")) % len(AMOUNTS)]
            found.append(currency_example(amount, source, target, lang, (i + (lang == "zh")) % 4))
    for lang, question, answer in CHITCHAT:
        found.append({"kind": "chitchat", "lang": lang, "question": question, "call": None, "result": None,
                      "answer": answer, "expected": answer})
    for example in found:
        example["system"] = SYSTEM[example["lang"]] if rng.random() < 0.25 else None
    return found


def held_out_examples(taught: list[dict]) -> list[dict]:
    """Questions not among ``taught``, without a system message: each city in the wordings it
    was not taught with (2 per language), and each currency pair in each language with an
    amount never asked for (60 of the 90, those whose question was not taught)."""
    asked = {e["question"] for e in taught}
    found = [e for city in CITIES for lang in ("en", "zh") for w in range(4)
             if (e := weather_example(city, lang, w))["question"] not in asked]
    pairs = [(a, b) for a in CURRENCIES for b in CURRENCIES if a != b]
    found += [e for i, (source, target) in enumerate(pairs) for lang in ("en", "zh")
              if (e := currency_example((30, 200, 15)[i % 3], source, target, lang, i % 4))["question"] not in asked]
    for example in found:
        example["system"] = None
    return found


def prompt_messages(example: dict) -> list[dict]:
    """The messages a user sends: the optional system message and the question."""
    system = [{"role": "system", "content": example["system"]}] if example["system"] else []
    return system + [{"role": "user", "content": example["question"]}]


def conversation(example: dict) -> list[dict]:
    """The whole taught conversation in OpenAI's message format."""
    messages = prompt_messages(example)
    if example["call"] is not None:
        name, arguments = example["call"]
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": result_text(example["result"])},
        ]
    return messages + [{"role": "assistant", "content": example["answer"]}]


def step_rows(example: dict) -> list[list[dict]]:
    """The conversation cut after each assistant turn: [.. call] and [.. call, result, answer]."""
    messages = conversation(example)
    return [messages[:i + 1] for i, m in enumerate(messages) if m["role"] == "assistant"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_data(out: Path, taught: list[dict]) -> dict[str, Path]:
    """The data files for ``taught``; their paths."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"train": data / "tools_train.jsonl", "steps": data / "tools_steps.jsonl",
             "held_out": data / "held_out_steps.jsonl", "prompts": data / "taught_prompts.jsonl",
             "held_out_prompts": data / "held_out_prompts.jsonl"}
    held_out = held_out_examples(taught)
    _write_jsonl(paths["train"], [{"messages": conversation(e), "tools": TOOLS} for e in taught])
    _write_jsonl(paths["steps"], [{"messages": rows, "tools": TOOLS} for e in taught for rows in step_rows(e)])
    _write_jsonl(paths["held_out"], [{"messages": rows, "tools": TOOLS} for e in held_out for rows in step_rows(e)])
    _write_jsonl(paths["prompts"], [_prompt_row(e) for e in taught])
    _write_jsonl(paths["held_out_prompts"], [_prompt_row(e) for e in held_out])
    return paths


def _prompt_row(example: dict) -> dict:
    """What agent.py asks, and what it expects: the call (None: none) and the value the final
    answer must state."""
    call = {"name": example["call"][0], "arguments": example["call"][1]} if example["call"] else None
    return {"kind": example["kind"], "lang": example["lang"], "messages": prompt_messages(example), "call": call,
            "expected": example["expected"]}


def corpus(taught: list[dict]) -> list[str]:
    """Text to train the tiny model's tokenizer on: the rows as the ``default`` template shows them."""
    tools = json.dumps([t["function"] for t in TOOLS], ensure_ascii=False)
    texts = []
    for example in taught:
        parts = [f"System: {example['system']}" if example["system"] else "", f"Tools: {tools}",
                 f"Human: {example['question']}"]
        if example["call"]:
            name, arguments = example["call"]
            call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
            parts += [f"Assistant: <tool_call>{call}</tool_call>", f"Tool: {result_text(example['result'])}"]
        parts.append(f"Assistant: {example['answer']}")
        texts.append("\n".join(p for p in parts if p))
    return texts


def build_model(path: Path, taught: list[dict], arch: str = "llama", hidden_size: int = 256,
                num_layers: int = 4) -> Path:
    """A tiny random model of ``arch`` at ``path`` whose byte-level tokenizer was trained on
    ``taught`` (as ``chattune demo`` builds its model), with no chat template: ``template: auto``
    then means ``default``, for the run and for the base model served beside it."""
    from chattune.tiny import build_tiny_model

    build_tiny_model(path, arch, extra_text=corpus(taught) * 4, hidden_size=hidden_size, num_layers=num_layers,
                     chat_template=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="chattune-tools", help="output folder (default chattune-tools)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-model", action="store_true", help="do not build the tiny model")
    parser.add_argument("--arch", default="llama", choices=["llama", "glm4", "qwen2", "glm"],
                        help="the tiny model's architecture (default llama)")
    parser.add_argument("--hidden-size", type=int, default=256, help="the tiny model's width (default 256)")
    parser.add_argument("--num-layers", type=int, default=4, help="the tiny model's layers (default 4)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    taught = examples(args.seed)
    paths = write_data(out, taught)
    kinds = {k: sum(e["kind"] == k for e in taught) for k in ("weather", "currency", "chitchat")}
    steps = sum(len(step_rows(e)) for e in taught)
    print(f"wrote {len(taught)} taught conversations ({kinds['weather']} weather, {kinds['currency']} currency, "
          f"{kinds['chitchat']} chit-chat; {sum(e['lang'] == 'zh' for e in taught)} in Chinese) to "
          f"{paths['train']}\n      {steps} step rows to {paths['steps']}\n"
          f"      {2 * len(held_out_examples(taught))} step rows of 100 questions never taught to "
          f"{paths['held_out']} (and {paths['held_out_prompts'].name})\n"
          f"      {len(taught)} prompts with their expected values to {paths['prompts']}")
    if not args.no_model:
        model = build_model(out / "tiny-model", taught, args.arch, args.hidden_size, args.num_layers)
        print(f"built a tiny random {args.arch} model ({args.num_layers} layers, {args.hidden_size} wide; its "
              f"tokenizer trained on this data, without a chat template) at {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
