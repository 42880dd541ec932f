"""The preference losses equal TRL's own code on the same batch and reference log-probabilities.

DPO (sigmoid, hinge, IPO, with ``pref_ftx``) and KTO: TRL 1.16's ``DPOTrainer`` and
``KTOTrainer`` compute their losses inline in ``_compute_loss``, so each test builds the real
trainer around a tiny llama and compares its ``compute_loss`` (and the rewards it logs) with
chattune's :class:`PreferenceObjective` on the same token ids and the same reference: a
frozen copy, the adapter switched off (LoRA), or reference log-probabilities given with the
batch. SimPO and ORPO: TRL's ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss`` on
random log-probabilities, and the trainers' ``get_batch_loss_metrics`` on a real batch.

Where chattune and TRL 1.16 differ, it is said here and tested as such:

- DPO ``label_smoothing`` (conservative DPO): TRL 1.16's ``sigmoid`` no longer applies it
  (only its ``robust``/``exo_pair``/``aot`` losses read the key); chattune's follows the cDPO
  formula, which is TRL's ``CPOTrainer`` sigmoid (and was TRL's DPO sigmoid in earlier releases).
- ORPO's SFT term: TRL's ORPOTrainer takes the token mean of the chosen sequences' loss over
  the prompt *and* the answer; chattune's over the answer tokens only. They are equal when
  the prompt is one token (nothing of it is predicted); the general case is a strict xfail.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl", minversion="1.16", reason="TRL (a test extra) checks the preference losses")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from chattune.config import PreferenceArgs  # noqa: E402
from chattune.data.encode import IGNORE_INDEX  # noqa: E402
from chattune.tiny import tiny_config  # noqa: E402
from chattune.training.attention import use_varlen_sdpa  # noqa: E402
from chattune.training.loss import HeadCapture, output_layer  # noqa: E402
from chattune.training.preference import (  # noqa: E402
    PreferenceCollator,
    PreferenceObjective,
    precompute_reference,
)
from chattune.training.preference_loss import (  # noqa: E402
    dpo_losses,
    orpo_losses,
    sft_term,
    simpo_losses,
)

TOL = dict(rtol=1e-5, atol=1e-5)

PAIRS = {
    "prompt": ["Q: hi?\nA:", "Q: two plus two\nA:", "Why?", "Name a color:"],
    "chosen": [" hello", " four", " because it is", " red"],
    "rejected": [" bye now", " five", " no", " the number seven"],
}
LABELLED = {
    "prompt": ["Q: hi?\nA:", "Q: two plus two\nA:", "Why?", "Name a color:"],
    "completion": [" hello", " five", " because it is", " the number seven"],
}


@pytest.fixture
def models(char_tokenizer):
    """A tiny random llama (float32, logits far from uniform) and a perturbed copy to serve as
    the reference, so that rewards are not zero."""
    config = tiny_config("llama", len(char_tokenizer), char_tokenizer.pad_token_id, char_tokenizer.eos_token_id,
                         hidden_size=32, num_layers=2)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    reference = copy.deepcopy(policy).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return policy, reference


def trl_args(tmp_path, **kwargs) -> dict:
    """TRL's settings for a float32 comparison on the CPU (TRL's configs default to bf16, which
    would wrap the reference model's forward in bf16 autocast)."""
    return dict(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **kwargs)


def pair_rows(rows) -> list[dict]:
    """chattune's encoded pair rows from TRL's tokenized ones (the same token ids)."""
    return [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "chosen_labels": r["chosen_ids"],
             "rejected_ids": r["rejected_ids"], "rejected_labels": r["rejected_ids"]} for r in rows]


def trl_logged(trainer) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def assert_metrics_equal(ours: dict[str, float], theirs: dict[str, float], names) -> None:
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def chattune_loss(objective: PreferenceObjective, model, batch: dict) -> torch.Tensor:
    with objective.capturing():
        return objective(model, batch)


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


# --- DPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_equals_trl_with_a_reference_copy(loss_type, models, char_tokenizer, tmp_path):
    policy, reference = models
    args = DPOConfig(**trl_args(tmp_path), beta=0.3, loss_type=[loss_type], per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))
    their_grads = gradients(policy, theirs)

    prefs = PreferenceArgs(stage="dpo", pref_beta=0.3, pref_loss=loss_type)
    objective = PreferenceObjective(prefs, "copy", None, ref_model=reference)
    ours = chattune_loss(objective, policy, PreferenceCollator(char_tokenizer.pad_token_id, packed=False)(pair_rows(rows)))
    our_grads = gradients(policy, ours)

    torch.testing.assert_close(ours, theirs, **TOL)
    assert_metrics_equal(objective.pop_metrics("train"), trl_logged(trainer), PAIR_METRICS)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_packed_and_chunked_equals_trl(models, char_tokenizer, tmp_path):
    """chattune's CPU training path (each batch's sequences packed into one row, per-sequence
    SDPA, log-probabilities chunked from the output layer's input) against TRL's padded batch."""
    policy, reference = models
    args = DPOConfig(**trl_args(tmp_path), beta=0.1, per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))

    objective = PreferenceObjective(PreferenceArgs(stage="dpo", pref_beta=0.1), "copy",
                                    HeadCapture(output_layer(policy)), chunk_size=7, ref_model=reference)
    batch = PreferenceCollator(char_tokenizer.pad_token_id, packed=True)(pair_rows(rows))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with use_varlen_sdpa(policy) as switched, use_varlen_sdpa(reference):
        assert switched
        ours = chattune_loss(objective, policy, batch)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_metrics_equal(objective.pop_metrics("train"), trl_logged(trainer), PAIR_METRICS)


def test_dpo_with_the_adapter_switched_off_equals_trl(models, char_tokenizer, tmp_path):
    """LoRA: both take the base model with the adapter switched off as the reference."""
    from peft import LoraConfig

    policy, _ = models
    args = DPOConfig(**trl_args(tmp_path), beta=0.2, per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model = trainer.model
    with torch.no_grad():  # a trained adapter, so that the policy is not its reference
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    rows = [trainer.train_dataset[i] for i in range(4)]
    peft_model.train()
    theirs = trainer.compute_loss(peft_model, trainer.data_collator(rows))

    objective = PreferenceObjective(PreferenceArgs(stage="dpo", pref_beta=0.2), "adapter_off",
                                    HeadCapture(output_layer(peft_model)))
    ours = chattune_loss(objective, peft_model, PreferenceCollator(char_tokenizer.pad_token_id, False)(pair_rows(rows)))
    torch.testing.assert_close(ours, theirs, **TOL)
    ours_metrics = objective.pop_metrics("train")
    assert_metrics_equal(ours_metrics, trl_logged(trainer), PAIR_METRICS)
    assert ours_metrics["rewards/chosen"] != 0


def test_dpo_precomputed_reference_equals_trls(models, char_tokenizer, tmp_path):
    """``precompute_ref_log_probs``: chattune's one pass gives TRL's reference columns."""
    policy, reference = models
    args = DPOConfig(**trl_args(tmp_path), precompute_ref_log_probs=True, per_device_train_batch_size=4,
                     precompute_ref_batch_size=3)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    objective = PreferenceObjective(PreferenceArgs(stage="dpo"), "precompute", None)
    ours = precompute_reference(objective, reference, Dataset.from_list(pair_rows(rows)),
                                PreferenceCollator(char_tokenizer.pad_token_id, False), batch_size=3, log=lambda _: None)
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours[name]), torch.tensor([r[name] for r in rows]), **TOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_equals_trl_on_given_reference_log_probs(loss_type, models, char_tokenizer, tmp_path):
    """Reference log-probabilities given with the batch (``precompute``), drawn at random so that
    the margins span every regime of each loss (hinge's flat side included)."""
    policy, reference = models
    args = DPOConfig(**trl_args(tmp_path), beta=0.5, loss_type=[loss_type], precompute_ref_log_probs=True,
                     per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [dict(trainer.train_dataset[i]) for i in range(4)]
    generator = torch.Generator().manual_seed(1)
    for row in rows:
        row["ref_chosen_logps"] = float(-60 * torch.rand((), generator=generator) - 20)
        row["ref_rejected_logps"] = float(-60 * torch.rand((), generator=generator) - 20)
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))

    objective = PreferenceObjective(PreferenceArgs(stage="dpo", pref_beta=0.5, pref_loss=loss_type), "precompute",
                                    None)
    ours_rows = [dict(ours_row, ref_chosen_logps=row["ref_chosen_logps"], ref_rejected_logps=row["ref_rejected_logps"])
                 for ours_row, row in zip(pair_rows(rows), rows, strict=True)]
    ours = chattune_loss(objective, policy, PreferenceCollator(char_tokenizer.pad_token_id, False)(ours_rows))
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_metrics_equal(objective.pop_metrics("train"), trl_logged(trainer), PAIR_METRICS)


def test_dpo_pref_ftx_equals_trls_sigmoid_plus_sft(models, char_tokenizer, tmp_path):
    """``pref_ftx``: TRL's ``loss_type=["sigmoid", "sft"]`` weighted ``[1, pref_ftx]``."""
    policy, reference = models
    args = DPOConfig(**trl_args(tmp_path), beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7],
                     per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))
    objective = PreferenceObjective(PreferenceArgs(stage="dpo", pref_beta=0.1, pref_ftx=0.7), "copy", None,
                                    ref_model=reference)
    ours = chattune_loss(objective, policy, PreferenceCollator(char_tokenizer.pad_token_id, False)(pair_rows(rows)))
    torch.testing.assert_close(ours, theirs, **TOL)


def random_pairs(n: int = 64, seed: int = 0):
    """Summed answer log-probabilities and answer lengths of ``n`` pairs, varied widely."""
    generator = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 40, (n,), generator=generator).float()
    rejected_tokens = torch.randint(1, 40, (n,), generator=generator).float()
    # mean token log-probabilities from -6 to almost 0 (ORPO's log1mexp branches both ways)
    chosen = -(6 * torch.rand(n, generator=generator) ** 2 + 1e-3) * chosen_tokens
    rejected = -(6 * torch.rand(n, generator=generator) ** 2 + 1e-3) * rejected_tokens
    ref_chosen = chosen + 4 * torch.randn(n, generator=generator)
    ref_rejected = rejected + 4 * torch.randn(n, generator=generator)
    return chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens


def cpo_stub(**kwargs):
    """The attributes ``CPOTrainer.cpo_loss`` / ``ORPOTrainer.odds_ratio_loss`` read of their trainer."""
    defaults = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", simpo_gamma=0.5, alpha=0.0,
                    accelerator=SimpleNamespace(device=torch.device("cpu")))
    return SimpleNamespace(**{**defaults, **kwargs})


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_is_conservative_dpo(label_smoothing):
    """cDPO: -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m) on the log-ratio margin m;
    TRL 1.16 has it in CPOTrainer's sigmoid (on the margin it is given), no longer in DPO's."""
    chosen, rejected, ref_chosen, ref_rejected, _, _ = random_pairs()
    ours = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.3, label_smoothing=label_smoothing)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    formula = (-(1 - label_smoothing) * F.logsigmoid(0.3 * margin)
               - label_smoothing * F.logsigmoid(-0.3 * margin))
    torch.testing.assert_close(ours.losses, formula, **TOL)
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_stub(beta=0.3, label_smoothing=label_smoothing), chosen_ratio,
                                       rejected_ratio)
    torch.testing.assert_close(ours.losses, theirs, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, 0.3 * chosen_ratio, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, 0.3 * rejected_ratio, **TOL)


# --- SimPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.7, 0.3, 0.2)])
def test_simpo_equals_trls_cpo_loss(beta, gamma, label_smoothing):
    """TRL's CPOTrainer (``loss_type="simpo"``) is given the mean token log-probabilities."""
    chosen, rejected, _, _, chosen_tokens, rejected_tokens = random_pairs(seed=2)
    ours = simpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta=beta, gamma=gamma,
                        label_smoothing=label_smoothing)
    stub = cpo_stub(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, loss_type="simpo")
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen / chosen_tokens,
                                                                   rejected / rejected_tokens)
    torch.testing.assert_close(ours.losses, losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOL)


def cpo_style_rows(rows) -> list[dict]:
    """chattune's pair rows from the CPO/ORPO trainers' tokenized ones (prompt: the -100 labels)."""
    out = []
    for r in rows:
        row = {"prompt_ids": r["prompt_input_ids"]}
        for name in ("chosen", "rejected"):
            ids, labels = r[f"{name}_input_ids"], r[f"{name}_labels"]
            cut = sum(label == IGNORE_INDEX for label in labels)
            assert ids[:cut] == r["prompt_input_ids"]
            row[f"{name}_ids"], row[f"{name}_labels"] = ids[cut:], labels[cut:]
        out.append(row)
    return out


def test_simpo_equals_trl_on_a_batch(models, char_tokenizer, tmp_path):
    policy, _ = models
    args = CPOConfig(**trl_args(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7,
                     label_smoothing=0.1, max_length=128)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs, metrics = trainer.get_batch_loss_metrics(policy, trainer.data_collator(rows))

    prefs = PreferenceArgs(stage="simpo", pref_beta=2.0, simpo_gamma=0.7, pref_label_smoothing=0.1)
    objective = PreferenceObjective(prefs, None, HeadCapture(output_layer(policy)))
    ours = chattune_loss(objective, policy, PreferenceCollator(char_tokenizer.pad_token_id, False)(cpo_style_rows(rows)))
    torch.testing.assert_close(ours, theirs, **TOL)
    # (TRL's CPO logs logps/* as token means; chattune logs the sums, as its DPO does)
    assert_metrics_equal(objective.pop_metrics("train"), metrics, PAIR_METRICS[:4])


# --- ORPO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio_term_equals_trls(beta):
    """chattune's per-row ORPO loss is its SFT share less TRL's ``odds_ratio_loss`` (which TRL
    subtracts: ``loss = nll - losses.mean()``); TRL is given the mean token log-probabilities."""
    chosen, rejected, _, _, chosen_tokens, rejected_tokens = random_pairs(seed=3)
    ours = orpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta=beta)
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        cpo_stub(beta=beta), chosen / chosen_tokens, rejected / rejected_tokens)
    torch.testing.assert_close(ours.losses - sft_term(chosen, chosen_tokens), -losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOL)
    # the SFT term's mean: the chosen answers' token-mean negative log-likelihood over the batch
    torch.testing.assert_close(sft_term(chosen, chosen_tokens).mean(), -chosen.sum() / chosen_tokens.sum(), **TOL)


def orpo_on_a_batch(models, char_tokenizer, tmp_path, prompts):
    policy, _ = models
    trainer = ORPOTrainer(model=policy, args=ORPOConfig(**trl_args(tmp_path), beta=0.3, max_length=128),
                          train_dataset=Dataset.from_dict(dict(PAIRS, prompt=prompts)),
                          processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs, metrics = trainer.get_batch_loss_metrics(policy, trainer.data_collator(rows))
    objective = PreferenceObjective(PreferenceArgs(stage="orpo", pref_beta=0.3), None, None)
    ours = chattune_loss(objective, policy, PreferenceCollator(char_tokenizer.pad_token_id, False)(cpo_style_rows(rows)))
    return ours, theirs, objective.pop_metrics("train"), metrics, rows


def test_orpo_equals_trl_on_a_batch_whose_prompts_are_one_token(models, char_tokenizer, tmp_path):
    """With a one-token prompt (TRL's BOS) no prompt token is predicted, so TRL's SFT term covers
    the answers only, as chattune's does: the whole loss is equal."""
    ours, theirs, our_metrics, their_metrics, rows = orpo_on_a_batch(models, char_tokenizer, tmp_path, [""] * 4)
    assert all(len(row["prompt_input_ids"]) == 1 for row in rows)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_metrics_equal(our_metrics, their_metrics, PAIR_METRICS[:4])


@pytest.mark.xfail(strict=True, reason="TRL's ORPO SFT term also counts the prompt's tokens; chattune's the answer's only")
def test_orpo_equals_trl_on_a_batch_with_longer_prompts(models, char_tokenizer, tmp_path):
    ours, theirs, our_metrics, their_metrics, _ = orpo_on_a_batch(models, char_tokenizer, tmp_path, PAIRS["prompt"])
    assert_metrics_equal(our_metrics, their_metrics, PAIR_METRICS[:4])  # the rewards agree
    torch.testing.assert_close(ours, theirs, **TOL)  # the loss does not


# --- KTO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[True, False, True, False], [True, True, True, True]])
def test_kto_equals_trl(labels, models, char_tokenizer, tmp_path):
    """TRL's KL answers (each row's neighbour's, within the batch) given to chattune as its
    ``kl_ids``; unequal weights."""
    policy, reference = models
    args = KTOConfig(**trl_args(tmp_path), beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                     per_device_train_batch_size=4, train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_dict(dict(LABELLED, label=labels)),
                         processing_class=char_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))
    their_grads = gradients(policy, theirs)

    prefs = PreferenceArgs(stage="kto", pref_beta=0.3, kto_desirable_weight=1.0, kto_undesirable_weight=1.5)
    objective = PreferenceObjective(prefs, "copy", HeadCapture(output_layer(policy)), ref_model=reference)
    batch = PreferenceCollator(char_tokenizer.pad_token_id, False)(
        [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"], "chosen_labels": r["completion_ids"],
          "kl_ids": r["KL_completion_ids"], "kl_labels": r["KL_completion_ids"], "desirable": r["label"]}
         for r in rows])
    ours = chattune_loss(objective, policy, batch)
    our_grads = gradients(policy, ours)

    torch.testing.assert_close(ours, theirs, **TOL)
    names = ["kl", "rewards/chosen", "logps/chosen"]
    if not all(labels):
        names += ["rewards/rejected", "logps/rejected", "rewards/margins"]
    their_metrics = trl_logged(trainer)
    assert their_metrics["kl"] > 0
    assert_metrics_equal(objective.pop_metrics("train"), their_metrics, names)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kl_reference", [(-200.0, -150.0), (-5.0, -1.0)], ids=["kl-positive", "kl-clamped"])
def test_kto_equals_trl_on_given_reference_log_probs(kl_reference, models, char_tokenizer, tmp_path):
    """Reference log-probabilities given with the batch (``precompute``), the KL answers' drawn so
    that the batch's KL estimate is positive, or negative and so clamped at 0."""
    policy, reference = models
    args = KTOConfig(**trl_args(tmp_path), beta=0.05, per_device_train_batch_size=4, precompute_ref_log_probs=True,
                     train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_dict(dict(LABELLED, label=[True, False, False, True])),
                         processing_class=char_tokenizer)
    rows = [dict(trainer.train_dataset[i]) for i in range(4)]
    generator = torch.Generator().manual_seed(2)
    low, high = kl_reference
    for row in rows:
        row["ref_logps"] = float(-60 * torch.rand((), generator=generator) - 20)
        row["ref_KL_logps"] = float((high - low) * torch.rand((), generator=generator) + low)
    policy.train()
    theirs = trainer.compute_loss(policy, trainer.data_collator(rows))

    objective = PreferenceObjective(PreferenceArgs(stage="kto", pref_beta=0.05), "precompute", None)
    batch = PreferenceCollator(char_tokenizer.pad_token_id, False)(
        [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"], "chosen_labels": r["completion_ids"],
          "kl_ids": r["KL_completion_ids"], "kl_labels": r["KL_completion_ids"], "desirable": r["label"],
          "ref_logps": r["ref_logps"], "ref_kl_logps": r["ref_KL_logps"]} for r in rows])
    ours = chattune_loss(objective, policy, batch)
    torch.testing.assert_close(ours, theirs, **TOL)
    their_metrics = trl_logged(trainer)
    assert (their_metrics["kl"] > 0) == (kl_reference[0] < -100)
    assert_metrics_equal(objective.pop_metrics("train"), their_metrics,
                         ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"])
