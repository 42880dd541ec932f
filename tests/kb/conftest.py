"""Knowledge-base fixtures: a small PDF written by hand, a tiny sentence-transformers model."""

from __future__ import annotations

import string
from pathlib import Path

import pytest


def write_pdf(path: Path, lines: list[str]) -> Path:
    """A valid one-page PDF showing ``lines`` (ASCII) in Helvetica, with a correct xref table."""
    text = " ".join(f"({line}) Tj 0 -14 Td" for line in lines)
    stream = f"BT /F1 12 Tf 72 720 Td {text} ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def build_tiny_embedder(out: Path, seed: int = 0) -> Path:
    """A tiny random BERT saved as a sentence-transformers model (mean pooling) at ``out``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer

    raw = out.parent / f"{out.name}-bert"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += list("的是城港河镇澜州青岚由建立谁哪")
    (raw / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(raw)
    BertTokenizerFast(vocab_file=str(raw / "vocab.txt")).save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    SentenceTransformer(modules=[transformer, Pooling(16, "mean")], device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> Path:
    """The path of a tiny random sentence-transformers model, built once per session."""
    return build_tiny_embedder(tmp_path_factory.mktemp("embedder") / "tiny-st")


@pytest.fixture(scope="session")
def other_embedder(tmp_path_factory) -> Path:
    """Another tiny model of the same shape, different weights."""
    return build_tiny_embedder(tmp_path_factory.mktemp("embedder2") / "tiny-st-2", seed=1)
