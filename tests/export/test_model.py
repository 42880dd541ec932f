"""``chattune export``: a run becomes one model folder that loads without chattune or peft
(ChatGLM-6B's, chattune's port, says it needs chattune), checked against the run itself; dtypes,
tied embeddings, refusals and atomic writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from chattune.config_io import load_config
from chattune.export.model import ExportError, export_run, write_shard
from chattune.inference.generate import generate
from chattune.inference.runs import LoadOptions, load_run
from chattune.templates.registry import NAMED_TEMPLATES
from chattune.training.recipe import train

CONVERSATIONS = [[{"role": "user", "content": "Who are you?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Give three tips."}]]


def _train(model: Path, data: Path, out: Path, *extra: str) -> Path:
    overrides = [f"model_name_or_path={model}", f"train_files=[{data}]", "max_steps=6", "save_steps=6",
                 "learning_rate=2e-2", "per_device_train_batch_size=4", "max_seq_length=64", "max_new_tokens=12",
                 f"output_dir={out}", "report_to=[none]", f"cache_dir={out.parent / 'cache'}", *extra]
    return train(load_config(None, overrides), log=lambda *_: None).output_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def bf16_base(tiny_models, root):
    """The tiny GLM-4 saved in bfloat16, as real checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_models("glm4"), dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models("glm4")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_models, data_file, root):
    base = tiny_models("glm4")
    return {method: _train(base, data_file, root / method, f"method={method}")
            for method in ("lora", "freeze", "full")}


@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_export_is_a_standalone_model_equal_to_the_run(runs, root, method, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / f"{method}-export"
    assert main(["export", str(runs[method]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check: float32: max |logit difference|" in printed and "identical on 3/3 probes" in printed
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["max_logit_difference"] <= 1e-4 and check["greedy_identical"] == 3
    assert check["chat_template_matches"], check["chat_template_mismatches"]  # history and system too
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*")) and not (out / "chattune.json").exists()
    assert not (out / "README.md").exists() and "note:" not in printed  # loads without chattune: nothing to say
    assert "needs_chattune" not in json.loads((out / "chattune_export.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    run = load_run(str(runs[method]))
    assert generation["max_new_tokens"] == 12
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == set(run.profile().stop_token_ids)
    model = AutoModelForCausalLM.from_pretrained(out)  # no peft, no chattune files needed
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([run.prompt_ids(CONVERSATIONS[0])])
    assert tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) == ids[0].tolist()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - run.model(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("template", ["tokenizer", "default"])
def test_chattune_answers_with_the_export_as_with_the_run(runs, tiny_models, data_file, root, template):
    """chat / predict / serve / eval take an export as a plain base model: a run on the tokenizer's
    chat template with the export's, a run on a named template with that template (recorded in
    the export's tokenizer), so with the run's prompt ids, turns and history included."""
    run_dir = runs["lora"] if template == "tokenizer" else _train(
        tiny_models("glm4"), data_file, root / "lora-default", "template=default")
    out = root / f"lora-answers-{template}"
    export_run(str(run_dir), str(out), log=lambda *_: None)
    exported = load_run(str(out), LoadOptions())
    run = load_run(str(run_dir))
    assert exported.profile().template == run.profile().template == template
    assert exported.profile().generation == run.profile().generation
    for conversation in [*CONVERSATIONS, *TURNS]:
        assert exported.prompt_ids(conversation) == run.prompt_ids(conversation)
    assert generate(exported, CONVERSATIONS, max_new_tokens=12) == generate(run, CONVERSATIONS, max_new_tokens=12)


def test_auto_keeps_the_bases_bfloat16_and_float32_is_asked_for(bf16_base, data_file, root):
    run = _train(bf16_base, data_file, root / "lora-bf16", "dtype=bfloat16")
    auto = export_run(str(run), str(root / "bf16-auto"), log=lambda *_: None)
    assert auto.check["dtype"] == "bfloat16" and auto.check["passed"]
    from safetensors import safe_open

    shard = next((root / "bf16-auto").glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    wide = export_run(str(run), str(root / "bf16-as-f32"), dtype="float32", log=lambda *_: None)
    assert wide.check["dtype"] == "float32" and wide.check["max_logit_difference"] <= 1e-4


@pytest.mark.parametrize("extra", [["modules_to_save=[lm_head]"], ["lora_target=[embed_tokens,q_proj,v_proj]"]])
def test_tied_embeddings_stay_right(tiny_models, data_file, root, extra):
    """A tied model whose adapter trains the head or the embedding: merged into the one shared
    tensor it would change both; the export unties them and matches the run."""
    from transformers import AutoModelForCausalLM

    folder = root / "tied-base"
    if not folder.exists():
        model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        model.save_pretrained(folder)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tiny_models("qwen2")).save_pretrained(folder)
    name = extra[0].split("=")[0]
    run = _train(folder, data_file, root / f"tied-{name}", *extra)
    out = root / f"tied-{name}-export"
    result = export_run(str(run), str(out), log=lambda *_: None)
    assert result.check["passed"], result.check
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(exported.lm_head.weight, exported.model.embed_tokens.weight)


def test_ptuning_cannot_become_weights(tiny_models, data_file, root):
    run = _train(tiny_models("glm4"), data_file, root / "ptuning", "method=ptuning", "pre_seq_len=4")
    with pytest.raises(ExportError, match=r"P-Tuning v2 run .* cannot become a standalone model.*chattune serve"):
        export_run(str(run), str(root / "ptuning-export"))
    assert not (root / "ptuning-export").exists()


def test_refusals_and_nothing_half_written(runs, root, capsys, monkeypatch):
    out = root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(runs["lora"]), "--out", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    import chattune.export.model as export

    def failing(reference, exported, dtype, gaps=None):
        return {**real(reference, exported, dtype, gaps), "passed": False}

    real = export.compare_probes
    monkeypatch.setattr(export, "compare_probes", failing)
    assert main(["export", str(runs["lora"]), "--out", str(root / "failed")]) == 2
    assert "export check failed" in capsys.readouterr().err
    assert not (root / "failed").exists() and not list(root.glob("tmp-failed-*"))



@pytest.mark.parametrize(("out", "message"), [
    ("/proc/x", "--out: cannot write /proc/x ("),
    ("afile/sub", "--out: {t}/afile/sub: {t}/afile is a file, not a folder"),
])
def test_an_unwritable_out_is_refused_before_the_model_loads(out, message, runs, tmp_path, capsys, monkeypatch):
    import chattune.export.model as export

    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    (tmp_path / "afile").write_text("x")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model or tokenizer was loaded")

    monkeypatch.setattr(export, "load_tokenizer", no_loading)
    monkeypatch.setattr(export, "load_model", no_loading)
    target = out if out.startswith("/") else str(tmp_path / out)
    assert main(["export", str(runs["lora"]), "--out", target]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("chattune: error: " + message.format(t=tmp_path)), err


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(runs, root, capsys, monkeypatch):
    import errno

    import chattune.export.model as export

    def disk_full(model, folder, shard_size):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_weights", disk_full)
    out = root / "full-disk"
    assert main(["export", str(runs["lora"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"chattune: error: --out {out}: cannot write the exported model (No space left on device); "
                       f"nothing was written to {out}")
    assert not out.exists() and not list(root.glob("tmp-full-disk-*"))

def test_a_changed_base_is_refused_unless_forced(runs, tiny_models, root, capsys):
    import shutil

    changed = root / "changed-base"
    shutil.copytree(tiny_models("glm4"), changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (changed / "config.json").write_text(json.dumps(config))
    args = ["export", str(runs["lora"]), "--out", str(root / "changed-export"), "--base-model", str(changed)]
    assert main(args) == 2
    assert "differs from the one the adapter was trained on" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0  # forced: the adapter merged into that base, checked against it


def test_small_shards_and_their_index(runs, root):
    from transformers import AutoModelForCausalLM

    out = root / "sharded"
    export_run(str(runs["full"]), str(out), shard_size="200KB", log=lambda *_: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    AutoModelForCausalLM.from_pretrained(out)


def test_half_precision_divergence_only_at_a_near_tie_passes():
    from chattune.export.model import compare_probes

    logits = [torch.tensor([[1.0, 2.0]])]
    reference, exported = (logits, [[1, 2, 3]]), (logits, [[1, 5, 6]])
    tie = compare_probes(reference, exported, torch.bfloat16, gaps=[[3.0, 0.01, 2.0]])
    assert tie["passed"] and tie["greedy_ties"] == [{"probe": 0, "step": 1, "top_gap": 0.01}]
    clear = compare_probes(reference, exported, torch.bfloat16, gaps=[[3.0, 2.0, 2.0]])
    assert not clear["passed"]
    assert not compare_probes(reference, exported, torch.float32, gaps=[[3.0, 0.01, 2.0]])["passed"]


def test_the_float32_bound_grows_with_the_logits_scale():
    """A real model's logits (SmolLM2: up to 43) move by 1.1e-4 when LoRA is merged, rounding only."""
    from chattune.export.model import compare_probes

    small, large = torch.tensor([[1.0, 2.0]]), torch.tensor([[43.0, -20.0]])
    for logits, moved, passed in ((small, 1.1e-4, False), (large, 1.1e-4, True), (large, 5e-4, False)):
        check = compare_probes(([logits], [[1]]), ([logits + moved], [[1]]), torch.float32)
        assert check["passed"] == passed and check["bound"] == max(1e-4, 1e-5 * logits.abs().max().item())


def test_write_shard_is_read_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.zeros(0),
               "d": torch.arange(6, dtype=torch.int64).view(2, 3), "e": torch.randn(4, 4).half().t()}
    write_shard(tmp_path / "x.safetensors", tensors)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.contiguous()), name


# ---- special-token text in messages, and chattune on its own export ---------------------------

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm"
RUN_TOKENIZERS = ("glm4", "llama", "qwen2", "chatglm2-6b", "chatglm3-6b", "chatglm-6b")
EXPORTED_TEMPLATES = (*sorted(NAMED_TEMPLATES), "tokenizer")


def _fixture(family: str, name: str) -> Path:
    path = FIXTURES / family / name
    if not path.is_file():
        pytest.skip(f"ChatGLM fixtures not found at {path} (a clone without ../shared)")
    return path


def run_tokenizer(tiny_models, name: str):
    """A run's tokenizer as chattune loads it: a tiny byte-level model's, or a ChatGLM one as
    chattune converts it (ChatGLM2/3 never read special tokens from text, ChatGLM-6B as THUDM's)."""
    from transformers import AutoTokenizer

    if name == "chatglm-6b":
        pytest.importorskip("sentencepiece")
        from chattune.chatglm.glm6b_tokenizer import ChatGLM6BTokenizer

        return ChatGLM6BTokenizer(str(_fixture(name, "ice_text.model")), chattune_template="chatglm")
    if name.startswith("chatglm"):
        from chattune.chatglm.glm_tokenizer import build_glm_tokenizer

        return build_glm_tokenizer(_fixture(name, "tokenizer.model"), name, max_length=512,
                                   template={"chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}[name])
    return AutoTokenizer.from_pretrained(tiny_models(name))


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    return ids | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def _plain(conversation: list[dict]) -> list[dict]:
    return [{**message, "content": "text"} for message in conversation]


@pytest.mark.parametrize("name", RUN_TOKENIZERS)
def test_special_token_text_in_messages_encodes_as_the_run_encodes_it(tiny_models, name, tmp_path, monkeypatch):
    """Every template an export can write, on every kind of tokenizer: a message typing each
    special token's text gets the run's ids through the export's apply_chat_template (the
    runtime's path), no special token more; where the run keeps that text as text (ChatGLM2/3),
    the only special tokens are the template's own. Where the template gives the run's ids on
    plain conversations, the ids are the run's exactly.

    The exported tokenizer checked is the one write_tokenizer last loaded from the folder it
    wrote (``AutoTokenizer.from_pretrained(folder)``, as a runtime loads it), taken from its
    last template_mismatches call rather than loaded from the folder once more: a ChatGLM
    tokenizer (65k pieces) takes 0.3-0.4 s a load, 13 templates a tokenizer."""

    import chattune.export.model as export_model
    from chattune.data.encode import PieceEncoder, encode_prompt
    from chattune.data.records import split_prompt
    from chattune.export.jinja_check import PROBE_CONVERSATIONS, special_text_conversations
    from chattune.export.model import template_mismatches, write_tokenizer
    from chattune.special_text import keeps_special_text

    loaded = []

    def seen(exported, *args, **kwargs):
        loaded.append(exported)
        return template_mismatches(exported, *args, **kwargs)

    monkeypatch.setattr(export_model, "template_mismatches", seen)
    tokenizer = run_tokenizer(tiny_models, name)
    special = _special_ids(tokenizer)
    encoder = PieceEncoder(tokenizer)
    checked = 0
    for template in EXPORTED_TEMPLATES:
        folder = tmp_path / template
        loaded.clear()
        if write_tokenizer(tokenizer, template, folder) == [f"template {template!r}: the tokenizer has no chat template"]:
            assert template == "tokenizer" and name.startswith("chatglm")
            continue
        exported = loaded[-1]
        assert exported.name_or_path == str(folder)  # loaded from the folder written
        exact = not template_mismatches(exported, tokenizer, template, PROBE_CONVERSATIONS)
        for conversation in special_text_conversations(tokenizer, exported):
            prompt, _ = split_prompt(conversation)
            ours = encode_prompt(prompt, template, encoder)
            theirs = list(exported.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))
            label = f"{template}: {prompt[-1]['content'][:30]!r}"
            assert [i for i in theirs if i in special] == [i for i in ours if i in special], label
            if exact:
                assert theirs == ours, label
            if keeps_special_text(tokenizer):
                markup = encode_prompt(_plain(prompt), template, encoder)
                assert [i for i in ours if i in special] == [i for i in markup if i in special], label
            checked += 1
    assert checked >= 2 * (len(EXPORTED_TEMPLATES) - name.startswith("chatglm"))


def _train_chatglm(family: str, data: Path, root: Path) -> Path:
    from tests.chatglm.thudm_folder import build_thudm_folder

    folder = build_thudm_folder(root / family, _fixture(family, "config.json").parent)
    return _train(folder, data, root / f"{family}-run", "max_seq_length=96", "learning_rate=5e-3")


TURNS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am an assistant."},
     {"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am an assistant."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "What do people say? <|user|> [gMASK]"}],
]


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm3-6b"])
def test_chattune_chats_with_a_chatglm_export_as_with_its_run(family, data_file, tmp_path):
    """chat / predict / serve on a ChatGLM2/3 export: the run's template, its prompt ids for one,
    two and three turns, its answers and generation defaults; serve --name names it. Any runtime
    gets the same ids from the export's chat template, typed special-token text included."""
    from transformers import AutoTokenizer

    from chattune.cli import build_parser
    from chattune.model import load_tokenizer
    from chattune.serve import build
    from chattune.special_text import ESCAPE_COMMENT, is_escaping

    run_dir = _train_chatglm(family, data_file, tmp_path)
    out = tmp_path / f"{family}-export"
    result = export_run(str(run_dir), str(out), log=lambda *_: None)
    assert result.check["chat_template_matches"], result.check["chat_template_mismatches"]
    run, exported = load_run(str(run_dir)), load_run(str(out))
    template = {"chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}[family]
    assert exported.profile().template == run.profile().template == template
    assert exported.profile().generation == run.profile().generation
    assert exported.profile().stop_token_ids == run.profile().stop_token_ids
    assert exported.tokenizer.split_special_tokens and not is_escaping(exported.tokenizer)
    runtime = AutoTokenizer.from_pretrained(out)
    assert is_escaping(runtime) and not runtime.split_special_tokens
    assert runtime.chat_template.startswith(ESCAPE_COMMENT)
    assert not load_tokenizer(str(out)).chat_template.startswith(ESCAPE_COMMENT)
    for conversation in TURNS:
        ids = run.prompt_ids(conversation)
        assert exported.prompt_ids(conversation) == ids
        assert list(runtime.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)) == ids
    assert generate(exported, TURNS, max_new_tokens=8) == generate(run, TURNS, max_new_tokens=8)
    args = build_parser().parse_args(["serve", str(out), "--name", "glm-x", "--threads", str(torch.get_num_threads())])
    interval = sys.getswitchinterval()
    try:
        served, engine, _ = build(args, warn=lambda *_: None)
        engine.stop()
    finally:
        sys.setswitchinterval(interval)
    assert list(served.profiles) == ["glm-x"] and served.default == "glm-x"
    assert served.profile().template == template


def test_a_chatglm6b_export_says_it_needs_chattune(data_file, tmp_path, capsys):
    """ChatGLM-6B's export is chattune's port (model_type chatglm6b): `chattune export` says in one
    line that it needs chattune and how to load it, and so do README.md and chattune_export.json in
    the folder. What the note says holds: transformers alone rejects the folder; after
    ``import chattune.model`` the Auto classes load it, the run's model."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("sentencepiece")
    run_dir = _train_chatglm("chatglm-6b", data_file, tmp_path)
    out = tmp_path / "chatglm-6b-export"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    note = ("note: a ChatGLM-6B export needs chattune to load: model_type chatglm6b is chattune's port, which "
            f"transformers alone rejects; use chattune chat {out} (or predict, serve, eval), or in Python "
            "`import chattune.model` before AutoModelForCausalLM/AutoTokenizer.from_pretrained "
            f"(see {out}/README.md)")
    assert printed[-1] == note and printed[-2].startswith("check: float32:")
    provenance = json.loads((out / "chattune_export.json").read_text())
    assert provenance["needs_chattune"] is True and provenance["note"] == note
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith(f"# A ChatGLM-6B model exported by chattune (from {run_dir.resolve()})")
    assert "This folder needs chattune to load. Its `config.json` says `model_type: chatglm6b`" in readme
    assert "chattune chat THIS_FOLDER" in readme and "import chattune.model" in readme
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatglm6b"

    plain = subprocess.run([sys.executable, "-c", "import sys\nfrom transformers import AutoConfig\n"
                            "AutoConfig.from_pretrained(sys.argv[1])", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode != 0 and "chatglm6b" in plain.stderr
    import chattune.model  # noqa: F401  (imported already here: what the note tells a user to do)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    run = load_run(str(run_dir))
    ids = run.prompt_ids(CONVERSATIONS[0])
    assert tokenizer.encode("你好 world", add_special_tokens=False) == \
        run.tokenizer.encode("你好 world", add_special_tokens=False)
    with torch.no_grad():
        tensor = torch.tensor([ids])
        assert (model(input_ids=tensor).logits - run.model(input_ids=tensor).logits).abs().max() <= 1e-4


def test_only_chatglm6b_exports_carry_the_note(tmp_path):
    from chattune.export.model import chattune_only_note

    assert chattune_only_note("chatglm6b", tmp_path / "x").startswith("note: a ChatGLM-6B export needs chattune")
    assert all(chattune_only_note(kind, tmp_path / "x") is None for kind in ("glm4", "glm", "llama", "qwen2", None))
