"""A tokenizer's chat template read as one pattern per role, where it is one: the form in which
a chat template can be written in another template language (Ollama's TEMPLATE)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from chattune.templates.pieces import TemplateError, render_text
from chattune.templates.registry import render


@dataclass(frozen=True)
class RolePattern:
    """A chat template that renders ``common + (system part | no-system part)`` then each
    message as ``user_prefix + text + generation`` or ``text + answer_suffix``."""

    common: str
    with_system: str
    system_suffix: str
    without_system: str
    user_prefix: str
    generation: str
    answer_suffix: str

    def render(self, messages: list[dict]) -> str:
        """The text this pattern renders for ``messages`` (checked against chattune's)."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        out = [self.common, f"{self.with_system}{system}{self.system_suffix}" if system else self.without_system]
        for message in messages:
            if message["role"] == "user":
                out.append(self.user_prefix + message["content"] + self.generation)
            elif message["role"] == "assistant":
                out.append(message["content"] + self.answer_suffix)
        return "".join(out)


    def jinja(self) -> str:
        """The pattern as a Hugging Face chat template (Jinja)."""
        def lit(text: str) -> str:
            return "{{ " + json.dumps(text) + " }}" if text else ""

        without = "{%- else %}" + lit(self.without_system) if self.without_system else ""
        return ("{%- set has_system = messages and messages[0]['role'] == 'system' %}" + lit(self.common)
                + "{%- if has_system %}" + lit(self.with_system) + "{{ messages[0]['content'] }}"
                + lit(self.system_suffix) + without + "{%- endif %}"
                + "{%- for message in messages %}{%- if message['role'] == 'user' %}" + lit(self.user_prefix)
                + "{{ message['content'] }}{%- if message['input'] is defined and message['input'] %}"
                + "{{ '\\n' ~ message['input'] }}{%- endif %}"
                + "{%- if not loop.last or add_generation_prompt %}" + lit(self.generation)
                + "{%- endif %}{%- elif message['role'] == 'assistant' %}{{ message['content'] }}"
                + lit(self.answer_suffix) + "{%- endif %}{%- endfor %}")


def _common_suffix(*texts: str) -> str:
    size = 0
    while all(len(t) > size for t in texts) and len({t[len(t) - size - 1] for t in texts}) == 1:
        size += 1
    return texts[0][len(texts[0]) - size:] if size else ""


def _split(text: str, markers: list[str]) -> list[str] | None:
    """``text`` cut at each marker in order (len(markers) + 1 segments), or None."""
    segments, cursor = [], 0
    for marker in markers:
        at = text.find(marker, cursor)
        if at < 0:
            return None
        segments.append(text[cursor:at])
        cursor = at + len(marker)
    return segments + [text[cursor:]]


def role_pattern(tokenizer, eos: str, bos: str = "") -> RolePattern | None:
    """The tokenizer's chat template (as chattune renders it, EOS included, a leading ``bos``
    left out) as a :class:`RolePattern`, or None when it is not one (checked on longer
    conversations)."""
    def text(messages):
        rendered = render_text(render("tokenizer", messages, tokenizer), eos=eos)
        return rendered[len(bos):] if bos and rendered.startswith(bos) else rendered

    s, u1, a1, u2, a2, u3 = "SYSTEMTEXT", "USERONE", "ANSWERONE", "USERTWO", "ANSWERTWO", "USERTHREE"
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
             {"role": "user", "content": u2}]
    try:
        with_sys = _split(text([{"role": "system", "content": s}, *turns]), [s, u1, a1, u2])
        without = _split(text(turns), [u1, a1, u2])
    except TemplateError:
        return None
    if with_sys is None or without is None:
        return None
    head, sys_next, generation, between, tail = with_sys
    if not (generation == tail == without[1] == without[3] and between == without[2]):
        return None
    user_prefix = _common_suffix(without[0], between, sys_next)
    if eos and eos in between:
        # the answer's EOS ends the answer, not the next user's prefix: a template that writes a
        # default system turn (SmolLM2's) ends all three texts with "<|im_end|>\n<|im_start|>user\n"
        after_eos = len(between) - between.index(eos) - len(eos)
        user_prefix = user_prefix[len(user_prefix) - after_eos:] if len(user_prefix) > after_eos else user_prefix
    cut = len(user_prefix)
    no_system = without[0][:len(without[0]) - cut]
    common = head[:next((i for i, (x, y) in enumerate(zip(head, no_system, strict=False)) if x != y),
                        min(len(head), len(no_system)))]
    pattern = RolePattern(common, head[len(common):], sys_next[:len(sys_next) - cut],
                           no_system[len(common):], user_prefix, generation,
                           between[:len(between) - cut])
    probes = [
        [{"role": "system", "content": s}, {"role": "user", "content": u1}],
        [{"role": "user", "content": u1}],
        [{"role": "system", "content": s}, *turns, {"role": "assistant", "content": a2},
         {"role": "user", "content": u3}],
        [*turns, {"role": "assistant", "content": a2}, {"role": "user", "content": u3}],
    ]
    try:
        if all(pattern.render(m) == text(m) for m in probes):
            return pattern
    except TemplateError:
        pass
    return None
