"""The agent loop with the official ``openai`` client against ``chattune serve``.

For each taught prompt (``taught_prompts.jsonl`` from make_tool_data.py) it sends the
messages with ``tools=``; while the reply has ``tool_calls`` it runs each Python function
with the parsed arguments, appends the assistant message (with its calls) and one ``tool``
message per call (its ``tool_call_id`` and the JSON result), and asks again; the final
answer is right when it states the expected value (the temperature, the converted amount;
for chit-chat, the taught answer, with no call made). One table row per model:

    chattune serve chattune-tools/run &         # serves the run as "run" and its base as "base"
    python examples/tools/agent.py              # every model the server lists
    python examples/tools/agent.py --model run --show-wrong 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tool_data import TOOLS, call_tool, result_text  # noqa: E402


@dataclass
class Outcome:
    """One prompt's run through the loop."""

    prompt: dict
    calls: list[dict] = field(default_factory=list)  # every call made: {"name", "arguments"}
    answer: str = ""
    error: str | None = None

    @property
    def right_calls(self) -> bool:
        """Exactly the expected call was made (no call for chit-chat)."""
        expected = [self.prompt["call"]] if self.prompt["call"] else []
        return self.calls == expected

    @property
    def right(self) -> bool:
        """The final answer states the expected value (chit-chat: and no call was made)."""
        if self.error is not None:
            return False
        if self.prompt["call"] is None and self.calls:
            return False
        return self.prompt["expected"] in self.answer


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # as the model wrote it; the function is not run


def run_prompt(client, model: str, prompt: dict, *, max_rounds: int = 3, max_tokens: int = 96) -> Outcome:
    """The agent loop for one prompt: ask, run the calls, hand back the results, ask again."""
    import openai

    outcome = Outcome(prompt)
    messages = [dict(m) for m in prompt["messages"]]
    try:
        for _ in range(max_rounds):
            reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                   temperature=0, max_tokens=max_tokens)
            message = reply.choices[0].message
            if not message.tool_calls:
                outcome.answer = message.content or ""
                return outcome
            messages.append({"role": "assistant", "content": message.content, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
                for call in message.tool_calls]})
            for call in message.tool_calls:
                arguments = _arguments(call.function.arguments)
                outcome.calls.append({"name": call.function.name, "arguments": arguments})
                result = (call_tool(call.function.name, arguments) if isinstance(arguments, dict)
                          else {"error": "arguments are not a JSON object"})
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result_text(result)})
        outcome.error = f"still calling after {max_rounds} rounds"
    except openai.APIError as exc:
        outcome.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
    return outcome


def evaluate(client, model: str, prompts: list[dict], **options) -> list[Outcome]:
    """Every prompt through the loop with ``model``."""
    return [run_prompt(client, model, prompt, **options) for prompt in prompts]


def table(results: dict[str, list[Outcome]]) -> str:
    """One line per model: prompts, calls made, prompts with the right calls, right final answers."""
    lines = [f"{'model':<12}{'prompts':>8}{'calls made':>12}{'right calls':>13}{'right answers':>15}{'share right':>13}"]
    for model, outcomes in results.items():
        right = sum(o.right for o in outcomes)
        lines.append(f"{model:<12}{len(outcomes):>8}{sum(len(o.calls) for o in outcomes):>12}"
                     f"{sum(o.right_calls for o in outcomes):>13}{right:>15}{right / len(outcomes):>13.1%}")
    for model, outcomes in results.items():
        languages = sorted({o.prompt.get("lang", "?") for o in outcomes})
        parts = []
        for language in languages:
            mine = [o for o in outcomes if o.prompt.get("lang", "?") == language]
            parts.append(f"{language} {sum(o.right for o in mine)}/{len(mine)} right "
                         f"({sum(o.right_calls for o in mine)} right calls)")
        lines.append(f"{model}, by language: {', '.join(parts)}")
    return "\n".join(lines)


def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """The taught prompts with their expected call and value."""
    with open(path, encoding="utf-8") as handle:
        prompts = [json.loads(line) for line in handle if line.strip()]
    return prompts[:limit] if limit else prompts


def main(argv: list[str] | None = None) -> int:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--api-key", default=os.environ.get("CHATTUNE_API_KEY") or "unused",
                        help="the server's --api-key (default $CHATTUNE_API_KEY)")
    parser.add_argument("--model", action="append", help="a model to test (repeatable; default: every model "
                                                         "the server lists)")
    parser.add_argument("--prompts", default="chattune-tools/data/taught_prompts.jsonl")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=96, help="per reply (default 96)")
    parser.add_argument("--show-wrong", type=int, default=3, help="print up to N wrong prompts per model")
    parser.add_argument("--out", help="also write every prompt's calls, answer and verdict here (JSON)")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    models = args.model or [m.id for m in client.models.list()]
    prompts = read_prompts(args.prompts, args.limit)
    results = {}
    for model in models:
        results[model] = evaluate(client, model, prompts, max_tokens=args.max_tokens)
        wrong = [o for o in results[model] if not o.right][:args.show_wrong]
        for outcome in wrong:
            print(f"[{model}] wrong: {outcome.prompt['messages'][-1]['content']!r} calls {outcome.calls} "
                  f"answer {outcome.answer[:80]!r}" + (f" error {outcome.error}" if outcome.error else ""),
                  file=sys.stderr)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({model: [
            {"prompt": o.prompt, "calls": o.calls, "answer": o.answer, "error": o.error, "right": o.right,
             "right_calls": o.right_calls} for o in outcomes] for model, outcomes in results.items()},
            ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
