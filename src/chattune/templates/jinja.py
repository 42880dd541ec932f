"""Jinja chat templates that render what chattune's templates render, for an exported model.

An exported model folder carries a ``chat_template`` so that any runtime builds the
prompt the model was trained on: ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True)`` should give exactly chattune's prompt ids,
``encode_prompt(messages, template, PieceEncoder(tokenizer))``. :func:`chat_template`
writes the Jinja source for a named template and a tokenizer; :func:`check_chat_template`
renders conversations both ways and describes every difference.

**Why it cannot always be exact.** chattune tokenizes a prompt piece by piece (a piece's
tokens never merge with its neighbours; ``joined`` templates tokenize each run of text
pieces as one text), ``apply_chat_template`` tokenizes one rendered string. The Jinja
spells out the tokenizer's special prefix/suffix (``special_token_ids``: ``[gMASK]sop``
for ChatGLM2/3, ``[gMASK]<sop>`` for ChatGLM-6B, nothing for the byte-level tiny
GLM-4/LLaMA/Qwen2 models), its EOS token where the template puts EOS (default, tutorial-alpaca,
chatglm-tuning, vicuna, alpaca, chinese-alpaca-2 and gpt4all end every history answer with
it, chatglm3/chatglm2/chatglm, chinese-alpaca and moss do not) and ChatGLM3's role tokens;
a text that a special token splits off is tokenized on its own, as chattune does. What is left is each boundary between two text pieces:

- Tokenizers that give every text its own dummy prefix ``▁`` (sentencepiece: ChatGLM2/3,
  ChatGLM-6B; detected as ``ids("a b") == ids("a") + ids("b")``): the Jinja puts a space
  before each text piece that does not start the text or follow a special token (where
  the tokenizer adds the prefix itself), as THUDM's own ChatGLM3 template does
  (``<|user|>\\n {{ content }}``); ChatGLM-6B drops a piece's outer spaces, so its
  template literals lose theirs. This is exact as long as no merge crosses a boundary,
  which in these vocabularies only ``▁▁`` runs do: a piece that ends with a space
  followed by a text piece gives ``▁▁`` (one token) where chattune has ``▁`` ``▁x``.
- Byte-level BPE (the tiny models): the Jinja renders chattune's text as it is. A space
  at the end of a piece joins the next word in one string (``Human: Who`` gives ``ĠWho``;
  chattune gives ``Ġ`` ``Who``). The Qwen2 pre-tokenizer also keeps punctuation and the
  newlines after it together (``.\\n\\n``): the tiny vocabulary has no merge for that,
  a real Qwen2 vocabulary may (not tested here: then ``tutorial-alpaca`` differs after a
  message that ends with punctuation, and check_chat_template says so).

Results, checked by ``tests/templates/test_jinja.py`` ("exact": for every conversation whose
messages neither end with whitespace nor contain special-token text, see below):

- ``tutorial-alpaca``, ``chatglm3``: exact on the byte-level tiny glm4/llama/qwen2 tokenizers and
  on ChatGLM2/ChatGLM3 (chatglm3 on ChatGLM2, which lacks the role tokens, too: they
  are text there, as in chattune). On ChatGLM-6B not exact: the template starts with the
  specials and ChatGLM-6B's tokenizer puts ``▁`` before ``[gMASK]`` at the start of a text.
- ``chatglm``, ``chatglm2`` (joined: the prompt is one text run, no piece boundary
  inside): exact on all five, and ``chatglm`` on ChatGLM-6B (its specials come last);
  ``chatglm2`` on ChatGLM-6B not (specials first, as above).
- ``alpaca``, ``chinese-alpaca``, ``chinese-alpaca-2``, ``moss``, ``gpt4all`` (joined: each
  run of text between the specials and EOS tokens is one text, written as it is; only a run
  that follows a special token gets the space a dummy-prefix tokenizer would not add there):
  exact on the byte-level tiny glm4/llama/qwen2 tokenizers (their markers that end with a
  space, ``### Response: ``, ``[INST] ``, ``<|Human|>: ``, are inside a run, not at a piece
  boundary) and on ChatGLM2/ChatGLM3, except ``moss`` there without a system message: its
  default meta_instruction says ``people``, which the exported tokenizer reads as ``p``
  ``eop`` ``le`` (see special-token text below). On ChatGLM-6B not (specials first).
  (As for every joined template, this is the prompt chattune generates from; in training a
  trained answer is tokenized apart from the text around it.)
- ``default``, ``vicuna``, ``chatglm-tuning``: NOT exact in general. ``Human: ``,
  ``System: ``, ``USER: ``, ``Instruction: ``, ``Input: `` and vicuna's ``" "`` end with a
  space and a message follows: a byte-level BPE merges that space into the next word
  (exact only where the vocabulary has no merge for it: a tiny vocabulary for some
  words, a real one for almost none), ChatGLM2/3 make ``▁▁``. ChatGLM-6B drops a piece's
  outer spaces, so ``chatglm-tuning`` on ChatGLM-6B is exact without history but not
  with it (the ``\\n`` after ``<eop>`` is dropped by that tokenizer); ``default`` and
  ``vicuna`` start with the specials there.
- ``tokenizer``: the tokenizer's own chat template, unchanged. chattune tokenizes its
  text and the messages apart and ends each history answer with EOS: exact for the tiny
  ChatML templates (llama, qwen2); the tiny glm4 template puts no EOS after an answer,
  so it differs from the first history answer on (one turn is exact). ChatGLM2/3 built
  by chattune have no chat template (:func:`chat_template` returns None).
- Messages that end with whitespace: the dummy-prefix tokenizers differ where a text
  piece follows (``▁▁``; ChatGLM-6B: a ``▁`` before ``[gMASK]``).

**Tools.** ``default``'s Jinja also renders tools (``apply_chat_template(..., tools=...)``,
OpenAI's wrapped function objects or bare ones), assistant ``tool_calls`` (wrapped or
chattune's ``{"name", "arguments"}``; arguments given as a JSON string are written as they
are) and ``tool`` results, as chattune renders them: the same text (checked by
``tests/templates/test_jinja.py``), tokenized as ``default`` is above. The other exported
templates render no tools (``chatglm3``'s tool format is not in its Jinja yet).

**Special-token text.** The export saves the tokenizer with ``split_special_tokens=False``
so that the special tokens the rendered string spells out are read as tokens; the check
does the same: it passes ``split_special_tokens=False`` to the tokenizer calls that
tokenize the rendered text (``tokenizer_kwargs`` of ``apply_chat_template``; so do the
probes of :func:`chat_template`), and leaves the tokenizer as it was.
chattune's own ChatGLM2/3 tokenizers are built with ``split_special_tokens=True``: their
special tokens never come out of text. With ``False``, any message text containing
``sop``, ``eop``, ``[MASK]``, ``</s>``, ``<|user|>``... is read as those tokens, whole
words included (``people`` becomes ``▁p`` ``eop`` ``▁le``, ``philosophy`` ``...sop▁hy``).
No template can avoid that; :func:`check_chat_template` probes it (its probe conversations
include such text) and reports it. Pass the tokenizer as the run trained with (not the
exported copy), so that chattune's side is the training tokenization.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

from chattune.data.encode import PieceEncoder, encode_prompt, special_token_ids
from chattune.data.records import split_prompt, user_text
from chattune.templates.registry import (
    ALPACA_INPUT_SYSTEM,
    ALPACA_SYSTEM,
    CHINESE_ALPACA_2_SYSTEM,
    MOSS_SYSTEM,
    VICUNA_SYSTEM,
    get_template,
)

PROBE_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What are the three primary colors?"},
     {"role": "assistant", "content": "Red, blue and yellow."},
     {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！有什么可以帮您？"},
     {"role": "user", "content": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram"}],
]
"""Conversations :func:`check_chat_template` always checks besides the caller's."""


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


_AS_EXPORTED = {"split_special_tokens": False}


def _ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids as the exported tokenizer gives them (special tokens read from text)."""
    return list(tokenizer(text, add_special_tokens=False, **_AS_EXPORTED)["input_ids"])


@contextmanager
def _restored(tokenizer):
    """Put back the fast tokenizer's backend flag that a ``split_special_tokens`` argument sets."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        yield
    finally:
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))


@dataclass(frozen=True)
class _Style:
    """How a tokenizer's whole-text tokenization differs from chattune's piece-by-piece one."""

    dummy: bool  # every text gets its own dummy prefix (sentencepiece ``▁``)
    trims: bool  # a text's outer spaces are dropped (ChatGLM-6B)
    prefix_after_special: bool  # a text after a special token gets the dummy prefix by itself
    specials: str  # the special prefix/suffix tokens, as text
    eos: str
    tokens: frozenset[str]  # ChatGLM3 role tokens this tokenizer has as tokens


def _style(tokenizer) -> _Style:
    specials = "".join(tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer)))
    eos = tokenizer.eos_token or ""
    probe = PieceEncoder(tokenizer)
    tokens = frozenset(t for t in ("<|system|>", "<|user|>", "<|assistant|>")
                       if probe._token_id(t) is not None)
    with _restored(tokenizer):
        a, b = _ids(tokenizer, "a"), _ids(tokenizer, "b")
        dummy = _ids(tokenizer, "a b") == a + b
        trims = dummy and _ids(tokenizer, "a ") == a
        after_special = True
        if dummy and eos:
            after_special = _ids(tokenizer, "a" + eos + "b")[-len(b):] == b
    return _Style(dummy, trims, after_special, specials, eos, tokens)


class _Writer:
    """Jinja for text pieces; ``after`` is what precedes a piece: ``"start"`` (the start of
    the text or a special token) or ``"text"`` (a text piece)."""

    def __init__(self, style: _Style):
        self.style = style

    def _space(self, after: str) -> bool:
        style = self.style
        return style.dummy and (after == "text" or (after == "start" and not style.prefix_after_special))

    def lit(self, text: str, after: str) -> str:
        """A template text piece."""
        if self.style.trims:
            text = text.strip(" ")
        if not text:
            return ""
        return "{{- " + _lit((" " if self._space(after) else "") + text) + " }}"

    def var(self, expr: str, after: str, nonempty: bool = False) -> str:
        """A message's text (the expression ``expr``, known to be ``nonempty`` or else
        checked: an empty piece has no tokens, so no space either)."""
        if self._space(after):
            if nonempty:
                return "{{- ' ' + " + expr + " }}"
            return "{%- if " + expr + " %}{{- ' ' + " + expr + " }}{%- endif %}"
        return "{{- " + expr + " }}"

    def special(self, text: str) -> str:
        """Special tokens, as their text."""
        return "{{- " + _lit(text) + " }}" if text else ""

    def token(self, text: str, after: str) -> tuple[str, str]:
        """A ``token`` piece (its id where the tokenizer has it, else text) and what follows it."""
        if text in self.style.tokens:
            return self.special(text), "start"
        return self.lit(text, after), "text"


_HEAD = """\
{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}
{%- set system = messages[0]['content'] if offset else '' %}
{%- set n = (messages | length - offset + 1) // 2 %}
"""
_USER_TEXT = ("{%- set q = message['content'] ~ ('\\n' ~ message['input'] if message['input'] is defined "
              "and message['input'] and message['content'] else (message['input'] if message['input'] "
              "is defined and message['input'] else '')) %}")
_LOOP = ("{%- for message in messages[offset:] %}\n{%- set i = loop.index0 // 2 %}\n"
         "{%- set gen = not loop.last or add_generation_prompt %}\n")


_DEFAULT_TOOLS = ("{%- set ns = namespace(tools=[]) %}{%- for tool in (tools or []) %}"
                  "{%- set ns.tools = ns.tools + [tool['function'] if tool['function'] is defined else tool] %}"
                  "{%- endfor %}")
"""The tools as chattune renders them: the function objects, unwrapped from OpenAI's
``{"type": "function", "function": {...}}``."""
_DEFAULT_CALLS = ("{%- set ns.calls = [] %}{%- for call in message['tool_calls'] %}"
                  "{%- set f = call['function'] if call['function'] is defined else call %}"
                  "{%- set args = f['arguments'] if f['arguments'] is defined else {} %}"
                  "{%- set ns.calls = ns.calls + ['<tool_call>{\"name\": ' ~ (f['name'] | tojson) ~ "
                  "', \"arguments\": ' ~ (args if args is string else args | tojson) ~ '}</tool_call>'] %}"
                  "{%- endfor %}"
                  "{%- set calls = ('\\n' if message['content'] else '') ~ (ns.calls | join('\\n')) %}")
"""An assistant message's calls as chattune writes them (``templates._call_json``: arguments
given as a JSON string are written as they are)."""


def _default(w: _Writer, s: _Style) -> str:
    after_tools = "{%- if system %}" + w.lit("Tools: ", "text") + "{%- else %}" + w.lit("Tools: ", "start") \
        + "{%- endif %}"
    return "\n".join([
        _HEAD + _DEFAULT_TOOLS + "{%- set ns.users = 0 %}" + w.special(s.specials),
        "{%- if system %}" + w.lit("System: ", "start") + w.var("system", "text", True) + w.lit("\n", "text")
        + "{%- endif %}",
        "{%- if ns.tools %}" + after_tools + w.var("(ns.tools | tojson)", "text", True) + w.lit("\n", "text")
        + "{%- endif %}",
        "{%- for message in messages[offset:] %}\n{%- set gen = not loop.last or add_generation_prompt %}",
        "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{%- if ns.users > 0 %}" + w.lit("\nHuman: ", "start") + "{%- elif system or ns.tools %}"
        + w.lit("Human: ", "text") + "{%- else %}" + w.lit("Human: ", "start") + "{%- endif %}",
        "{%- set ns.users = ns.users + 1 %}",
        w.var("q", "text") + "{%- if gen %}" + w.lit("\nAssistant: ", "text") + "{%- endif %}",
        "{%- elif message['role'] == 'tool' %}" + w.lit("\nTool: ", "start") + w.var("message['content']", "text"),
        "{%- if (loop.last and add_generation_prompt) or (not loop.last and loop.nextitem['role'] == 'assistant') %}"
        + w.lit("\nAssistant: ", "text") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}",
        w.var("(message['content'] or '')", "text") + _DEFAULT_CALLS + w.var("calls", "text", True) + w.special(s.eos),
        "{%- elif message['role'] == 'assistant' %}" + w.var("message['content']", "text") + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


def _alpaca(w: _Writer, s: _Style) -> str:
    has_input = "message['input'] is defined and message['input']"
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- if system %}" + w.var("system", "start") + w.lit("\n\n", "text") + "{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}",
        "{%- if i == 0 and system %}" + w.lit("### Instruction:\n", "text") + "{%- else %}"
        + w.lit("### Instruction:\n", "start") + "{%- endif %}",
        w.var("message['content']", "text"),
        "{%- if " + has_input + " %}" + w.lit("\n\n### Input:\n", "text") + w.var("message['input']", "text")
        + "{%- endif %}",
        "{%- if gen %}" + w.lit("\n\n### Response:\n", "text") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}" + w.var("message['content']", "text")
        + w.lit("\nEND\n", "text") + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


def _chatglm_tuning(w: _Writer, s: _Style) -> str:
    has_input = "message['input'] is defined and message['input']"
    after_answer_prompt = "start" if s.specials else "text"
    return "\n".join([
        _HEAD.rstrip("\n"),
        "{%- if system %}" + w.var("system", "start") + w.lit("\n", "text") + "{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}",
        "{%- if i == 0 and not system %}" + w.lit("Instruction: ", "start") + "{%- else %}"
        + w.lit("Instruction: ", "text") + "{%- endif %}",
        w.var("message['content']", "text") + w.lit("\n", "text"),
        "{%- if " + has_input + " %}" + w.lit("Input: ", "text") + w.var("message['input']", "text")
        + w.lit("\n", "text") + "{%- endif %}",
        "{%- if gen %}" + w.lit("Answer: ", "text") + "{%- if i == n - 1 %}" + w.special(s.specials)
        + "{%- endif %}{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}",
        "{%- if i == n - 1 %}" + w.var("message['content']", after_answer_prompt) + "{%- else %}"
        + w.var("message['content']", "text") + "{%- endif %}" + w.special(s.eos),
        "{%- if i < n - 1 %}" + w.lit("\n", "start") + "{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])


def _chatglm(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + "{%- if system %}{{- system }}{{- '\\n' }}{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{%- if n == 1 %}{{- q }}{%- else %}{{- '[Round ' ~ i ~ ']\\n问：' }}{{- q }}"
        "{%- if gen %}{{- '\\n答：' }}{%- endif %}{%- endif %}",
        "{%- if gen and i == n - 1 %}" + w.special(s.specials) + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}",
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- else %}{{- '\\n' }}{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])


def _chatglm2(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- if system %}{{- system }}{{- '\\n\\n' }}{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{{- '[Round ' ~ (i + 1) ~ ']\\n\\n问：' }}{{- q }}{%- if gen %}{{- '\\n\\n答：' }}{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}",
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- else %}{{- '\\n\\n' }}{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])


def _chatglm3(w: _Writer, s: _Style) -> str:
    system_token, after_system_token = w.token("<|system|>", "start")
    user_first, after_user = w.token("<|user|>", "start")
    user_later, _ = w.token("<|user|>", "text")  # after the system text or an answer
    assistant_token, after_assistant = w.token("<|assistant|>", "text")
    user = user_first if user_first == user_later else (
        "{%- if i == 0 and not system %}" + user_first + "{%- else %}" + user_later + "{%- endif %}")
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- if system %}" + system_token + w.lit("\n", after_system_token) + w.var("system", "text", True)
        + "{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        user + w.lit("\n", after_user) + w.var("q", "text"),
        "{%- if gen %}" + assistant_token + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}" + w.lit("\n", after_assistant)
        + w.var("message['content']", "text"),
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])


def _vicuna(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- set system = system if system else " + _lit(VICUNA_SYSTEM) + " %}",
        w.var("system", "start") + w.lit(" ", "text"),
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{%- if i == 0 %}" + w.lit("USER: ", "text") + "{%- else %}" + w.lit("USER: ", "start") + "{%- endif %}",
        w.var("q", "text") + "{%- if gen %}" + w.lit(" ASSISTANT:", "text") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}" + w.var("' ' + message['content']", "text")
        + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


# ---- joined templates (alpaca, chinese-alpaca, chinese-alpaca-2, moss, gpt4all): chattune tokenizes
# each run of text between special tokens (specials, EOS) as one text, so the Jinja writes the text
# as it is; only a run's first text may need the space a dummy-prefix tokenizer does not add by
# itself after a special token.

def _raw(text: str) -> str:
    """Template text inside a joined run."""
    return "{{- " + _lit(text) + " }}" if text else ""


def _start(w: _Writer, text: str) -> str:
    """Template text that starts a joined run (after the specials or EOS)."""
    return "{{- " + _lit((" " if w._space("start") else "") + text) + " }}"


_HAS_INPUT = "message['input'] is defined and message['input']"


def _stanford_alpaca(w: _Writer, s: _Style) -> str:
    first_input = ("messages | length > offset and messages[offset]['input'] is defined "
                   "and messages[offset]['input']")
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- set system = system if system else (" + _lit(ALPACA_INPUT_SYSTEM) + " if " + first_input
        + " else " + _lit(ALPACA_SYSTEM) + ") %}",
        w.var("system", "start", True) + _raw("\n\n"),
        _LOOP + "{%- if message['role'] == 'user' %}",
        "{%- if i > 0 %}" + _start(w, "\n\n### Instruction:\n") + "{%- else %}" + _raw("### Instruction:\n")
        + "{%- endif %}{{- message['content'] }}",
        "{%- if " + _HAS_INPUT + " %}" + _raw("\n\n### Input:\n") + "{{- message['input'] }}{%- endif %}",
        "{%- if gen %}" + _raw("\n\n### Response:") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}" + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


def _chinese_alpaca(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- set system = system if system else " + _lit(ALPACA_SYSTEM) + " %}",
        w.var("system", "start", True) + _raw("\n\n"),
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        _raw("### Instruction:\n") + "{{- q }}{%- if gen %}" + _raw("\n\n### Response: ") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}",
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- else %}" + _raw("\n\n") + "{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])


def _chinese_alpaca_2(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + "{%- set system = system if system else " + _lit(CHINESE_ALPACA_2_SYSTEM) + " %}",
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT + w.special(s.specials),
        "{%- if i == 0 %}" + _start(w, "[INST] <<SYS>>\n") + "{{- system }}" + _raw("\n<</SYS>>\n\n")
        + "{%- else %}" + _start(w, "[INST] ") + "{%- endif %}",
        "{{- q }}{%- if gen %}" + _raw(" [/INST]") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}" + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


def _moss(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- set system = system if system else " + _lit(MOSS_SYSTEM) + " %}",
        w.var("system", "start", True) + _raw("\n"),
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{%- if i > 0 %}" + _raw("\n") + "{%- endif %}" + _raw("<|Human|>: ") + "{{- q }}",
        "{%- if gen %}" + _raw("<eoh>\n<|MOSS|>:") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] }}" + _raw("<eom>"),
        "{%- endif %}\n{%- endfor %}",
    ])


def _gpt4all(w: _Writer, s: _Style) -> str:
    return "\n".join([
        _HEAD + w.special(s.specials),
        "{%- if system %}" + _start(w, "### System:\n") + "{{- system }}" + _raw("\n") + "{%- endif %}",
        _LOOP + "{%- if message['role'] == 'user' %}" + _USER_TEXT,
        "{%- if i == 0 and system %}" + _raw("### Human:\n") + "{%- else %}" + _start(w, "### Human:\n")
        + "{%- endif %}{{- q }}",
        "{%- if gen %}" + _raw("\n### Assistant:\n") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}" + w.special(s.eos),
        "{%- endif %}\n{%- endfor %}",
    ])


_WRITERS = {
    "default": _default, "tutorial-alpaca": _alpaca, "chatglm-tuning": _chatglm_tuning, "chatglm": _chatglm,
    "chatglm2": _chatglm2, "chatglm3": _chatglm3, "vicuna": _vicuna, "alpaca": _stanford_alpaca,
    "chinese-alpaca": _chinese_alpaca, "chinese-alpaca-2": _chinese_alpaca_2, "moss": _moss, "gpt4all": _gpt4all,
}


def chat_template(template: str, tokenizer) -> str | None:
    """The Jinja chat template that renders the named chattune ``template`` for ``tokenizer``
    (resolved, not ``auto``; TemplateError for an unknown name); for ``tokenizer`` the
    tokenizer's own chat template (None when it has none).

    Messages have roles system (first only), user and assistant; a user message may carry
    an Alpaca ``input`` (rendered as chattune renders it). ``add_generation_prompt`` adds
    the text before the answer. A conversation that ends with an answer renders as
    chattune's training text (with EOS where the template trains one).
    """
    named = get_template(template)
    if named is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        return own or None
    style = _style(tokenizer)
    return _WRITERS[template](_Writer(style), style)


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as a chat template gets them from a client: the user's text includes the input."""
    return [{"role": m["role"], "content": user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages]


def _special_text(tokenizer, messages: list[dict]) -> list[str]:
    """Special tokens whose text occurs in the messages' text."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials |= {str(token) for token in decoder.values()}
    text = "\n".join(user_text(m) if m["role"] == "user" else m["content"] for m in messages)
    return sorted(t for t in specials if t and t in text)


def _describe(label: str, tokenizer, want: list[int], got: list[int], rendered: str, style: _Style | None,
              messages: list[dict]) -> str:
    """What differs (the first differing token and its neighbours) and the likely cause."""
    at = next((k for k, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
    lo = max(0, at - 2)

    def tokens(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids[lo:at + 4])

    found = _special_text(tokenizer, messages)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    near = set(want[at:at + 1] + got[at:at + 1])
    if found and getattr(tokenizer, "split_special_tokens", False):
        why = (f"the message text contains {', '.join(found)}, which chattune's tokenizer reads as text and the "
               "exported one (split_special_tokens=False) as special tokens")
    elif style is None and tokenizer.eos_token_id in want[at:at + 1]:
        why = ("chattune ends each history answer with EOS (it trains the model to stop there), the tokenizer's "
               "chat template does not put the EOS token after an answer")
    elif style is None:
        why = ("chattune tokenizes the template's text and the messages apart, the whole rendered text merges "
               "across a boundary between them")
    elif near & special_ids or at == 0:
        why = ("the tokenizer does not give the special-token text the Jinja spells out, or the text next to it, "
               "the ids chattune has there (e.g. ChatGLM-6B puts '▁' before '[gMASK]' at the start of a text and "
               "drops the whitespace next to '<sop>'/'<eop>')")
    elif style.dummy:
        why = ("a merge across a piece boundary: a piece that ends with a space gives '▁▁' with the next "
               "piece's dummy prefix, where chattune has '▁' '▁...'")
    else:
        why = ("whole-text tokenization merges across a piece boundary that chattune tokenizes apart "
               "(e.g. a piece that ends with a space before a word)")
    short = rendered if len(rendered) <= 300 else rendered[:300] + "..."
    return (f"{label}: the chat template gives other ids than chattune from token {at} on "
            f"({len(got)} vs {len(want)} tokens): chat template {tokens(got)} vs chattune {tokens(want)}; "
            f"likely cause: {why}; rendered: {short!r}")


def _probes(tokenizer) -> list[tuple[str, list[dict]]]:
    """The built-in probe conversations, one of them made of the tokenizer's special-token text."""
    cases = [(f"probe conversation {i}", messages) for i, messages in enumerate(PROBE_CONVERSATIONS)]
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    if specials:
        typed = "People type special-token text: " + " ".join(sorted(specials))
        cases.append(("probe conversation with special-token text", [{"role": "user", "content": typed}]))
    return cases


def check_chat_template(template: str, tokenizer, conversations: list[list[dict]], *,
                        probes: bool = True) -> list[str]:
    """Render each conversation with the Jinja of :func:`chat_template` and with chattune;
    one description per conversation whose ids differ (empty: all equal). With ``probes``
    :data:`PROBE_CONVERSATIONS` and a message made of the tokenizer's special-token text are
    checked too, so that a (template, tokenizer) pair that cannot be exact is always reported.

    chattune's ids: ``encode_prompt(messages, template, PieceEncoder(tokenizer))`` with the
    tokenizer as given: pass the one the run trained with, not the exported copy. The chat
    template's ids: ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``
    tokenized as the exported tokenizer does, with ``split_special_tokens=False`` (passed to
    the tokenizer call; the tokenizer itself is left as it was). A conversation that ends
    with an answer is checked without it. Named templates get the messages as chattune has
    them (an Alpaca ``input`` included); ``tokenizer`` gets them as a client sends them (the
    input inside the user's text), as chattune renders that template.
    """
    jinja = chat_template(template, tokenizer)
    if not jinja:
        name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
        return [f"template {template!r}: the tokenizer {name} has no chat template"]
    named = get_template(template)
    style = _style(tokenizer) if named is not None else None
    encoder = PieceEncoder(tokenizer)
    cases = [(f"conversation {i}", messages) for i, messages in enumerate(conversations)]
    cases += _probes(tokenizer) if probes else []
    problems = []
    for label, messages in cases:
        messages, _ = split_prompt(messages)
        if not messages or messages[-1]["role"] != "user":
            problems.append(f"{label}: expected a conversation that ends with a user message")
            continue
        want = encode_prompt(messages, template, encoder)
        given = messages if named is not None else _plain(messages)
        try:
            with _restored(tokenizer):
                rendered = tokenizer.apply_chat_template(given, chat_template=jinja, add_generation_prompt=True,
                                                         tokenize=False)
                got = tokenizer.apply_chat_template(given, chat_template=jinja, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False, tokenizer_kwargs=_AS_EXPORTED)
        except Exception as exc:  # jinja2 errors, the template's raise_exception()
            problems.append(f"{label}: the chat template failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            continue
        if hasattr(got, "tolist"):
            got = got.tolist()
        got = list(got)
        if got != want:
            problems.append(_describe(label, tokenizer, want, got, rendered, style, messages))
    return problems


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
    from chattune.templates.registry import TemplateError, render, render_text

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
