"""Images in the OpenAI API: ``image_url`` content parts (base64 ``data:`` URLs) to a tiny
LLaVA model, batched with text requests; what a server refuses (remote URLs, files of its own
disk, bad images, decompression bombs, images to a text-only model, text that writes the image
token itself) as a 400 of its own, its neighbours unharmed."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import httpx
import openai
import pytest

from chattune.inference.generate import answer
from chattune.inference.runs import load_run
from chattune.serve.app import create_app
from chattune.serve.engine import Engine
from chattune.vision.images import PLACEHOLDER
from tests.serve.server_thread import ServerThread

QUESTION = "What colour is it?"


def png_bytes(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size=(64, 64)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_url(size=(40, 30), colour=(200, 30, 30)) -> str:
    return data_url(png_bytes(size, colour))


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def image_message(url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def serve_model(path) -> SimpleNamespace:
    served = load_run(str(path))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=8, max_waiting=8)
    engine.start()
    thread = ServerThread(create_app(served, engine)).start()
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return SimpleNamespace(url=thread.url, served=served, engine=engine, thread=thread, client=client)


@pytest.fixture(scope="module")
def vlm(tiny_vlms):
    """A server over a tiny random LLaVA model (served as ``base``)."""
    server = serve_model(tiny_vlms("llava"))
    yield server
    server.thread.stop()
    server.engine.stop()


@pytest.fixture(scope="module")
def text_model(tiny_models):
    """A server over a tiny text-only Llama model."""
    server = serve_model(tiny_models("llama"))
    yield server
    server.thread.stop()
    server.engine.stop()


@pytest.fixture
def slow(vlm, monkeypatch):
    """Every model step of ``vlm`` takes at least 20 ms more, so that requests overlap."""
    decoder = vlm.engine.decoder
    forward = decoder._forward

    def slowed(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "_forward", slowed)


def ask(client, messages, max_tokens=6, **kw):
    return client.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=max_tokens,
                                          **kw)


def core_messages(url: str, text: str = QUESTION) -> list[dict]:
    """``image_message`` as chattune's records (what chat and predict decode)."""
    return [{"role": "user", "content": PLACEHOLDER + text, "images": [url]}]


def refused(call) -> openai.BadRequestError:
    """The 400 ``call`` gets; its ``message`` is the error body's own (no "Error code" prefix)."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    caught.value.message = caught.value.body["message"]
    return caught.value


def test_an_image_request_is_answered_as_chat_answers_it(vlm):
    url = png_url()
    reply = ask(vlm.client, [image_message(url)], max_tokens=6, extra_body={"ignore_eos": True})
    [expected] = answer(vlm.served, [core_messages(url)], max_new_tokens=6, temperature=0, ignore_eos=True)
    assert reply.choices[0].message.content == expected.text.text
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)


def test_usage_counts_the_images_tokens(vlm):
    served, url = vlm.served, png_url((50, 20))
    with_image = ask(vlm.client, [image_message(url)], max_tokens=1).usage.prompt_tokens
    text_only = ask(vlm.client, [{"role": "user", "content": QUESTION}], max_tokens=1).usage.prompt_tokens
    from PIL import Image

    expansion = served.vision.expansion(Image.open(io.BytesIO(png_bytes((50, 20)))).convert("RGB"))
    assert expansion.count(served.vision.image_token_id) > 1
    ids, _ = served.image_prompt(core_messages(url), max_tokens=1 << 30)
    assert with_image == len(ids) and ids.count(served.vision.image_token_id) == len(expansion)
    assert with_image >= text_only + len(expansion) - 1


def test_two_turns_with_an_image_each_and_a_stream(vlm):
    first, second = png_url((30, 30), (0, 0, 255)), png_url((64, 48), (0, 255, 0))
    messages = [image_message(first), {"role": "assistant", "content": "blue"},
                image_message(second, "And this one?")]
    whole = ask(vlm.client, messages, max_tokens=5, extra_body={"ignore_eos": True})
    chunks = list(ask(vlm.client, messages, max_tokens=5, stream=True, stream_options={"include_usage": True},
                      extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    core = [{"role": "user", "content": PLACEHOLDER + QUESTION, "images": [first]},
            {"role": "assistant", "content": "blue"},
            {"role": "user", "content": PLACEHOLDER + "And this one?", "images": [second]}]
    ids, kept = vlm.served.image_prompt(core, max_tokens=1 << 30)
    assert whole.usage.prompt_tokens == len(ids) and len(kept) == 2


def test_text_parts_alone_work_on_both_models(vlm, text_model):
    for server in (vlm, text_model):
        parts = [{"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "are you?"}]}]
        plain = [{"role": "user", "content": "Who are you?"}]
        assert ask(server.client, parts).choices[0].message.content == ask(server.client, plain).choices[0].message.content


def _concurrently(calls: dict) -> dict:
    """Run each call in its own thread, all at once; name -> result (or the exception raised)."""
    results, start = {}, threading.Barrier(len(calls))

    def run(name, call):
        start.wait()
        try:
            results[name] = call()
        except Exception as exc:  # the test looks at it
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_image_and_text_requests_batch_together_and_each_answer_is_its_own(vlm, slow):
    client = vlm.client
    requests = {
        "red": [image_message(png_url((40, 30), (220, 20, 20)))],
        "green": [image_message(png_url((24, 60), (20, 200, 20)), "Describe it.")],
        "text": [{"role": "user", "content": "Tell me a story about a kingdom."}],
        "long text": [{"role": "user", "content": "Who are you?"}],
    }
    tokens = {"red": 6, "green": 8, "text": 7, "long text": 24}
    alone = {name: ask(client, messages, tokens[name], extra_body={"ignore_eos": True}).choices[0].message.content
             for name, messages in requests.items()}
    vlm.engine.decoder.counters["peak_batch"] = 0
    bad = {  # refused before they join the batch; their neighbours never see them
        "corrupt": [image_message(data_url(png_bytes()[:60]))],
        "bomb": [image_message(data_url(bomb_png(20000, 20000)))],
        "remote": [image_message("https://example.com/cat.png")],
    }
    calls = {name: (lambda m=messages, n=name: ask(client, m, tokens[n], extra_body={"ignore_eos": True}))
             for name, messages in requests.items()}
    calls.update({name: (lambda m=messages: ask(client, m)) for name, messages in bad.items()})
    results = _concurrently(calls)
    for name in requests:
        assert not isinstance(results[name], Exception), results[name]
        assert results[name].choices[0].message.content == alone[name], name
        assert results[name].usage.completion_tokens == tokens[name]
    for name in bad:
        assert isinstance(results[name], openai.BadRequestError), results[name]
    assert vlm.engine.decoder.counters["peak_batch"] >= 3
    assert vlm.engine.alive


def test_a_remote_url_is_refused(vlm):
    error = refused(lambda: ask(vlm.client, [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]))
    assert error.status_code == 400
    assert "messages[0].content[1]" in error.message and "remote image URLs are not fetched" in error.message
    assert error.body["param"] == "messages[0].content[1]"


@pytest.mark.parametrize("form", ["path", "file URL", "relative path"])
def test_a_file_of_the_servers_disk_is_refused(vlm, tmp_path, form):
    image = tmp_path / "secret.png"
    image.write_bytes(png_bytes())
    url = {"path": str(image), "file URL": image.as_uri(), "relative path": "secret.png"}[form]
    error = refused(lambda: ask(vlm.client, [image_message(url)]))
    assert "messages[0].content[0]" in error.message and "reads no image files from its own disk" in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize("name, url, says", [
    ("truncated PNG", data_url(png_bytes()[:60]), "corrupt or truncated"),
    ("corrupt JPEG", data_url(jpeg_bytes()[:1500], "image/jpeg"), "corrupt or truncated"),
    ("JPEG garbage", data_url(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image/jpeg"), "not an image"),
    ("not base64", "data:image/png;base64,@@@not base64@@@", "not valid base64"),
    ("not an image", data_url(b"hello, world", "image/png"), "not an image"),
    ("not a data URL of an image", "data:text/plain,hello", "expected a base64 image data URL"),
    ("bomb", data_url(bomb_png(20000, 20000)), "pixels"),
    ("too many pixels", data_url(bomb_png(9000, 9000)), "over the limit of 64,000,000"),
])
def test_a_bad_image_is_a_400_naming_the_part(vlm, name, url, says):
    error = refused(lambda: ask(vlm.client, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                                             image_message(url)]))
    assert error.message.startswith("messages[2].content[0]: "), error.message
    assert says in error.message and "\n" not in error.message, error.message
    assert ask(vlm.client, [image_message(png_url())]).choices[0].message.content is not None  # still serving


def test_images_together_over_the_request_limit_are_refused(vlm):
    big = data_url(bomb_png(7000, 7000))  # 49 MP each: one passes the header check, two do not
    error = refused(lambda: ask(vlm.client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url()}}, {"type": "image_url", "image_url": {"url": big}},
        {"type": "image_url", "image_url": {"url": big}}]}]))
    assert error.message.startswith("messages[0].content[1]") or error.message.startswith("messages[0].content[2]")


def test_an_image_to_a_text_only_model_is_refused(text_model):
    error = refused(lambda: ask(text_model.client, [image_message(png_url())]))
    assert "this model reads no images" in error.message and error.message.startswith("messages[0].content[0]")
    assert error.code == "images_not_supported"


def test_image_parts_where_they_do_not_belong(vlm):
    assistant = [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_url()}}]},
                 {"role": "user", "content": "and?"}]
    assert "only a user message may carry images" in refused(lambda: ask(vlm.client, assistant)).message
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    assert refused(lambda: ask(vlm.client, audio)).message.startswith("messages[0].content[0]: expected")


def test_text_that_writes_the_image_token_itself_is_refused(vlm):
    error = refused(lambda: ask(vlm.client, [{"role": "user", "content": f"{PLACEHOLDER} what is this?"}]))
    assert error.message.startswith("messages[0].content: the text holds <image>")
    parts = [{"role": "user", "content": [{"type": "text", "text": f"look {PLACEHOLDER}"},
                                          {"type": "image_url", "image_url": {"url": png_url()}}]}]
    assert refused(lambda: ask(vlm.client, parts)).message.startswith("messages[0].content[0].text: ")
    plain = httpx.post(f"{vlm.url}/v1/completions", json={"prompt": f"{PLACEHOLDER} hi", "max_tokens": 2})
    assert plain.status_code == 400 and "image token" in plain.json()["error"]["message"]
    token = vlm.served.vision.image_token_id
    ids = httpx.post(f"{vlm.url}/v1/completions", json={"prompt": [5, token, 6], "max_tokens": 2})
    assert ids.status_code == 400


def test_the_placeholder_is_plain_text_to_a_text_only_model(text_model):
    assert ask(text_model.client, [{"role": "user", "content": f"What is {PLACEHOLDER}?"}]).choices[0].message.content \
        is not None


def test_a_failed_prefill_fails_its_request_and_not_the_running_ones(vlm, slow, monkeypatch):
    client = vlm.client
    long = [{"role": "user", "content": "Who are you?"}]
    expected = ask(client, long, 30, extra_body={"ignore_eos": True}).choices[0].message.content

    def broken(images):
        raise RuntimeError("no pixels today")

    monkeypatch.setattr(vlm.served.vision, "pixels", broken)

    def image_later():
        time.sleep(0.3)  # the long request is running by now
        return ask(client, [image_message(png_url())])

    results = _concurrently({"long": lambda: ask(client, long, 30, extra_body={"ignore_eos": True}),
                             "image": image_later})
    assert isinstance(results["image"], openai.InternalServerError) and "no pixels today" in str(results["image"])
    assert results["long"].choices[0].message.content == expected
    monkeypatch.undo()
    assert ask(client, [image_message(png_url())]).choices[0].message.content is not None
