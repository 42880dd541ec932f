"""Request bodies of the OpenAI-compatible API, and its error format.

Fields are strict (a string is not a number, ``1`` is not ``true``); unknown
fields are ignored, as OpenAI-compatible servers do. Options chattune does not
implement are accepted only at their neutral value, so a client that asks for
them gets a clear 400 rather than a silent no-op. Every field is checked to the
range the engine can take: floats are finite, ``seed`` fits a 64-bit generator
seed, and text must be valid Unicode (JSON's ``\\ud800`` escapes can write a lone
surrogate, which no tokenizer or UTF-8 encoder takes).

A user message's content may be OpenAI's content parts: text parts and ``image_url`` parts.
An image must come as a base64 ``data:`` URL in the request itself: the server fetches no
remote URL and reads no file of its own disk for a client (``file://`` URLs and paths are
refused). Each image part becomes a :data:`~chattune.vision.images.PLACEHOLDER` in the
message's text, its URL one of the message's ``images``, in order.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from chattune.data.formats import from_openai
from chattune.data.records import RecordError, check_tools, validate_messages
from chattune.vision.images import PLACEHOLDER, describe

STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
SEED_MIN, SEED_END = -2**63, 2**64  # what torch.Generator.manual_seed takes


def unicode_text(text: str) -> str:
    """``text`` unchanged if it can be written as UTF-8; else a ValueError naming the lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (unpaired surrogate {text[exc.start]!r} at character "
                         f"{exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8 (a lone surrogate echoed from a request becomes an escape)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers or {}

    def body(self) -> dict:
        """The JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def sse_event(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as compact JSON (non-ASCII kept)."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object (any text a request put in it made safe to write as UTF-8)."""
    return {"error": {"message": printable(message), "type": type, "param": param and printable(param),
                      "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part) -> bool:
    """pydantic names the member of a union it tried (``str``, ``list[int]``) in the location."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def field_path(loc: tuple) -> str | None:
    """pydantic's error location as the field a client wrote, ``messages[0].content``
    (cut at a union's member); None for the body as a whole."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if _is_type_tag(part):
            break
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message and the field it is about, from pydantic's errors (the first field's)."""
    first = errors[0]
    param = field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    same = [e for e in errors if field_path(tuple(e.get("loc", ()))) == param]
    tags = [next((p for p in e["loc"] if _is_type_tag(p)), None) for e in same]
    checked = [e for e in same if e.get("type") == "value_error"]  # our own check said why
    if checked:
        message = checked[0]["msg"].removeprefix("Value error, ")
    elif len(same) > 1 and all(tags):
        message = f"expected one of {', '.join(dict.fromkeys(tags))}"
    else:
        message = first["msg"]
    return (f"{param}: {message}" if param else f"request body: {message}"), param


class ImageURL(BaseModel):
    """An ``image_url`` part's image: ``url`` (a base64 ``data:image/...`` URL here) and
    ``detail`` (accepted, not used: the model's processor decides the resolution)."""

    model_config = STRICT
    url: Text
    detail: Text | None = None


class ContentPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": ...}`` or
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (a user's)."""

    model_config = STRICT
    type: Text
    text: Text | None = None
    image_url: ImageURL | Text | None = None

    def url(self) -> str | None:
        """The image's URL (an ``image_url`` given as a bare string too)."""
        return self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url


SEND_DATA_URL = "send the image in the request as a base64 data: URL (data:image/png;base64,...)"


def image_ref(url: str | None, where: str) -> str:
    """An image part's URL checked for a server: a base64 ``data:`` URL as it is; an APIError
    (400 naming ``where``) for a remote URL (nothing is fetched) and for a ``file://`` URL or a
    path (a server reads no file of its own disk for a client)."""
    ref = url.strip() if isinstance(url, str) else ""
    if ref.startswith("data:"):
        return ref
    if not ref:
        raise APIError(400, f"{where}: the image's URL is empty; {SEND_DATA_URL}", param=where)
    scheme = urlparse(ref).scheme.lower()
    if scheme not in ("", "file") and "://" in ref:  # http(s), ftp, s3, ...: nothing is fetched
        raise APIError(400, f"{where}: {describe(ref)}: remote image URLs are not fetched; {SEND_DATA_URL}",
                       param=where)
    raise APIError(400, f"{where}: {describe(ref)}: this server reads no image files from its own disk; "
                   f"{SEND_DATA_URL}", param=where)


class FunctionCall(BaseModel):
    """A call's function: its name and arguments (a JSON text, as OpenAI writes them; an object
    is taken too)."""

    model_config = STRICT
    name: Text
    arguments: Text | dict = "{}"


class ToolCall(BaseModel):
    """One of an assistant message's ``tool_calls``."""

    model_config = STRICT
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """A chat message. ``input`` (an Alpaca input, an extension) goes to templates that show it
    apart. ``content`` is a text or a list of content parts (text; and images, in a user's
    message). An assistant message may carry ``tool_calls`` (its content then may be null); a
    ``tool`` message is a call's result, naming the call by ``tool_call_id``."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    input: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None


class Tool(BaseModel):
    """One of ``tools``: ``{"type": "function", "function": {name, description?, parameters?}}``
    (the function object is checked as training data's tools are)."""

    model_config = STRICT
    type: Literal["function"]
    function: dict


TOOL_CHOICES = ("auto", "none", "required")


class StreamOptions(BaseModel):
    """``stream_options``: a last chunk with the usage."""

    model_config = STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields chat and plain completions share."""

    model_config = STRICT
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Text | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False

    def check_supported(self) -> None:
        """Refuse options that are valid in the API but not implemented here."""
        if self.n != 1:
            raise APIError(400, "n: only n=1 is supported; send separate requests (they are batched)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name}: not supported (use repetition_penalty)", param=name)
        for i, stop in enumerate(self.stop_list()):
            if not stop:
                raise APIError(400, f"stop[{i}]: empty stop string", param="stop")
        if len(self.stop_list()) > 16:
            raise APIError(400, "stop: at most 16 stop strings", param="stop")

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: Text | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        """As for every request, plus logprobs and structured output."""
        super().check_supported()
        if self.logprobs:
            raise APIError(400, "logprobs: not supported", param="logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format: only 'text' is supported", param="response_format")

    def functions(self) -> list[dict] | None:
        """``tools`` as canonical function objects ``{name, description?, parameters?}`` (None
        for none), checked like training data's tools: a 400 naming the field otherwise."""
        if not self.tools:
            return None
        try:
            return check_tools([tool.model_dump() for tool in self.tools], "request")
        except RecordError as exc:
            raise _record_error(exc) from exc

    def choice(self, functions: list[dict] | None) -> str | dict:
        """``tool_choice`` checked against the tools: ``auto`` (the default), ``none``,
        ``required`` or ``{"type": "function", "function": {"name": ...}}`` naming one of them."""
        choice = self.tool_choice
        if choice is None:
            return "auto"
        names = [function["name"] for function in functions or []]
        if isinstance(choice, str):
            if choice not in TOOL_CHOICES:
                raise APIError(400, f"tool_choice: expected one of {', '.join(TOOL_CHOICES)} or "
                               f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}',
                               param="tool_choice")
            if choice == "required" and not names:
                raise APIError(400, "tool_choice: 'required' needs tools", param="tool_choice")
            return choice
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice: expected {"type": "function", "function": {"name": ...}} or one '
                           f"of {', '.join(TOOL_CHOICES)}", param="tool_choice")
        if name not in names:
            known = f"the tools are {', '.join(names)}" if names else "the request has no tools"
            raise APIError(400, f"tool_choice: function {name!r} is not one of the tools ({known})",
                           param="tool_choice")
        return {"type": "function", "function": {"name": name}}

    def conversation(self) -> list[dict]:
        """The messages as chattune's records (text content, ``developer`` as ``system``; calls
        and results read as training data's OpenAI messages are; a user message's image parts
        as placeholders in its text and data URLs in its ``images``), checked like training data:
        roles in order, no empty user message, one result per call, ending with the user's turn
        or a tool's result. (A call need not name one of ``tools``: a client may offer other
        tools than a conversation's earlier calls used.)"""
        raw, images = [], {}
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                content, found = self._parts_text(i, message.role, content)
                if found:
                    images[i] = found
            if content is None and not (message.role == "assistant" and message.tool_calls):
                raise APIError(400, f"messages[{i}].content: expected text (null only for an assistant "
                               "message with tool_calls)", param=f"messages[{i}].content")
            if message.tool_calls is not None and message.role != "assistant":
                raise APIError(400, f"messages[{i}].tool_calls: only an assistant message may carry tool_calls",
                               param=f"messages[{i}].tool_calls")
            item = {"role": "system" if message.role == "developer" else message.role, "content": content}
            if message.input:
                item["input"] = message.input
            if message.tool_calls:
                item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
            if message.role == "tool":
                item.update({key: value for key in ("tool_call_id", "name")
                             if (value := getattr(message, key)) is not None})
            raw.append(item)
        try:
            messages = from_openai({"messages": raw}, "request")
            validate_messages(messages, "request", need_answer=False)
        except RecordError as exc:
            raise _record_error(exc) from exc
        if messages[-1]["role"] not in ("user", "tool"):
            raise APIError(400, f"messages[{len(messages) - 1}].role: the last message must be the user's "
                           "(or a tool's result)", param=f"messages[{len(messages) - 1}].role")
        for i, found in images.items():  # a user message keeps its place (only tool results are reordered)
            messages[i]["images"] = [ref for ref, _ in found]
        return messages

    def _parts_text(self, i: int, role: str, parts: list[ContentPart]) -> tuple[str, list[tuple[str, str]]]:
        """Message ``i``'s content parts as one text (an image part as :data:`PLACEHOLDER`) and
        its images as (data URL, the part's field), in order."""
        texts, images = [], []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text" and part.text is not None:
                texts.append(part.text)
            elif part.type == "image_url" and part.image_url is not None:
                if role != "user":
                    raise APIError(400, f"{where}: only a user message may carry images", param=where)
                images.append((image_ref(part.url(), where), where))
                texts.append(PLACEHOLDER)
            else:
                raise APIError(400, f'{where}: expected {{"type": "text", "text": ...}} or {{"type": "image_url", '
                               f'"image_url": {{"url": "data:image/png;base64,..."}}}}, got type {part.type!r}',
                               param=where)
        return "".join(texts), images

    def image_parts(self) -> list[tuple[int, str, str]]:
        """(message index, data URL, the part's field) of every image part, in order (each URL
        checked as :meth:`conversation` checks it)."""
        found = []
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                found += [(i, ref, where) for ref, where in self._parts_text(i, message.role, message.content)[1]]
        return found

    def literal_placeholders(self, marks: tuple[str, ...]) -> str | None:
        """The first text field (``messages[2].content[0].text``) that writes one of ``marks``
        itself (a vision-language model's image token: only an image part may put it in a
        prompt), or None."""
        for i, message in enumerate(self.messages):
            fields = [(f"messages[{i}].content", message.content), (f"messages[{i}].input", message.input)]
            if isinstance(message.content, list):
                fields[:1] = [(f"messages[{i}].content[{j}].text", part.text) for j, part in enumerate(message.content)]
            for name, text in fields:
                if isinstance(text, str) and any(mark in text for mark in marks):
                    return name
        return None


def _record_error(exc: RecordError) -> APIError:
    """A record check's error about the request as a 400 naming the field (``messages[2].content``)."""
    text = str(exc).removeprefix("request: ").removeprefix("request.")
    head = text.split(": ", 1)[0]
    param = head if head.startswith(("messages[", "tools[")) else "messages"
    return APIError(400, text, param=param)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a plain prompt, continued as it is (no template)."""

    prompt: Text | list[Text] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def check_supported(self) -> None:
        """As for every request, plus the completion-only options."""
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo: not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix: not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of: only 1 is supported", param="best_of")
        if self.logprobs is not None:
            raise APIError(400, "logprobs: not supported", param="logprobs")


class RewardMessage(BaseModel):
    """A message of a conversation a reward model scores: a role and its text."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text


MAX_REWARD_CONVERSATIONS = 256
"""The most conversations one ``POST /v1/rewards`` may score."""


class RewardRequest(BaseModel):
    """``POST /v1/rewards`` (a chattune extension): ``messages`` is one conversation (a list of
    ``{role, content}`` messages ending with the assistant's answer) or a list of such
    conversations; each gets one reward. The conversations are checked by :meth:`conversations`,
    so that an error names the field as the client wrote it (``messages[1][2].content``)."""

    model_config = STRICT
    model: Text | None = None
    messages: list = Field(min_length=1)

    def conversations(self) -> tuple[list[tuple[str, list[dict]]], bool]:
        """((field, messages as records) for every conversation, whether the body sent a single
        conversation); APIError 400 naming the field at fault."""
        from pydantic import TypeAdapter, ValidationError

        single = isinstance(self.messages[0], dict)
        given = [(("messages",), self.messages)] if single else [
            (("messages", i), conversation) for i, conversation in enumerate(self.messages)]
        if len(given) > MAX_REWARD_CONVERSATIONS:
            raise APIError(400, f"messages: at most {MAX_REWARD_CONVERSATIONS} conversations per request, got "
                           f"{len(given)}", param="messages")
        adapter = TypeAdapter(list[RewardMessage])
        out = []
        for loc, conversation in given:
            where = field_path(loc)
            if not isinstance(conversation, list) or len(conversation) < 2:
                raise APIError(400, f"{where}: expected a conversation: a list of messages (the prompt, then the "
                               "assistant's answer)", param=where)
            try:
                messages = adapter.validate_python(conversation)
            except ValidationError as exc:
                message, param = validation_message([{**e, "loc": (*loc, *e["loc"])} for e in exc.errors()])
                raise APIError(400, message, param=param) from None
            out.append((where, [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                                for m in messages]))
        return out, single


def not_a_reward_model(name: str, stage: str) -> APIError:
    """The 400 a chat model's server answers ``POST /v1/rewards`` with."""
    return APIError(400, f"model {name!r} is not a reward model (it was trained with stage {stage}); "
                    "/v1/rewards needs a reward-model run (stage: rm) served: chattune serve RM_RUN",
                    param="model", code="not_a_reward_model")
