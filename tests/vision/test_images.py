"""Images as rows and requests name them: references resolved, read and decoded safely."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import pytest
from PIL import Image

from chattune.data.records import RecordError
from chattune.vision.images import (
    MAX_IMAGE_PIXELS,
    PLACEHOLDER,
    ImageError,
    count_placeholders,
    decode_image,
    describe,
    image_bytes,
    load_image,
    resolve_ref,
)


def png_bytes(size=(8, 6), colour=(200, 10, 10)) -> bytes:
    """A real PNG of ``size`` filled with ``colour``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(size=(8, 6), colour=(200, 10, 10)) -> str:
    """A base64 PNG data URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(size, colour)).decode()


def jpeg_bytes(size=(64, 64)) -> bytes:
    """A real JPEG (noise, so that it has many bytes of entropy-coded data)."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A 4x4 PNG whose IHDR claims ``width`` x ``height`` (with a valid CRC): only its header
    says it is large; decoding it would fail at once (its data is for 4x4 pixels)."""
    data = bytearray(png_bytes((4, 4)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ---- references ----

def test_relative_path_is_resolved_from_the_base_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    resolved = resolve_ref("img/a.png", tmp_path, "data.json#0.images[0]")
    assert resolved == str((tmp_path / "img" / "a.png").resolve())
    assert resolve_ref("  img/../img/a.png ", tmp_path, "w") == resolved  # stripped, normalised
    assert resolve_ref(str(tmp_path / "img" / "a.png"), "/elsewhere", "w") == resolved  # absolute kept
    assert load_image(resolved, "w").size == (8, 6)


def test_file_url_is_read_as_its_path(tmp_path):
    target = tmp_path / "my img.png"
    target.write_bytes(png_bytes((5, 3)))
    url = "file://" + str(target).replace(" ", "%20")
    assert resolve_ref(url, None, "w") == str(target.resolve())
    assert resolve_ref("file://localhost" + str(target).replace(" ", "%20"), None, "w") == str(target.resolve())
    assert load_image(resolve_ref(url, None, "w"), "w").size == (5, 3)


def test_openai_style_dict_references(tmp_path):
    assert resolve_ref({"url": "a.png"}, tmp_path, "w") == str((tmp_path / "a.png").resolve())
    assert resolve_ref({"path": "b.png"}, tmp_path, "w") == str((tmp_path / "b.png").resolve())


def test_data_url_is_kept_and_decodes():
    url = data_url((7, 5), (10, 200, 30))
    assert resolve_ref(url, "/base", "w") == url  # as given, never a path
    image = load_image(url, "w")
    assert image.mode == "RGB" and image.size == (7, 5)
    assert image.getpixel((3, 2)) == (10, 200, 30)
    assert describe(url).startswith(url[:30]) and f"({len(url):,} characters)" in describe(url)


@pytest.mark.parametrize("url, expected", [
    ("data:text/plain;base64,aGVsbG8=", "expected a base64 image data URL"),
    ("data:image/png,rawbytes", "expected a base64 image data URL"),
    ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
])
def test_malformed_data_urls_are_refused(url, expected):
    with pytest.raises(ImageError, match=expected) as caught:
        image_bytes(url, "rows.json#2.images[0]")
    assert str(caught.value).startswith("rows.json#2.images[0]: ")


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://example.com/a.png",
                                 "HTTPS://EXAMPLE.COM/A.PNG", "s3://bucket/a.png"])
def test_remote_urls_are_refused_naming_where(url):
    with pytest.raises(ImageError) as caught:
        resolve_ref(url, "/base", "data.json#3.images[1]")
    message = str(caught.value)
    assert message.startswith(f"data.json#3.images[1]: {url}: remote image URLs are not fetched")
    assert isinstance(caught.value, RecordError)  # a bad row, skipped and counted by the readers


@pytest.mark.parametrize("ref", [None, "", "   ", 3, ["a.png"]])
def test_a_reference_that_is_no_string_is_refused(ref):
    with pytest.raises(ImageError, match=r"^x#0\.images\[0\]: expected an image path, file:// URL or data: URL"):
        resolve_ref(ref, "/base", "x#0.images[0]")


def test_a_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(ImageError) as caught:
        load_image(missing, "data.json#4.images[0]")
    assert str(caught.value) == f"data.json#4.images[0]: image {missing} not found"
    with pytest.raises(ImageError, match=r"not found \(a folder\)$"):
        load_image(str(tmp_path), "w")


# ---- decoding ----

def test_a_truncated_jpeg_is_corrupt_or_truncated():
    whole = jpeg_bytes()
    assert decode_image(whole, "ok.jpg", "w").size == (64, 64)
    with pytest.raises(ImageError) as caught:
        decode_image(whole[: len(whole) // 2], "cut.jpg", "rows.json#1.images[0]")
    assert str(caught.value).startswith("rows.json#1.images[0]: cut.jpg: corrupt or truncated image: ")


def test_a_truncated_real_photo_is_corrupt_or_truncated(shared_data):
    photo = (shared_data / "mllm_demo_data" / "1.jpg").read_bytes()
    assert decode_image(photo, "1.jpg", "w").size == (300, 168)
    with pytest.raises(ImageError, match=r"^w: 1\.jpg: corrupt or truncated image"):
        decode_image(photo[: len(photo) // 2], "1.jpg", "w")


@pytest.mark.parametrize("data", [b"hello, I am not an image", b"", b"%PDF-1.4\n" + bytes(200)])
def test_bytes_that_are_no_image(data):
    with pytest.raises(ImageError) as caught:
        decode_image(data, "x.png", "w")
    assert str(caught.value) == "w: x.png: not an image Pillow can read (expected JPEG, PNG, WebP, GIF or BMP)"


def test_a_header_over_the_pixel_limit_is_refused_before_decoding():
    # 9000 x 9000 is over chattune's 64 MP limit but under Pillow's own bomb limit: chattune's
    # check says so; were the pixels decoded, this 4x4 file would fail as truncated instead
    with pytest.raises(ImageError) as caught:
        decode_image(forged_png(9000, 9000), "bomb.png", "rows.json#0.images[0]")
    assert str(caught.value) == ("rows.json#0.images[0]: bomb.png: 9000x9000 is 81,000,000 pixels, over the "
                                 "limit of 64,000,000; resize it first")
    assert MAX_IMAGE_PIXELS == 64_000_000


def test_a_20000_square_header_is_refused_by_its_pixel_count_without_decoding():
    # 400 MP is past Pillow's own bomb limit too: refused when the header is read
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        decode_image(forged_png(20000, 20000), "bomb.png", "w")
    assert time.perf_counter() - started < 1.0  # 400 MP would take seconds and 1.2 GB to decode
    message = str(caught.value)
    assert message.startswith("w: bomb.png: ") and "pixels" in message
    assert message.endswith("over the limit of 64,000,000; resize it first")
    assert "truncated" not in message and "unreadable" not in message


def test_max_pixels_is_a_parameter():
    data = png_bytes((10, 10))
    assert decode_image(data, "a.png", "w", max_pixels=100).size == (10, 10)
    with pytest.raises(ImageError, match="10x10 is 100 pixels, over the limit of 99; resize it first"):
        decode_image(data, "a.png", "w", max_pixels=99)


def test_other_modes_come_back_rgb():
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (1, 2, 3, 0)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), "a.png", "w").mode == "RGB"
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 9).save(buffer, "GIF")
    assert decode_image(buffer.getvalue(), "a.gif", "w").getpixel((0, 0)) == (9, 9, 9)


# ---- placeholders ----

def test_count_placeholders():
    assert PLACEHOLDER == "<image>"
    messages = [{"role": "system", "content": "no images here"},
                {"role": "user", "content": "<image>and<image>", "input": "also <image>"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "<image >, <IMAGE>, image"}]
    assert count_placeholders(messages) == 3
    assert count_placeholders([]) == 0
