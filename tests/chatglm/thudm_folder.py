"""THUDM ChatGLM folders for the tests: random weights under THUDM's own parameter names, next to
THUDM's code, tokenizer and a tiny ``config.json`` (../shared/fixtures/chatglm), as a folder
downloaded from THUDM/<family> holds them."""

from __future__ import annotations

from pathlib import Path

from chattune.errors import ModelLoadError


def thudm_state_dict(config: dict, seed: int = 0, std: float = 0.1) -> dict:
    """Random weights under THUDM's own parameter names and shapes for a ChatGLM
    ``config.json`` (ChatGLM-6B's layout when it has ``position_encoding_2d``, else
    ChatGLM2/3's): what a downloaded checkpoint holds, at the config's size."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * std

    def norm(size):
        return 1 + rand(size)

    hidden = config["hidden_size"]
    tensors = {}
    if "position_encoding_2d" in config:
        vocab, inner = config["vocab_size"], config["inner_hidden_size"]
        tensors["transformer.word_embeddings.weight"] = rand(vocab, hidden)
        for i in range(config["num_layers"]):
            p = f"transformer.layers.{i}."
            for name in ("input_layernorm", "post_attention_layernorm"):
                tensors[p + name + ".weight"], tensors[p + name + ".bias"] = norm(hidden), rand(hidden)
            for name, (out, inp) in (("attention.query_key_value", (3 * hidden, hidden)),
                                     ("attention.dense", (hidden, hidden)),
                                     ("mlp.dense_h_to_4h", (inner, hidden)), ("mlp.dense_4h_to_h", (hidden, inner))):
                tensors[p + name + ".weight"], tensors[p + name + ".bias"] = rand(out, inp), rand(out)
        tensors["transformer.final_layernorm.weight"] = norm(hidden)
        tensors["transformer.final_layernorm.bias"] = rand(hidden)
        tensors["lm_head.weight"] = rand(vocab, hidden)
        return tensors
    vocab, ffn = config["padded_vocab_size"], config["ffn_hidden_size"]
    head_dim = config.get("kv_channels", hidden // config["num_attention_heads"])
    groups = config["multi_query_group_num"] if config.get("multi_query_attention") else config["num_attention_heads"]
    qkv = config["num_attention_heads"] * head_dim + 2 * groups * head_dim
    tensors["transformer.embedding.word_embeddings.weight"] = rand(vocab, hidden)
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        tensors[p + "self_attention.query_key_value.weight"] = rand(qkv, hidden)
        tensors[p + "self_attention.query_key_value.bias"] = rand(qkv)
        tensors[p + "self_attention.dense.weight"] = rand(hidden, config["num_attention_heads"] * head_dim)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        tensors[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, hidden)
        tensors[p + "mlp.dense_4h_to_h.weight"] = rand(hidden, ffn)
    tensors["transformer.encoder.final_layernorm.weight"] = norm(hidden)
    tensors["transformer.output_layer.weight"] = rand(vocab, hidden)
    return tensors


def build_thudm_folder(out_dir: str | Path, fixture_dir: str | Path, seed: int = 0) -> Path:
    """A folder as downloaded from THUDM's ChatGLM repos, from ``fixture_dir`` (THUDM's
    code, tokenizer and a tiny ``config.json``, see ``../shared/fixtures/chatglm``) plus
    random weights in its ``pytorch_model.bin``. Returns the folder."""
    import json
    import shutil

    import torch

    source, out = Path(fixture_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise ModelLoadError(f"{source}: no config.json; expected a ChatGLM fixture folder "
                             "(THUDM's code, tokenizer and a tiny config.json)")
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copyfile(file, out / file.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    torch.save(thudm_state_dict(config, seed), out / "pytorch_model.bin")
    return out
