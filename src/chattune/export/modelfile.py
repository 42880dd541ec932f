"""An Ollama ``Modelfile`` for an exported GGUF: its TEMPLATE (the run's template in Go template
syntax, ``templates/forms.py``), stop strings and the run's generation defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from chattune.errors import ConfigError
from chattune.templates.forms import ollama_template, stop_strings
from chattune.templates.registry import resolve_template_name


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
    lines += [f"PARAMETER stop {_quote(stop, 'stop string')}" for stop in stop_strings(template, tokenizer)]
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



