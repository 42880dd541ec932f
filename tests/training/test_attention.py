"""Attention over packed rows: packed rows never see each other (logits, per-row losses and
gradients equal to the rows run one by one) with SDPA, eager and per-row SDPA attention; the
probe catches the layouts that leak (a KV cache, an attention mask); per-row SDPA switches a
model for the time of a ``with`` block and back."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from chattune.data.encode import IGNORE_INDEX
from chattune.training.attention import check_packed_attention, row_segments, use_varlen_sdpa
from chattune.training.collate import PackCollator
from tests.training.test_collate import rows_of

ATOL = 1e-4  # float32: packed vs one by one (observed differences are ~1e-6)


def load(tiny_models, arch, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32,
                                                 attn_implementation="eager" if attention == "eager" else "sdpa")
    return model.eval()


@contextlib.contextmanager
def attending(model, attention):
    """The model with per-row SDPA switched on within the block for ``varlen``; else as loaded."""
    if attention != "varlen":
        yield
        return
    with use_varlen_sdpa(model) as switched:
        assert switched
        yield


def per_row(model, rows):
    """Logits and summed loss of each row run alone."""
    out = []
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
        labels = torch.tensor(row["labels"])
        loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        out.append((logits, loss))
    return out


def packed_per_row(model, rows, bins, collator, **extra):
    batch = collator([{"bins": [[rows[i] for i in b] for b in bins]}])
    labels = batch.pop("labels")
    batch.update(extra)
    with torch.no_grad():
        logits = model(**batch).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                             reduction="none")
    out = []
    for s, members in enumerate(bins if not collator.flatten else [[i for b in bins for i in b]]):
        start = 0
        for i in members:
            n = len(rows[i]["input_ids"])
            # the row's own losses: predictions at its positions 0..n-2 (n-1 predicts the next row)
            out.append((i, logits[s, start:start + n], losses[s, start:start + n - 1].sum()))
            start += n
    return sorted(out)


@pytest.mark.parametrize("arch", ["glm4", "llama"])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "varlen", "eager"])
def test_packed_logits_and_row_losses_equal_the_rows_one_by_one(arch, flatten, attention, tiny_models):
    model = load(tiny_models, arch, attention)
    rows = rows_of([9, 5, 12, 3, 7, 6])
    bins = [[0, 1, 3], [2, 4], [5]]
    with attending(model, attention):
        alone = per_row(model, rows)
        packed = packed_per_row(model, rows, bins, PackCollator(model.config.pad_token_id, flatten))
    assert [i for i, _, _ in packed] == list(range(6))
    for (_, logits, loss), (ref_logits, ref_loss) in zip(packed, alone, strict=True):
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5)


def summed_loss_gradients(model, batches):
    """Gradients of every parameter of the summed token loss over ``batches``."""
    model.zero_grad()
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                        reduction="sum").backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["glm4", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_packed_gradients_equal_the_rows_one_by_one(arch, attention, tiny_models):
    model = load(tiny_models, arch, attention)
    rows = rows_of([9, 5, 12, 3, 7, 6])
    collator = PackCollator(model.config.pad_token_id, pad_to=24)
    with attending(model, attention):
        packed = summed_loss_gradients(model, [collator([{"bins": [[rows[0], rows[1], rows[3]],
                                                                   [rows[2], rows[4]], [rows[5]]]}])])
        alone = summed_loss_gradients(model, [{"input_ids": torch.tensor([r["input_ids"]]), "use_cache": False,
                                               "labels": torch.tensor([r["labels"]])} for r in rows])
    assert packed.keys() == alone.keys() and len(alone) > 10
    for name, grad in alone.items():  # observed: within 2e-6 of the largest element, float32
        assert (packed[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name


@pytest.mark.parametrize("arch", ["glm4", "llama"])
def test_with_the_kv_cache_packed_rows_attend_to_each_other(arch, tiny_models):
    """The trap chattune guards against: a KV cache (use_cache left at its default, True in the
    model config, also in train mode) stops transformers from building the packed mask."""
    model = load(tiny_models, arch)
    model.config.use_cache = True
    rows = rows_of([9, 5, 12])
    alone = per_row(model, rows)

    class DefaultCache(PackCollator):
        def __call__(self, items):
            batch = super().__call__(items)
            del batch["use_cache"]
            return batch

    model.train()  # dropout is 0 in the tiny models: train mode only matters for the cache default
    leaky = packed_per_row(model, rows, [[0, 1, 2]], DefaultCache(0))
    assert (leaky[1][1] - alone[1][0]).abs().max() > 1e-2  # row 1 saw row 0
    torch.testing.assert_close(leaky[0][1], alone[0][0], atol=ATOL, rtol=0)  # the first row sees nothing before it
    assert check_packed_attention(model, DefaultCache(0), model.config.vocab_size) is not None
    guarded = packed_per_row(model, rows, [[0, 1, 2]], PackCollator(0))
    for (_, logits, _), (ref, _) in zip(guarded, alone, strict=True):
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    assert check_packed_attention(model, PackCollator(0), model.config.vocab_size) is None
    assert model.training  # given back in its mode


def test_packed_rows_with_an_attention_mask_are_refused_by_the_probe(tiny_models):
    model = load(tiny_models, "llama")

    class WithMask(PackCollator):
        def __call__(self, items):
            batch = super().__call__(items)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            return batch

    reason = check_packed_attention(model, WithMask(0), model.config.vocab_size)
    assert reason is not None and "attend to each other" in reason


def test_row_segments_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert row_segments(positions) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


def test_varlen_sdpa_attends_within_rows_only_and_switches_back(tiny_models, monkeypatch):
    model = load(tiny_models, "llama")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[2], attn_mask is None, kwargs.get("is_causal")))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    rows = rows_of([9, 5, 12])
    batch = PackCollator(0, pad_to=32)([{"bins": [[rows[0], rows[1]], [rows[2]]]}])
    layers = model.config.num_hidden_layers
    with use_varlen_sdpa(model) as switched:
        assert switched and model.config._attn_implementation == "chattune_sdpa_varlen"
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        # per layer: rows of 9 and 5 plus an 18-token pad segment, a row of 12 plus a 20-token pad segment
        assert sorted(calls) == sorted([(n, True, True) for n in (9, 5, 18, 12, 20)] * layers)
        calls.clear()
        with torch.no_grad():  # one row a sequence: transformers' own SDPA, unchanged
            model(input_ids=torch.tensor([rows[0]["input_ids"]]), use_cache=False)
        assert calls == [(9, True, True)] * layers
    assert model.config._attn_implementation == "sdpa"
    calls.clear()
    with torch.no_grad():  # switched back: the packed batch goes to transformers' masked SDPA again
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert len(calls) == layers and not any(mask_free for _, mask_free, _ in calls)
    eager = load(tiny_models, "llama", "eager")
    with use_varlen_sdpa(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"
    assert eager.config._attn_implementation == "eager"


def test_varlen_sdpa_switches_back_on_an_error(tiny_models):
    model = load(tiny_models, "llama")
    with pytest.raises(RuntimeError, match="inside"), use_varlen_sdpa(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
def test_flash_attention_keeps_packed_rows_apart_only_when_flattened(tiny_models):
    """flash-attention reads packed position_ids at batch size 1 only: chattune flattens a step's
    bins into one sequence for it (uses_varlen_attention), and the probe shows why."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from chattune.training.attention import uses_varlen_attention

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs CUDA and flash-attn")
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    assert uses_varlen_attention(model)
    assert check_packed_attention(model, PackCollator(0, flatten=True), model.config.vocab_size) is None
    assert check_packed_attention(model, PackCollator(0, flatten=False), model.config.vocab_size) is not None
