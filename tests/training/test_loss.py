"""The chunked loss equals the plain one: loss and gradients, with a plain Linear head, a
peft-wrapped head, a bias, under bf16 autocast, through a real peft model; the probe
refuses models whose logits are not their output layer's, and resolve_loss falls back to
(or insists on) what the config asks; the head capture holds within a ``with`` block only."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError
from chattune.training.loss import (
    CausalLMLoss,
    HeadCapture,
    LinearCrossEntropy,
    check_head_logits,
    chunked_head_loss,
    output_layer,
    resolve_loss,
)

RTOL = 1e-5  # float32: chunked vs plain (differences are summation order only)


def plain_and_chunked(hidden, head, targets, chunk):
    h1 = hidden.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(head(h1).float(), targets, reduction="sum")
    ref.backward()
    ref_grads = [h1.grad] + [p.grad.clone() for p in head.parameters() if p.grad is not None]
    head.zero_grad()
    h2 = hidden.detach().clone().requires_grad_(True)
    got = chunked_head_loss(h2, head, targets, chunk)
    fused = type(head) is torch.nn.Linear
    assert (type(got.grad_fn).__name__ == LinearCrossEntropy.__name__ + "Backward") == fused
    (got * 2.0).backward()  # a non-unit upstream gradient
    got_grads = [h2.grad / 2] + [p.grad / 2 for p in head.parameters() if p.grad is not None]
    head.zero_grad()
    return ref, ref_grads, got, got_grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_linear_head_loss_and_gradients_equal_plain(bias, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 301, bias=bias)
    hidden, targets = torch.randn(150, 32), torch.randint(0, 301, (150,))
    ref, ref_grads, got, got_grads = plain_and_chunked(hidden, head, targets, chunk)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-4)
    assert len(got_grads) == len(ref_grads) == (3 if bias else 2)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_other_heads_are_checkpointed():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(40, 16, requires_grad=True), torch.randint(0, 50, (40,))
    chunked_head_loss(hidden, head, targets, 8).backward()
    assert head.weight.grad is None and hidden.grad is not None

    class Scaled(torch.nn.Module):  # not an nn.Linear: the generic (checkpointed) path
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(16, 50)

        def forward(self, x):
            return self.inner(x) * 0.5

    other = Scaled()
    ref, ref_grads, got, got_grads = plain_and_chunked(torch.randn(40, 16), other, targets, 9)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=1e-6)


def test_bf16_autocast_chunked_is_close_to_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False)
    hidden, targets = torch.randn(100, 64), torch.randint(0, 500, (100,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads, got, got_grads = plain_and_chunked(hidden, head, targets, 16)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(got_grads, ref_grads, strict=True):  # bf16 rounds per chunk: compare as tensors
        assert ((g.float() - r.float()).norm() / r.float().norm()).item() < 1e-2


def test_empty_selection_is_a_zero_loss():
    head = torch.nn.Linear(8, 10)
    hidden = torch.zeros(0, 8, requires_grad=True)
    loss = chunked_head_loss(hidden, head, torch.zeros(0, dtype=torch.long), 4)
    assert loss.item() == 0.0


def lora_model(tiny_models, arch, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32)
    model.config.use_cache = False
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False,
                        **lora)
    return get_peft_model(model, config)


def batch_for(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (3, 21), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX
    return ids, labels


def loss_and_grads(model, loss_fn, ids, labels, num_items):
    model.zero_grad()
    outputs = model(input_ids=ids, use_cache=False)
    loss = loss_fn(outputs, labels, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,lora", [("glm4", {}), ("llama", {"modules_to_save": ["lm_head"]})])
def test_chunked_equals_plain_and_the_models_own_loss_through_peft(arch, lora, tiny_models):
    model = lora_model(tiny_models, arch, **lora)
    ids, labels = batch_for(model)
    num_items = (labels[:, 1:] != IGNORE_INDEX).sum()
    own = model(input_ids=ids, labels=labels, use_cache=False, num_items_in_batch=num_items).loss
    plain, plain_grads = loss_and_grads(model, CausalLMLoss(), ids, labels, num_items)
    torch.testing.assert_close(plain, own.detach(), rtol=RTOL, atol=1e-6)

    head = output_layer(model)
    assert head is not None and check_head_logits(model, head, model.config.vocab_size) is None
    loss = CausalLMLoss(HeadCapture(head), chunk_size=5)
    with loss.capturing():
        assert model(input_ids=ids, use_cache=False).logits.shape == (3, 21, 0)
        chunked, chunked_grads = loss_and_grads(model, loss, ids, labels, num_items)
    assert model(input_ids=ids, use_cache=False).logits.shape[-1] == model.config.vocab_size
    assert "forward" not in head.__dict__  # the head's own (class) forward again
    torch.testing.assert_close(chunked, plain, rtol=RTOL, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and len(plain_grads) > 4
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eval_sums_are_token_weighted():
    head = torch.nn.Linear(8, 20, bias=False)
    loss = CausalLMLoss()
    total = count = 0
    with torch.no_grad():
        for n in (3, 10):
            logits = head(torch.randn(1, n, 8))
            labels = torch.randint(0, 20, (1, n))
            loss({"logits": logits}, labels)
            total += F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum").item()
            count += n - 1
    assert loss.eval_count == count
    assert loss.eval_sum == pytest.approx(total, rel=1e-6)


def test_probe_refuses_soft_capped_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=5.0)
    model = Gemma2ForCausalLM(config)
    reason = check_head_logits(model, output_layer(model), 128)
    assert reason is not None and "post-processes" in reason


def test_without_gradients_only_the_loss_is_computed(monkeypatch):
    """Evaluation of a trainable head: no vocabulary x hidden gradient buffer is built."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden, targets = torch.randn(37, 16), torch.randint(0, 50, (37,))
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")

    def refuse(*args):
        raise AssertionError("gradients computed under no_grad")

    monkeypatch.setattr(LinearCrossEntropy, "apply", refuse)
    with torch.no_grad():
        got = chunked_head_loss(hidden, head, targets, chunk_size=8)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-6)


def test_the_head_capture_holds_within_the_block_only_also_on_an_error():
    class OwnForward(torch.nn.Linear):
        pass

    for head in (torch.nn.Linear(4, 6), OwnForward(4, 6)):
        own = head.forward
        if isinstance(head, OwnForward):  # an instance attribute forward (as hooks or wrappers set)
            head.forward = own
        had_own = "forward" in head.__dict__
        capture = HeadCapture(head)
        with capture as entered:
            assert entered is capture
            assert head(torch.zeros(2, 3, 4)).shape == (2, 3, 0)
            assert capture.take().shape == (2, 3, 4)
        assert head(torch.zeros(2, 4)).shape == (2, 6) and ("forward" in head.__dict__) == had_own
        with pytest.raises(RuntimeError, match="inside"), capture:
            raise RuntimeError("inside")
        assert head(torch.zeros(2, 4)).shape == (2, 6) and capture.hidden is None
    assert isinstance(CausalLMLoss().capturing(), contextlib.nullcontext)


def loss_config(loss: str):
    from chattune.config_io import build_config

    return build_config({"model_name_or_path": "unused", "loss": loss, "loss_chunk_size": 7})


def test_resolve_loss_chunks_where_the_probe_allows_and_falls_back_or_refuses(tiny_models, monkeypatch):
    import chattune.training.loss

    model = lora_model(tiny_models, "llama")
    vocab = model.config.vocab_size
    logged = []
    chunked = resolve_loss(loss_config("auto"), model, vocab, logged.append)
    assert chunked.mode == "chunked" and chunked.chunk_size == 7 and chunked.capture.head is output_layer(model)
    assert resolve_loss(loss_config("plain"), model, vocab).mode == "plain"
    monkeypatch.setattr(chattune.training.loss, "check_head_logits", lambda *a, **k: "logits are soft-capped")
    assert resolve_loss(loss_config("auto"), model, vocab, logged.append).mode == "plain"
    assert logged == ["loss: plain (logits are soft-capped)"]
    with pytest.raises(ConfigError, match="loss: chunked is not possible for this model: logits are soft"):
        resolve_loss(loss_config("chunked"), model, vocab)
