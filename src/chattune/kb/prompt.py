"""The knowledge-base prompt: retrieved chunks and a question -> the user message, sources, footnotes.

The Chinese instruction is Langchain-Chatchat 0.2's ``knowledge_base_chat`` template
(``PROMPT_TEMPLATES["knowledge_base_chat"]["default"]`` in its
``configs/prompt_config.py.example``, chatchat-space/Langchain-Chatchat, v0.2.x), with
the known information being the retrieved chunks joined by newlines as there. Two
stray characters of the original are dropped: the newlines around the triple-quoted
string and the "、" after ``</已知信息>``. English questions get the same instruction in
English. A question is Chinese when it holds a CJK ideograph.

When no chunk is relevant enough, the model is not asked at all: :func:`cannot_answer`
is the reply, the very sentence the instruction tells the model to say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chattune.kb.index import has_cjk
from chattune.kb.store import Hit

TEMPLATE_ZH = (
    "<指令>根据已知信息，简洁和专业的来回答问题。如果无法从中得到答案，请说 “根据已知信息无法回答该问题”，"
    "不允许在答案中添加编造成分，答案请使用中文。 </指令>\n"
    "<已知信息>{context}</已知信息>\n"
    "<问题>{question}</问题>"
)
TEMPLATE_EN = (
    "<instruction>Answer the question concisely and professionally from the known information. "
    "If the answer cannot be found in it, say \"The question cannot be answered from the known "
    "information\". Do not add anything made up. Answer in English. </instruction>\n"
    "<known_information>{context}</known_information>\n"
    "<question>{question}</question>"
)
CANNOT_ANSWER_ZH = "根据已知信息无法回答该问题"
CANNOT_ANSWER_EN = "The question cannot be answered from the known information."


@dataclass(frozen=True)
class KbPrompt:
    """What to send and what to cite for one question.

    ``content``: the user message (the instruction, the known information, the question);
    ``sources``: ``[{"file", "chunk", "score"}]``, the n-th cited by the marker ``[n]``;
    ``markers``: ``"[1][2]..."`` to append to the answer; ``footnotes``: one line per
    source, ``[n] FILE, chunk C (score S)``, to print under it.
    """

    content: str
    sources: list[dict]
    markers: str
    footnotes: str


def is_chinese(text: str) -> bool:
    """Whether a question is answered in Chinese: it holds a CJK ideograph."""
    return has_cjk(text)


def kb_prompt(question: str, hits: Sequence[Hit]) -> KbPrompt:
    """The message that asks the model to answer ``question`` from ``hits`` only, and its sources.

    ``hits`` must not be empty (when :func:`chattune.kb.store.search` finds nothing,
    reply with :func:`cannot_answer` instead).
    """
    if not hits:
        raise ValueError("kb_prompt: no hits; reply with cannot_answer(question) instead")
    template = TEMPLATE_ZH if is_chinese(question) else TEMPLATE_EN
    context = "\n".join(hit.text for hit in hits)
    sources = [hit.source() for hit in hits]
    markers = "".join(f"[{n}]" for n in range(1, len(hits) + 1))
    footnotes = "\n".join(f"[{n}] {s['file']}, chunk {s['chunk']} (score {s['score']:.2f})"
                          for n, s in enumerate(sources, start=1))
    return KbPrompt(template.format(context=context, question=question.strip()), sources, markers, footnotes)


def cannot_answer(question: str) -> str:
    """The "cannot answer from the known information" reply, in the question's language."""
    return CANNOT_ANSWER_ZH if is_chinese(question) else CANNOT_ANSWER_EN
