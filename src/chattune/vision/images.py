"""Images as data rows and requests name them: a file path (relative to the data file), a
``file://`` URL or a base64 ``data:`` URL; read with Pillow, safely.

Nothing is fetched: an ``http(s)://`` URL is refused. An image is checked by its header before
its pixels are decoded, so a decompression bomb (a small file that claims a huge size) is refused
without the memory it would take; a truncated or corrupt file is refused when decoding fails.
Every refusal is an :class:`ImageError` naming where the image was named and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from chattune.data.records import RecordError

PLACEHOLDER = "<image>"
"""Where an image goes in a message's text (LLaMA-Factory's placeholder)."""
MAX_IMAGE_PIXELS = 64_000_000
"""The most pixels (width x height) an image may claim: 64 megapixels, an 8000 x 8000 photo."""
MAX_DATA_URL_BYTES = 20_000_000
"""The longest base64 ``data:`` URL accepted (characters)."""

_DATA_URL = re.compile(r"data:(?P<mime>image/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class ImageError(RecordError):
    """An image cannot be used: missing, remote, unreadable, corrupt or too large. ``reason``:
    the short class an audit counts it under (never the image's path)."""

    def __init__(self, message: str, reason: str = "unusable image"):
        super().__init__(message)
        self.reason = reason


def describe(ref: str) -> str:
    """``ref`` as an error names it: a data URL by its start and length, a path as it is."""
    if ref.startswith("data:"):
        return f"{ref[:30]}... ({len(ref):,} characters)"
    return ref


def resolve_ref(ref, base_dir: str | Path | None, where: str) -> str:
    """The canonical form of one image reference: a data URL as given, else an absolute path
    (a relative path is taken from ``base_dir``, a ``file://`` URL is read as its path).

    Raises ImageError naming ``where`` for a value that is not a string, an empty one, and a
    remote URL (nothing is fetched)."""
    if isinstance(ref, dict):  # {"url": ...} (OpenAI image_url) or {"path": ...}
        ref = ref.get("url", ref.get("path"))
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(f"{where}: expected an image path, file:// URL or data: URL, got {ref!r}", reason="not an image reference")
    ref = ref.strip()
    if ref.startswith("data:"):
        return ref
    scheme = urlparse(ref).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise ImageError(f"{where}: {ref}: remote image URLs are not fetched; download the image and "
                         "give its path, or send it as a base64 data: URL", reason="remote image URLs are not fetched")
    if scheme == "file":
        url = urlparse(ref)  # file://host/path; a host other than localhost is read as a relative folder
        ref = unquote(url.path if url.netloc in ("", "localhost") else url.netloc + url.path)
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    return str(path.resolve())


def _data_url_bytes(ref: str, where: str) -> bytes:
    match = _DATA_URL.match(ref)
    if not match or not match.group("b64"):
        raise ImageError(f"{where}: {describe(ref)}: expected a base64 image data URL "
                         "(data:image/png;base64,...)", reason="malformed data URL")
    if len(ref) > MAX_DATA_URL_BYTES:
        raise ImageError(f"{where}: {describe(ref)}: a data URL longer than {MAX_DATA_URL_BYTES:,} characters", reason="data URL too long")
    try:
        return base64.b64decode(ref[match.end():], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{where}: {describe(ref)}: not valid base64 ({exc})", reason="malformed data URL") from exc


def image_bytes(ref: str, where: str) -> bytes:
    """The bytes of the image ``ref`` (canonical, see :func:`resolve_ref`) names; ImageError
    for a missing or unreadable file or a malformed data URL."""
    if ref.startswith("data:"):
        return _data_url_bytes(ref, where)
    path = Path(ref)
    if not path.is_file():
        raise ImageError(f"{where}: image {ref} not found" + (" (a folder)" if path.is_dir() else ""), reason="image not found")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{where}: image {ref}: cannot be read: {exc.strerror or exc}", reason="image cannot be read") from exc


def decode_image(data: bytes, name: str, where: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """``data`` decoded into an RGB Pillow image. ImageError for bytes that are no image Pillow
    reads, a size over ``max_pixels`` (checked from the header, before decoding) and a file that
    fails while decoding (truncated or corrupt)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError(f"{where}: {name}: not an image Pillow can read (expected JPEG, PNG, WebP, GIF or BMP)", reason="not an image Pillow can read") \
            from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: {name}: claims more pixels than Pillow will decode, over the limit of "
                         f"{max_pixels:,}; resize it first", reason="image over the pixel limit") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"{where}: {name}: unreadable image: {exc}", reason="unreadable image") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{where}: {name}: an empty image ({width}x{height})", reason="empty image")
    if width * height > max_pixels:
        raise ImageError(f"{where}: {name}: {width}x{height} is {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,}; resize it first", reason="image over the pixel limit")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where}: {name}: corrupt or truncated image: {exc}", reason="corrupt or truncated image") from exc


def load_image(ref: str, where: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """The RGB image ``ref`` names (canonical, see :func:`resolve_ref`); ImageError naming
    ``where`` and the image when it cannot be used."""
    return decode_image(image_bytes(ref, where), describe(ref), where, max_pixels)


def images_on_messages(messages: list[dict], images: list | None) -> list[dict]:
    """``messages`` with each one that holds placeholders carrying their images (``images``: a
    row's, one per placeholder across the messages, in order) in its ``images``, as inference
    reads them (:meth:`chattune.inference.runs.LoadedRun.image_prompt`); the messages as they are
    without images."""
    if not images:
        return messages
    placed, at = [], 0
    for message in messages:
        count = count_placeholders([message])
        if count:
            message = {**message, "images": list(images[at:at + count])}
            at += count
        placed.append(message)
    return placed


def count_placeholders(messages: list[dict]) -> int:
    """How many :data:`PLACEHOLDER` marks the messages' texts hold."""
    return sum(str(m.get("content") or "").count(PLACEHOLDER) + str(m.get("input") or "").count(PLACEHOLDER)
               for m in messages)
