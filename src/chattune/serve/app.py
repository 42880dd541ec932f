"""The FastAPI app: OpenAI's routes over the batching engine.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (and ``POST /v1/rewards``, refused: a reward model is served by
:mod:`chattune.serve.rewards`), with server-sent events for ``stream``; chat requests may offer
``tools`` (see :mod:`chattune.serve.calls` for the calls' shape in and out), and, to a
vision-language model, images as ``image_url`` content parts (base64 ``data:`` URLs only:
nothing is fetched and no file of the server's disk is read; each image is checked and decoded
before the request joins the batch, so that a bad one is a 400 of its own). Every error
is OpenAI's ``{"error": {...}}`` body naming the field at fault. The API key
and the body-size limit are plain ASGI middleware, checked before a body is
parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from chattune.inference.decoding import BASE_ADAPTER, Event, Sequence
from chattune.inference.generate import sequence
from chattune.inference.runs import ImagesNotSupported, LoadedRun, PromptTooLong, ServedModel
from chattune.inference.sampling import SamplingParams, params_from_defaults
from chattune.serve import calls, retrieval
from chattune.serve import ui as ui_module
from chattune.serve.calls import ToolPlan, plan_tools, prefix_ids
from chattune.serve.engine import Engine, QueueFull
from chattune.serve.schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
    not_a_reward_model,
    sse_event,
    validation_message,
)
from chattune.templates.pieces import TemplateError, ToolsNotSupportedError
from chattune.vision.images import (
    MAX_IMAGE_PIXELS,
    PLACEHOLDER,
    ImageError,
    decode_image,
    describe,
    image_bytes,
)


async def _send_error(scope, receive, send, status: int, body: dict, headers: dict | None = None) -> None:
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class RequireKey:
    """ASGI middleware: with a key set, every path but ``/health`` (and the web page's files,
    when ``open_path`` says so) needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str | None, open_path=lambda path: False):
        self.app, self.key, self.open_path = app, key, open_path

    async def __call__(self, scope, receive, send):
        """Answer 401 without the right key; otherwise pass the request on."""
        if (scope["type"] != "http" or not self.key or scope["path"] == "/health"
                or self.open_path(scope["path"])):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if header else
                   "Missing API key: send the header 'Authorization: Bearer <key>'.")
        await _send_error(scope, receive, send, 401, error_body(message, code="invalid_api_key"),
                          {"WWW-Authenticate": "Bearer"})


class LimitBody:
    """ASGI middleware: a body over ``limit`` bytes (or its path's limit in ``path_limits``)
    gets 413 before anything parses it."""

    def __init__(self, app, limit: int, path_limits: dict[str, int] | None = None):
        self.app, self.limit, self.path_limits = app, limit, path_limits or {}

    async def __call__(self, scope, receive, send):
        """Read the whole body (at most the limit), then hand it on."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.limit)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = error_body(f"the request body is larger than this server's limit of {limit} bytes",
                             code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            return await _send_error(scope, receive, send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_error(scope, receive, send, 413, too_big)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


MIN_TEMPERATURE = 1e-5
MAX_REQUEST_PIXELS = MAX_IMAGE_PIXELS
"""The most pixels one request's images may hold together (each is decoded before the request
joins the batch, and kept until it has been read)."""
UNCUT = 1 << 62
"""A prompt budget no conversation reaches: a server refuses a prompt too long, never cuts it."""


def _status_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def _no_room(prompt_field: str, prompt_tokens: int | str, limit: int) -> APIError:
    """The 400 for a prompt of ``prompt_tokens`` tokens (a number, or ``at least N``) that fills the context."""
    return APIError(400, f"{prompt_field}: the prompt is {prompt_tokens} tokens and the model's context is "
                    f"{limit} tokens, which leaves no room for an answer", param=prompt_field,
                    code="context_length_exceeded")


def _sampling(profile: ServedModel, body: SamplingFields, prompt_tokens: int, limit: int,
              prompt_field: str) -> SamplingParams:
    """Request settings over the run's generation defaults, checked against the context length."""
    room = limit - prompt_tokens
    if room < 1:
        raise _no_room(prompt_field, prompt_tokens, limit)
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    requested = getattr(body, field)
    if requested is not None and requested > room:
        raise APIError(400, f"{field}: {requested} tokens asked for, but the model's context is {limit} tokens "
                       f"and the prompt takes {prompt_tokens}: at most {room}", param=field,
                       code="context_length_exceeded")
    params = params_from_defaults(profile.generation, requested, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                  ignore_eos=body.ignore_eos)
    params.max_tokens = min(params.max_tokens, room)
    if params.temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow: so small a temperature is greedy
        params.temperature = 0.0
    return params


def _claimed_pixels(data: bytes) -> int:
    """The pixels an image's header claims (0 when Pillow cannot read it: decoding says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return width * height
    except Exception:  # unreadable, or a bomb Pillow refuses: decode_image says why
        return 0


def read_images(parts: list[tuple[int, str, str]]) -> dict[int, list]:
    """The images of a request's ``image_url`` parts ((message index, data URL, field)),
    decoded (RGB Pillow images) by message; a 400 naming the part for one that cannot be used
    (not base64, not an image, corrupt, over :data:`~chattune.vision.images.MAX_IMAGE_PIXELS`
    by its header) and for images over :data:`MAX_REQUEST_PIXELS` together."""
    found: dict[int, list] = {}
    total = 0
    for index, ref, where in parts:
        try:
            data = image_bytes(ref, where)
            claimed = _claimed_pixels(data)
            if total and total + claimed > MAX_REQUEST_PIXELS:
                raise APIError(400, f"{where}: the request's images hold more than {MAX_REQUEST_PIXELS:,} pixels "
                               "together; send fewer or smaller images", param=where, code="invalid_image")
            image = decode_image(data, describe(ref), where)
        except ImageError as exc:
            raise APIError(400, str(exc), param=where, code="invalid_image") from exc
        total += image.width * image.height
        found.setdefault(index, []).append(image)
    return found


def _image_tokens(served: LoadedRun, ids: list[int], images: list, prompt_field: str) -> None:
    """A 400 unless ``ids`` hold the model's image token exactly as often as ``images`` expand
    into it (a text that writes the token itself would leave the model's image features and
    its image tokens apart, and fail the whole batch's forward pass)."""
    vision = served.vision
    if vision is None:
        return
    with served.tokenizer_lock:
        expected = sum(vision.expansion(image).count(vision.image_token_id) for image in images)
    found = ids.count(vision.image_token_id)
    if found != expected:
        raise APIError(400, f"{prompt_field}: the prompt holds the model's image token {vision.placeholder} "
                       f"{found} times where its {len(images)} image(s) take {expected}; only an image "
                       "(an image_url content part) may put it in a prompt", param=prompt_field)


async def _events(request: Request, queue: asyncio.Queue, seq: Sequence, engine: Engine) -> AsyncIterator[Event]:
    """The request's events until it ends; the client leaving ends it too, and frees its slot."""

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(Event("gone"))

    watcher = asyncio.ensure_future(watch())
    try:
        while True:
            event = await queue.get()
            if event.kind == "gone":
                return
            yield event
            if event.kind != "text":
                return
    finally:
        watcher.cancel()
        engine.cancel(seq)


def add_error_handlers(app: FastAPI) -> None:
    """Every error ``app`` answers as OpenAI's ``{"error": {...}}`` body: our own
    :class:`~chattune.serve.schema.APIError`, pydantic's 422 (a 400 naming the field), unknown
    routes and methods, and anything unexpected (a 500)."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        """Our own errors, already in OpenAI's format."""
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        """pydantic's 422 as a 400 naming the field."""
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        """Anything else: a 500 in OpenAI's format, never a dropped connection (starlette still
        raises it on, so the server logs the traceback)."""
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        """Unknown routes and methods, in OpenAI's format."""
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, _status_type(exc.status_code)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def create_app(served: LoadedRun, engine: Engine, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, ui: bool = True, runs_dir: str | None = None,
               kbs: retrieval.KbServing | None = None) -> FastAPI:
    """The API over a loaded model and a running engine (neither is started or stopped here);
    with ``ui`` also the web page (:mod:`chattune.serve.ui`), showing the served runs and
    those under ``runs_dir``; with ``kbs`` every model also answers from each knowledge base
    as ``MODEL+NAME`` (:mod:`chattune.serve.retrieval`)."""
    app = FastAPI(title="chattune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.engine = served, engine
    app.add_middleware(LimitBody, limit=max_body_bytes)
    app.add_middleware(RequireKey, key=api_key, open_path=ui_module.is_open_path if ui else lambda path: False)
    if ui:
        ui_module.add_ui(app, lambda: {name: p.run_dir for name, p in served.profiles.items()}, runs_dir)
    vocab = served.model.get_input_embeddings().num_embeddings
    served.fewest_prompt_tokens([])  # decodes every token once, before a request waits for it
    kb_models = retrieval.kb_profiles(served.profiles, kbs)
    app.state.kb_names = list(kbs.bases) if kbs else []

    add_error_handlers(app)

    created = int(time.time())

    def pick(name: str | None) -> ServedModel:
        """The model a request names (the default when it names none), or 404."""
        profile = served.profiles.get(name or served.default) or kb_models.get(name, (None,))[0]
        if profile is None:
            raise APIError(404, f"The model '{name}' does not exist; this server has: "
                           f"{', '.join([*served.profiles, *kb_models])}", param="model", code="model_not_found")
        return profile

    def card(profile: ServedModel) -> dict:
        """A model as /v1/models lists it (``vision``: whether it reads images)."""
        extra = retrieval.card_extra(kbs, kb_models[profile.name][1]) if profile.name in kb_models else {}
        return {"id": profile.name, "object": "model", "created": created, "owned_by": "chattune",
                "root": str(profile.run_dir) if profile.run_dir else None,
                "parent": None if profile.adapter == BASE_ADAPTER else "base",
                "template": profile.template, "context_length": served.context_length,
                "vision": served.vision is not None and profile.name not in kb_models, **extra}

    @app.get("/health")
    async def health():
        """Liveness and load; needs no API key."""
        body = {"status": "ok" if engine.alive else "stopped", **engine.stats(), "models": [*served.profiles, *kb_models]}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def list_models():
        """Every name the ``model`` field may take."""
        return {"object": "list", "data": [card(p) for p in [*served.profiles.values(),
                                                              *(p for p, _ in kb_models.values())]]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        """One model, or 404."""
        return card(pick(name))

    def chat_prompt(model: ServedModel, messages: list[dict], shown: list[dict] | None, choice: str | dict,
                    body: ChatCompletionRequest, parts: list[tuple[int, str, str]]
                    ) -> tuple[list[int], list, ToolPlan | None, SamplingParams]:
        """A chat request's prompt ids, the images they hold (in order), tool plan and sampling
        settings (CPU work, for a worker thread). A conversation that cannot fit the context is
        refused before it is rendered when its users' text alone is too long, else as soon as its
        tokens counted fill it. Images (``parts``) are decoded here, and each expanded into its
        tokens by the model's processor."""
        limit = served.context_length
        fewest = served.fewest_prompt_tokens(messages)
        if fewest >= limit:
            raise _no_room("messages", f"at least {fewest}", limit)
        images: list = []
        try:
            if parts:
                decoded = read_images(parts)
                messages = [{**m, "images": decoded[i]} if i in decoded else m for i, m in enumerate(messages)]
                ids, images = served.image_prompt(messages, model, UNCUT, shown)
                if len(ids) >= limit:
                    raise PromptTooLong(len(ids), limit - 1)
            else:
                ids = served.prompt_ids(messages, model, tools=shown, most=limit - 1)
        except PromptTooLong as exc:
            raise _no_room("messages", f"at least {exc.tokens}", limit) from exc
        except (ImageError, ImagesNotSupported) as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        except ToolsNotSupportedError as exc:
            param = "tools" if shown else "messages"
            raise APIError(400, f"{param}: model {model.name!r}: {exc}", param=param) from exc
        except TemplateError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        _image_tokens(served, ids, images, "messages")
        plan = plan_tools(served, model, shown, choice, body.parallel_tool_calls)
        ids = ids + prefix_ids(served, plan)
        return ids, images, plan, _sampling(model, body, len(ids), limit, "messages")

    def check_images(model: ServedModel, body: ChatCompletionRequest, messages: list[dict]
                     ) -> list[tuple[int, str, str]]:
        """The request's image parts, refused (400) for a model that reads no images and for a
        knowledge-base model; and, for a vision-language model, a 400 for text that writes its
        image placeholder itself."""
        parts = body.image_parts() if any(m.get("images") for m in messages) else []
        if parts and model.name in kb_models:
            raise APIError(400, f"{parts[0][2]}: model {model.name!r} answers from a knowledge base and takes no "
                           "images", param=parts[0][2])
        if parts and served.vision is None:
            raise APIError(400, f"{parts[0][2]}: model {model.name!r}: this model reads no images (not a "
                           "vision-language model); send text only, or serve a vision-language model",
                           param=parts[0][2], code="images_not_supported")
        if served.vision is not None:
            marks = tuple(dict.fromkeys((PLACEHOLDER, served.vision.placeholder)))
            field = body.literal_placeholders(marks)
            if field is not None:
                raise APIError(400, f"{field}: the text holds {' or '.join(marks)}, where this model's images go; "
                               "send an image as an image_url content part (the text without the placeholder)",
                               param=field)
        return parts

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """A chat answer, rendered with the model's own template (in a worker thread, so that a
        long conversation holds up no other request); with tools, calls come back as
        ``tool_calls`` (see :mod:`chattune.serve.calls`); a ``MODEL+KB`` model answers from
        the knowledge base, with ``sources`` (see :mod:`chattune.serve.retrieval`)."""
        body.check_supported()
        model = pick(body.model)
        messages = await asyncio.to_thread(body.conversation)
        parts = check_images(model, body, messages)
        cite = None
        if model.name in kb_models:
            if body.tools:
                raise APIError(400, f"tools: model {model.name!r} answers from a knowledge base and takes no "
                               "tools", param="tools")
            asked = await retrieval.retrieve(kbs, kb_models[model.name][1], messages)
            if asked.messages is None:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return retrieval.direct_reply(model.name, asked, body.stream, usage)
            messages, cite = asked.messages, retrieval.citation(asked)
        tools = body.functions()
        choice = body.choice(tools)
        shown = tools if choice != "none" else None  # tool_choice none: the tools are not rendered
        ids, images, plan, params = await asyncio.to_thread(chat_prompt, model, messages, shown, choice, body, parts)
        stops = model.stop_strings + (plan.stop_strings if plan else []) + body.stop_list()
        return await _respond(request, model, ids, params, stops, body, chat=True, plan=plan, cite=cite,
                              images=images)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        """Refused: these are chat models; a reward model (stage rm) is served on its own."""
        try:
            name = (await request.json()).get("model")
        except Exception:  # any body: the answer is the same
            name = None
        profile = served.profiles.get(name) or served.profile()
        stage = profile.manifest.stage.get("name", "sft") if profile.manifest else "none (a base model)"
        raise not_a_reward_model(profile.name, stage)

    def encode_text(text: str) -> list[int]:
        """A plain prompt's ids, as the tokenizer encodes the text (for a worker thread)."""
        with served.tokenizer_lock:
            return served.tokenizer(text)["input_ids"]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """A plain prompt continued as it is."""
        body.check_supported()
        model = pick(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise APIError(400, "prompt: one prompt per request (send several requests; they are batched)",
                               param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(encode_text, prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        _image_tokens(served, ids, [], "prompt")  # a plain prompt carries no image
        params = _sampling(model, body, len(ids), served.context_length, "prompt")
        return await _respond(request, model, ids, params, body.stop_list(), body, chat=False)

    async def _respond(request, model: ServedModel, ids, params, stops, body, *, chat: bool,
                       plan: ToolPlan | None = None, cite: retrieval.Citation | None = None,
                       images: list | None = None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        seq = sequence(served, model, ids, params, emit, stop_strings=stops,
                       stop_token_ids=plan.stop_token_ids if plan else frozenset(),
                       keep=plan.kept_ids if plan else frozenset(), strip=chat)
        if images:  # as conversation_sequence does: the pixels are made at prefill, with the batch's
            seq.images, seq.image_inputs = images, served.vision.pixels
        try:
            engine.submit(seq)
        except QueueFull as exc:
            raise APIError(429, f"The server is busy ({exc}); retry after a second.", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from exc
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model.name}
        events = _events(request, queue, seq, engine)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(events, head, chat, usage, plan, cite), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, done = [], None
        async with aclosing(events):
            async for event in events:
                if event.kind == "text":
                    parts.append(event.text)
                elif event.kind == "error":
                    raise APIError(500, event.text, type="server_error")
                else:
                    done = event
        if done is None:
            return Response(status_code=499)  # the client left
        text = "".join(parts)
        reason, extra = done.finish_reason, {}
        if plan is not None:
            message, parsed = calls.message(plan, text)
            reason, extra = calls.finish_reason(parsed, reason), calls.extension(parsed)
        else:
            message = {"role": "assistant", "content": text + cite.suffix if cite else text}
        if cite:
            extra = {"sources": cite.sources}
        choice = ({"index": 0, "message": message, "logprobs": None}
                  if chat else {"index": 0, "text": text, "logprobs": None})
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "system_fingerprint": None, "choices": [{**choice, "finish_reason": reason}],
                "usage": _usage(done), **extra}

    return app


def _usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _stream(events: AsyncIterator[Event], head: dict, chat: bool, include_usage: bool,
                  plan: ToolPlan | None = None, cite: retrieval.Citation | None = None):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; with a tool
    plan, content until a call may begin, then the calls' deltas at the end; with a citation,
    the sources on the first chunk and the markers as the last content delta."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        head["system_fingerprint"] = None
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None = None, role: bool = False, delta: dict | None = None,
              more: dict | None = None) -> str:
        if chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse_event({**head, "choices": [choice], **extra, **(more or {})})

    tool_stream = calls.ToolStream(plan) if plan is not None else None
    if chat:
        yield chunk(None, role=True, more={"sources": cite.sources} if cite else None)
    async with aclosing(events):
        async for event in events:
            if event.kind == "text":
                text = tool_stream.feed(event.text) if tool_stream else event.text
                if text:
                    yield chunk(text)
            elif event.kind == "done":
                reason, more = event.finish_reason, None
                if tool_stream:
                    deltas, parsed = tool_stream.end()
                    for delta in deltas:
                        yield chunk(None, delta=delta)
                    reason, more = calls.finish_reason(parsed, reason), calls.extension(parsed)
                if cite:
                    yield chunk(cite.suffix)
                yield chunk(None, reason, more=more)
                if include_usage:
                    yield sse_event({**head, "choices": [], "usage": _usage(event)})
            else:
                yield sse_event(error_body(event.text, "server_error"))
    yield "data: [DONE]\n\n"
