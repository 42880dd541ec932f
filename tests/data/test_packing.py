"""Packing: bins that fill, steps that keep the batch in tokens, and packed rows that never
see each other (logits and per-row loss equal to the rows run one by one)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from chattune.data.encode import IGNORE_INDEX
from chattune.data.packing import (
    PackCollator,
    PackedSteps,
    check_packed_attention,
    group_steps,
    pack_bins,
    plan_packing,
    row_segments,
    use_varlen_sdpa,
)

ATOL = 1e-4  # float32: packed vs one by one (observed differences are ~1e-6)


def test_bins_hold_every_row_once_and_never_overflow():
    lengths = [random.Random(i).randint(1, 300) for i in range(500)]
    bins = pack_bins(lengths, 512, seed=3)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == pack_bins(lengths, 512, seed=3)  # deterministic
    assert sum(lengths) / (len(bins) * 512) > 0.97
    with pytest.raises(ValueError, match="pack_length"):
        pack_bins([10, 600], 512)


def test_steps_follow_the_token_budget():
    tokens = [500] * 100
    steps = group_steps(tokens, 1250.0)  # 2.5 bins a step
    assert sorted(i for s in steps for i in s) == list(range(100))
    assert len(steps) == 40 and {len(s) for s in steps} == {2, 3}
    assert all(steps[k][-1] + 1 == steps[k + 1][0] for k in range(len(steps) - 1))  # consecutive


def alpaca_like_lengths(count=985, seed=0):
    """Row lengths shaped like the Alpaca demo's (mean about 200 tokens, a long tail to 512)."""
    rng = random.Random(seed)
    return [min(512, max(12, int(rng.lognormvariate(5.1, 0.55)))) for _ in range(count)]


@pytest.mark.parametrize("pack_length", [512, 2048])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
def test_a_step_carries_about_the_configured_rows_whatever_the_pack_length(pack_length, batch):
    lengths = alpaca_like_lengths()
    plan = plan_packing(lengths, pack_length, batch, seed=42)
    unpacked = len(lengths) / batch
    assert abs(len(plan.steps) - unpacked) <= 0.04 * unpacked + 1, plan.summary()
    assert sorted(i for s in plan.steps for b in s for i in b) == list(range(len(lengths)))
    for step in plan.steps:
        for rows in step:  # a bin over the budget is a single row longer than it
            assert sum(lengths[i] for i in rows) <= plan.capacity or len(rows) == 1
    budget = batch * sum(lengths) / len(lengths)
    if batch == 1:
        assert all(len(step) == 1 and len(step[0]) == 1 for step in plan.steps) and plan.pad_to is None
    else:
        assert plan.capacity == min(pack_length, math.ceil(budget)) == plan.pad_to
        assert plan.fill > 0.95, plan.summary()
    assert plan.summary()["pack_length"] == pack_length


def encoded_alpaca(tiny_models, shared_data, tmp_path):
    from chattune.config import load_config
    from chattune.data.prepare import prepare_data
    from chattune.model import load_tokenizer

    model = tiny_models("glm4")
    config = load_config(None, [f"model_name_or_path={model}", f"train_files={shared_data / 'alpaca_en_demo.json'}",
                                "template=alpaca", "max_seq_length=512", f"cache_dir={tmp_path}"])
    return prepare_data(config.data, load_tokenizer(str(model)), "alpaca", 42)


def test_demo_data_packs_over_95_percent_in_as_many_steps(tiny_models, shared_data, tmp_path):
    from chattune.train import row_lengths

    prepared = encoded_alpaca(tiny_models, shared_data, tmp_path)
    lengths = row_lengths(prepared.train)
    assert max(lengths) == 512
    for batch in (2, 4, 8):
        plan = plan_packing(lengths, 512, batch, seed=42)
        assert plan.fill > 0.95, plan.summary()
        # the same number of steps per epoch as unpacked batches of `batch` rows (+-1)
        assert abs(len(plan.steps) - len(lengths) / batch) <= 1, plan.summary()
        assert sorted(i for s in plan.steps for b in s for i in b) == list(range(len(lengths)))
    dataset = PackedSteps(prepared.train, plan.steps)
    first = dataset[0]["bins"]
    assert [len(b) for b in first] == [len(b) for b in plan.steps[0]]
    assert first[0][0]["input_ids"] == prepared.train[plan.steps[0][0][0]]["input_ids"]


def rows_of(lengths, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(20, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_collator_restarts_positions_masks_row_starts_and_has_no_mask():
    rows = rows_of([3, 4, 2])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # a fully supervised row: its first label must go
    batch = PackCollator(pad_token_id=0)([{"bins": [[rows[0], rows[1]], [rows[2]]]}])
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert batch["labels"][0, 3] == IGNORE_INDEX  # row 0's last token does not predict row 1's first
    assert batch["labels"][0, 4:].tolist() == rows[1]["input_ids"][1:]
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 5 and batch["input_ids"][1, 2:].tolist() == [0] * 5
    flat = PackCollator(pad_token_id=0, flatten=True)([rows[0], rows[1], rows[2]])
    assert flat["input_ids"].shape == (1, 9)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]


def load(tiny_models, arch, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32,
                                                 attn_implementation="eager" if attention == "eager" else "sdpa")
    if attention == "varlen":
        assert use_varlen_sdpa(model) is not None
    return model.eval()


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
    packed = summed_loss_gradients(model, [collator([{"bins": [[rows[0], rows[1], rows[3]], [rows[2], rows[4]],
                                                               [rows[5]]]}])])
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
    restore = use_varlen_sdpa(model)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[2], attn_mask is None, kwargs.get("is_causal")))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    rows = rows_of([9, 5, 12])
    batch = PackCollator(0, pad_to=32)([{"bins": [[rows[0], rows[1]], [rows[2]]]}])
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    layers = model.config.num_hidden_layers
    # per layer: rows of 9 and 5 plus an 18-token pad segment, a row of 12 plus a 20-token pad segment
    assert sorted(calls) == sorted([(n, True, True) for n in (9, 5, 18, 12, 20)] * layers)
    calls.clear()
    with torch.no_grad():  # one row a sequence: transformers' own SDPA, unchanged
        model(input_ids=torch.tensor([rows[0]["input_ids"]]), use_cache=False)
    assert calls == [(9, True, True)] * layers
    restore()
    assert model.config._attn_implementation == "sdpa"
    assert use_varlen_sdpa(load(tiny_models, "llama", "eager")) is None


@pytest.mark.gpu
def test_flash_attention_keeps_packed_rows_apart_only_when_flattened(tiny_models):
    """flash-attention reads packed position_ids at batch size 1 only: chattune flattens a step's
    bins into one sequence for it (uses_varlen_attention), and the probe shows why."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from chattune.data.packing import uses_varlen_attention

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs CUDA and flash-attn")
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    assert uses_varlen_attention(model)
    assert check_packed_attention(model, PackCollator(0, flatten=True), model.config.vocab_size) is None
    assert check_packed_attention(model, PackCollator(0, flatten=False), model.config.vocab_size) is not None
