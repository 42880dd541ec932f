"""Reading a large GGUF file once where a test converts or inspects it several times.

``gguf.GGUFReader`` parses a file's whole metadata in Python: for SmolLM2 (a 49k-token
vocabulary and its merges) about 2.3 s a read on 2 CPU cores. Converting a GGUF file reads it
four times (chattune's ``read_info``, and transformers' config, tokenizer and weights), and
transformers builds gguf's tensor-name map once per module of the model (397 times for
SmolLM2, 5 s). Inside :func:`gguf_parsed_once` the same file (path, inode, size and
modification time unchanged) gets the parse of its first read, and the same architecture and
block count the same name map: both are read-only to their callers, so what chattune and
transformers compute from them is unchanged; only the repeated parsing is saved.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    import gguf

    real_reader = gguf.GGUFReader
    parsed: dict[tuple, object] = {}

    def reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, mode)
        if key not in parsed:
            parsed[key] = real_reader(path, mode)
        return parsed[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield
