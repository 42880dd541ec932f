"""Load a run folder (or a bare base model) and generate: chat, stream, batch predict.

The prompt is built by :func:`chattune.data.encode.encode_prompt`, the same
rendering and tokenization as training. The base model, template and
generation defaults come from the run folder's manifest; a base model or
template that differs from training stops the load unless ``force``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.config import GenerateArgs, MethodArgs, ModelArgs
from chattune.data.encode import PieceEncoder, encode_prompt
from chattune.data.templates import get_template, resolve_template_name
from chattune.manifest import (
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    verify_base_model,
    verify_template,
)
from chattune.methods import load_trained, quantization_config
from chattune.model import load_model, load_tokenizer


@dataclass
class ChatModel:
    """A model ready to answer, with the template and defaults it was trained with."""

    model: object
    tokenizer: object
    template: str
    generation: dict
    max_prompt_tokens: int
    encoder: PieceEncoder = field(init=False)
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    run_dir: str | None = None

    def __post_init__(self):
        self.encoder = PieceEncoder(self.tokenizer)
        template = get_template(self.template)
        self.stop_strings = list(template.stop_strings) if template else []
        ids = {self.tokenizer.eos_token_id}
        for token in template.stop_tokens if template else ():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        self.stop_token_ids = sorted(i for i in ids if i is not None)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with the user's message."""
        return encode_prompt(messages, self.template, self.encoder, self.max_prompt_tokens)

    def _generate_kwargs(self, overrides: dict) -> dict:
        settings = {**self.generation, **{k: v for k, v in overrides.items() if v is not None}}
        kwargs = {
            "max_new_tokens": settings["max_new_tokens"],
            "do_sample": settings["do_sample"],
            "repetition_penalty": settings["repetition_penalty"],
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings["do_sample"]:
            kwargs.update(temperature=settings["temperature"], top_p=settings["top_p"])
        return kwargs

    def cut_at_stop(self, text: str) -> str:
        """The text up to the first stop string."""
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return text

    @property
    def prefix_tokens(self) -> int:
        """Virtual tokens of a P-Tuning v2 prefix (0 for other methods)."""
        config = getattr(self.model, "active_peft_config", None)
        return getattr(config, "num_virtual_tokens", 0) if getattr(config, "peft_type", None) == "PREFIX_TUNING" else 0

    @torch.no_grad()
    def _prefix_decode(self, input_ids: torch.Tensor, attention: torch.Tensor, kwargs: dict) -> Iterator[torch.Tensor]:
        """Decode with a P-Tuning v2 prefix and the KV cache: the prefix keys/values seed
        the cache, positions continue after them as in training. Yields each step's tokens."""
        n = self.prefix_tokens
        batch = input_ids.shape[0]
        base = self.model.get_base_model()
        cache = self.model.get_prompt(batch, max_cache_len=n + input_ids.shape[1] + kwargs["max_new_tokens"])
        mask = torch.cat([torch.ones(batch, n, dtype=attention.dtype, device=attention.device), attention], 1)
        positions = (n + attention.cumsum(1) - 1).clamp(min=n)
        logits = base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True).logits[:, -1]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        stops = torch.as_tensor(self.stop_token_ids, device=input_ids.device)
        for _ in range(kwargs["max_new_tokens"]):
            token = _pick_next(logits, kwargs)
            token = torch.where(done, torch.full_like(token, kwargs["pad_token_id"]), token)
            yield token
            done |= torch.isin(token, stops)
            if done.all():
                return
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            positions = positions[:, -1:] + 1
            logits = base(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], **overrides) -> list[str]:
        """Answer several conversations in one left-padded batch."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, longest - len(prompt):] = torch.as_tensor(prompt)
            attention[i, longest - len(prompt):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        kwargs = self._generate_kwargs(overrides)
        if self.prefix_tokens:
            steps = list(self._prefix_decode(input_ids, attention, kwargs))
            new_tokens = torch.stack(steps, 1) if steps else input_ids[:, :0]
        else:
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            new_tokens = output[:, longest:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [self.cut_at_stop(text).strip() for text in texts]

    def stream(self, messages: list[dict], **overrides) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        prompt = torch.as_tensor([self.prompt_ids(messages)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(overrides)
        if self.prefix_tokens:
            def run():
                streamer.put(prompt.cpu())
                for token in self._prefix_decode(prompt, torch.ones_like(prompt), kwargs):
                    streamer.put(token.cpu())
                streamer.end()

            worker = threading.Thread(target=run)
        else:
            worker = threading.Thread(
                target=self.model.generate,
                kwargs={"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "streamer": streamer, **kwargs},
            )
        worker.start()
        hold = max((len(s) for s in self.stop_strings), default=0)
        text, sent, stopped = "", 0, False
        for chunk in streamer:
            if stopped:  # drain: let generation finish after a stop string
                continue
            text += chunk
            cut = self.cut_at_stop(text)
            if cut != text:
                yield cut[sent:]
                stopped = True
                continue
            safe = len(text) - hold
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if not stopped:
            yield text[sent:]
        worker.join()


def _pick_next(logits: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Greedy, or temperature + top-p sampling, over the last position's logits."""
    if not kwargs.get("do_sample"):
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / kwargs.get("temperature", 1.0), -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < kwargs.get("top_p", 1.0)
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice).squeeze(-1)


def _pick_device(model) -> None:
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")


def load_chat_model(path: str, *, base_model: str | None = None, force: bool = False,
                    template: str | None = None, trust_remote_code: bool = False,
                    warn=print) -> ChatModel:
    """Load a run folder (adapter + manifest) or a bare base model for generation."""
    folder = Path(path)
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        recorded = manifest["base_model"]
        base_path = base_model or recorded["path"]
        remote = recorded.get("trust_remote_code", False)
        tokenizer_path = str(folder) if (folder / "tokenizer_config.json").is_file() else base_path
        tokenizer = load_tokenizer(tokenizer_path, remote)
        full = manifest["method"]["name"] == "full"
        problems = [] if full and not Path(base_path).exists() else verify_base_model(manifest, base_path)
        if not template:
            problems += verify_template(manifest, tokenizer)
        if problems:
            message = "\n".join(problems)
            if not force:
                raise ManifestError(f"{message}\n(use --force to load anyway)")
            warn(f"warning: {message}")
        method = manifest["method"]["name"]
        if method == "full":
            model = load_model(ModelArgs(model_name_or_path=str(folder), trust_remote_code=remote))
        else:
            extra = {}
            if method == "qlora" and torch.cuda.is_available():
                extra["quantization_config"] = quantization_config(MethodArgs(**{
                    k: v for k, v in manifest["method"].items() if k in MethodArgs.__dataclass_fields__}))
            model = load_model(ModelArgs(model_name_or_path=base_path, trust_remote_code=remote), **extra)
            model = load_trained(model, str(folder), method)
        generation = manifest["generation"]
        template_name = template or manifest["template"]["name"]
        max_length = manifest["max_seq_length"]
    else:
        if not folder.exists() and base_model is None and "/" not in path:
            raise ManifestError(f"{path}: no such run folder or model")
        base_path = base_model or path
        tokenizer = load_tokenizer(base_path, trust_remote_code)
        model = load_model(ModelArgs(model_name_or_path=base_path, trust_remote_code=trust_remote_code))
        generation = vars(GenerateArgs()).copy()
        template_name = resolve_template_name(template or "auto", tokenizer)
        max_length = getattr(model.config, "max_position_embeddings", 2048)
    model.eval()
    _pick_device(model)
    max_prompt = max(8, max_length - int(generation["max_new_tokens"]))
    return ChatModel(model=model, tokenizer=tokenizer, template=template_name, generation=generation,
                     max_prompt_tokens=max_prompt, run_dir=str(folder) if folder.exists() else None)


def chat_loop(chat: ChatModel, stdin=None, stdout=None, **overrides) -> None:
    """Interactive multi-turn chat: streamed answers; ``/clear`` forgets, ``/exit`` quits."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = []
    stdout.write("chattune chat: type a message; /clear to start over, /exit to quit.\n")
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/clear":
            history = []
            stdout.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        stdout.write("Assistant: ")
        answer = ""
        for piece in chat.stream(history, **overrides):
            answer += piece
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})
