"""ChatGLM-6B (GLM-130B style) as a native transformers model of chattune's own.

ChatGLM-6B has no counterpart in transformers, and THUDM's remote code stopped
working with transformers 4.34 (tokenizer) and 5 (cache, generation). This module is a
port that loads the official weights unchanged (same parameter names) and gives the
same logits as THUDM's code (``tests/chatglm`` checks both against it):

- a prompt ends with ``[gMASK] <sop>``; attention is bidirectional over the prompt
  before ``<sop>`` (the "context") and causal from ``<sop>`` on;
- 2D rotary positions: each head's first half rotates with the position (the token's
  index in the context; every token from ``<sop>`` on takes the ``[gMASK]`` index),
  the second half with the block position (0 in the context, 1, 2, ... from ``<sop>``);
  the inverse frequencies are rounded to float16 as THUDM's code stores them;
- blocks scale the residual: ``x = ln(x) * sqrt(2 * 28) + f(ln(x))`` (28 whatever the
  number of layers: THUDM's blocks never receive the config's); GELU (tanh form);
- the LM head is tied to the embedding (transformers ties them when THUDM's model loads).

Positions come from the tokens themselves: where a forward pass sees the prompt
(training, a prefill) they are computed from ``<sop>`` and ``[gMASK]``; a decode step
with a cache needs them given as ``[batch, 2, length]`` (chattune's decoder and
``generate`` pass them, see :func:`two_d_positions`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "chatglm6b"
ALPHA_LAYERS = 28  # THUDM builds every GLMBlock with its default num_layers=28, whatever the config says
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class ChatGLM6BConfig(PretrainedConfig):
    """The configuration of ChatGLM-6B; keys as in THUDM's ``config.json``."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length",
                     "intermediate_size": "inner_hidden_size"}

    def __init__(self, vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                 inner_hidden_size=16384, layernorm_epsilon=1e-5, max_sequence_length=2048,
                 bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001,
                 pad_token_id=3, initializer_range=0.02, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.position_encoding_2d = True
        kwargs.pop("position_encoding_2d", None)
        # THUDM's config leaves tie_word_embeddings at transformers' default, so its
        # from_pretrained ties the LM head to the embedding: the port does the same
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU in the tanh form, written as THUDM's ``gelu_impl``."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def context_anchors(input_ids: torch.Tensor, valid: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``input_ids`` (``valid`` marks real tokens): the ``[gMASK]`` (else
    ``[MASK]``) position and the context length (the position of the first ``<sop>``;
    the whole row when it has none), both counted in real tokens."""
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    lengths = valid.long().sum(1)

    def first(token_id, default):
        hit = (input_ids == token_id) & valid
        index = hit.int().argmax(1)
        return torch.where(hit.any(1), positions.gather(1, index[:, None])[:, 0], default)

    context = first(config.bos_token_id, lengths)
    mask = first(config.mask_token_id, (context - 1).clamp(min=0))
    mask = first(config.gmask_token_id, mask)
    return mask, context


def two_d_positions(positions: torch.Tensor, mask_position: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``[batch, 2, length]`` positions for 1-D token positions (counted from the row's
    first real token): the position and the block position of each token."""
    mask_position, context = mask_position[:, None], context[:, None]
    in_context = positions < context
    first = torch.where(in_context, positions, mask_position)
    block = torch.where(in_context, torch.zeros_like(positions), positions - context + 1)
    return torch.stack([first, block], dim=1)


def _rotary(dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    inv_freq = inv_freq.half().float()
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_2d_rotary(x: torch.Tensor, rotary) -> torch.Tensor:
    """x: [batch, length, heads, head_dim]; rotary: (cos, sin) for each half, [batch, length, head_dim/2]."""
    (cos1, sin1), (cos2, sin2) = rotary
    x1, x2 = x.chunk(2, dim=-1)
    cos1, sin1, cos2, sin2 = (t[:, :, None, :].to(x.dtype) for t in (cos1, sin1, cos2, sin2))
    x1 = x1 * cos1 + _rotate_half(x1) * sin1
    x2 = x2 * cos2 + _rotate_half(x2) * sin2
    return torch.cat((x1, x2), dim=-1)


class SelfAttention(nn.Module):
    """Fused per-head ``query_key_value`` (each head's q, k, v side by side), 2D rotary."""

    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, rotary, mask, cache):
        batch, length, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.split(self.head_dim, dim=-1)
        query, key = _apply_2d_rotary(query, rotary), _apply_2d_rotary(key, rotary)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.config._attn_implementation == "eager":  # THUDM's arithmetic: the same logits to the bit
            scores = torch.matmul(query * scale, key.transpose(-1, -2)) + mask
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
        else:
            out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """``dense_h_to_4h`` → GELU → ``dense_4h_to_h``."""

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    """One layer: attention and MLP, each on a LayerNorm'd input that the residual scales."""

    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = (2 * ALPHA_LAYERS) ** 0.5

    def forward(self, hidden, rotary, mask, cache=None):
        attention_input = self.input_layernorm(hidden)
        hidden = attention_input * self.alpha + self.attention(attention_input, rotary, mask, cache)
        mlp_input = self.post_attention_layernorm(hidden)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class ChatGLM6BModel(nn.Module):
    """Embeddings, blocks and the final LayerNorm (THUDM's ``transformer``)."""

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLM6BForCausalLM(PreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its LM head; loads THUDM's checkpoints as they are."""

    config_class = ChatGLM6BConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        """The token embedding."""
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        """Replace the token embedding."""
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        """The LM head."""
        return self.lm_head

    def set_output_embeddings(self, value):
        """Replace the LM head."""
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """A causal-LM forward pass; see the module docstring for positions and masks.
        ``past_key_values`` (peft's prefix) is taken as ``cache``."""
        from transformers import DynamicCache

        for unused in ("cache_position", "return_dict", "output_attentions", "output_hidden_states"):
            kwargs.pop(unused, None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if inputs_embeds is None:
            inputs_embeds = self.transformer.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones((batch, past + length), dtype=torch.long, device=inputs_embeds.device)
        valid = attention_mask[:, -length:].bool()
        ids = input_ids if input_ids is not None else torch.full((batch, length), -1, device=valid.device)
        mask_position, context = context_anchors(ids, valid, self.config)
        has_sop = ((ids == self.config.bos_token_id) & valid).any(1)
        if position_ids is None or position_ids.dim() != 3:  # (a decode step must pass them)
            position_ids = two_d_positions((valid.long().cumsum(1) - 1).clamp(min=0), mask_position, context)
        if past and not bool(has_sop.all()):
            context = torch.zeros_like(context)  # a decode step: causal
        mask = self._attention_mask(attention_mask, valid, context, past, inputs_embeds.dtype)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = (_rotary(head_dim // 2, position_ids[:, 0]), _rotary(head_dim // 2, position_ids[:, 1]))
        hidden = inputs_embeds
        for layer in self.transformer.layers:
            hidden = layer(hidden, rotary, mask, cache)
        hidden = self.transformer.final_layernorm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _attention_mask(attention_mask, valid, context, past: int, dtype) -> torch.Tensor:
        """``[batch, 1, length, past + length]`` additive: cached keys by ``attention_mask``; the
        new keys causally, and every context key (before ``<sop>``) to every query."""
        length = valid.shape[1]
        key_positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones((length, length), dtype=torch.bool, device=valid.device).tril()
        new = causal[None] | (key_positions < context[:, None])[:, None, :]
        new = new & valid[:, None, :]
        old = attention_mask[:, None, :past].bool().expand(-1, length, -1)
        allowed = torch.cat([old, new], dim=-1)[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """``generate``: the new tokens with their 2D positions, computed from the whole sequence.
        The mask may be longer than ``input_ids`` by a P-Tuning v2 prefix (peft prepends it)."""
        past_key_values = cache if cache is not None else kwargs.get("past_key_values")
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask[:, -length:].bool()
        mask_position, context = context_anchors(input_ids, valid, self.config)
        positions = two_d_positions((valid.long().cumsum(1) - 1).clamp(min=0), mask_position, context)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past:
            new = max(attention_mask.shape[1] - past, 1)
            input_ids, positions = input_ids[:, -new:], positions[:, :, -new:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
                "cache": past_key_values, "use_cache": use_cache}
