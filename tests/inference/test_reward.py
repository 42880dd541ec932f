"""A reward-model run folder loaded back as a scorer: conversations rendered as training rendered
them, batching that changes no reward, errors naming the conversation, and ``chattune eval
RM_RUN --data PAIRS`` (held-out pair accuracy, beside the untrained head)."""

from __future__ import annotations

import json

import pytest

from chattune.errors import ManifestError
from chattune.inference.reward import is_reward_run, load_reward_model


def _conversations(path, side: str) -> list[list[dict]]:
    return [[{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row[side]}]
            for row in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def scorer(rm_run):
    return load_reward_model(rm_run.output_dir)


def test_scorer_renders_conversations_as_training_encoded_pairs(scorer, reward_pairs):
    from chattune.data.pair_encode import prepare_preference_data
    from tests.conftest import reward_config

    config = reward_config(scorer.manifest.base_model.path, reward_pairs["held"], scorer.run_dir, eval_fraction=0.0)
    prepared = prepare_preference_data(config.data, scorer.tokenizer, scorer.template, "rm", 3)
    for side in ("chosen", "rejected"):
        trained = {tuple(row["prompt_ids"] + row[f"{side}_ids"]) for row in prepared.train}
        scored = {tuple(scorer.encode(c)) for c in _conversations(reward_pairs["held"], side)}
        assert scored == trained and len(scored) == 24


def test_held_out_pairs_rank_right_and_batching_changes_no_reward(scorer, reward_pairs):
    chosen = scorer.score(_conversations(reward_pairs["held"], "chosen"))
    rejected = scorer.score(_conversations(reward_pairs["held"], "rejected"), batch_size=3)
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert accuracy >= 0.9
    one_by_one = scorer.score(_conversations(reward_pairs["held"], "chosen")[:4], batch_size=1)
    assert one_by_one == pytest.approx(chosen[:4], abs=1e-5)
    assert scorer.score([]) == []


def test_untrained_head_does_not_rank_the_pairs(rm_run, reward_pairs):
    base = load_reward_model(rm_run.output_dir, trained=False)
    chosen = base.score(_conversations(reward_pairs["held"], "chosen"))
    rejected = base.score(_conversations(reward_pairs["held"], "rejected"))
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen) < 0.9
    again = load_reward_model(rm_run.output_dir, trained=False).score(_conversations(reward_pairs["held"], "chosen"))
    assert again == pytest.approx(chosen, abs=1e-6)  # the head is drawn from the run's seed


def test_an_empty_answer_is_scored_as_the_prompt_then_the_end(scorer):
    """A policy that stops at once wrote an answer too: GRPO's reward model must score it."""
    prompt = [{"role": "user", "content": "hi"}]
    ids = scorer.encode(prompt + [{"role": "assistant", "content": ""}])
    longer = scorer.encode(prompt + [{"role": "assistant", "content": "cat yes"}])
    assert ids[-1] == longer[-1] and len(ids) < len(longer)  # the prompt, then the answer's end token
    empty, answered = scorer.score([prompt + [{"role": "assistant", "content": ""}],
                                    prompt + [{"role": "assistant", "content": "cat yes"}]])
    assert empty == pytest.approx(scorer.score_ids([ids])[0], abs=1e-6) and empty != answered


@pytest.mark.parametrize("conversation,match", [
    ([{"role": "user", "content": "hi"}], r"conversations\[1\]: expected a list of messages"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}], r"conversations\[1\]\[1\]\.role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],
     r"conversations\[1\]\[1\]\.content: expected a string, got int"),
    ("hello", r"conversations\[1\]: expected a list of messages .*, got str$"),
])
def test_a_bad_conversation_is_named(scorer, conversation, match):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat yes"}]
    with pytest.raises(ValueError, match=match):  # RecordError or DataError, both ValueErrors
        scorer.score([good, conversation])


def test_a_chat_run_is_not_a_reward_model(tiny_models, data_file, tmp_path):
    from chattune.training.recipe import train
    from tests.conftest import reward_config

    sft = train(reward_config(tiny_models("llama"), data_file, tmp_path / "sft", stage="sft", max_steps=1,
                              save_steps=1, eval_fraction=0.0), log=lambda *_: None)
    assert not is_reward_run(sft.output_dir)
    with pytest.raises(ManifestError, match="not a reward model: it was trained with stage sft"):
        load_reward_model(sft.output_dir)
    with pytest.raises(ManifestError, match="not a run folder"):
        load_reward_model(tmp_path)


def test_eval_reports_pair_accuracy_beside_the_untrained_head(rm_run, reward_pairs, tmp_path, capsys):
    from chattune.cli import main

    out = tmp_path / "eval"
    assert main(["eval", str(rm_run.output_dir), "--data", str(reward_pairs["held"]), "--compare", "base",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pair accuracy (chosen > rejected)" in printed and "untrained" in printed
    result = json.loads((out / "preference.json").read_text())
    rows = [json.loads(line) for line in (out / "preference_rows.jsonl").read_text().splitlines()]
    assert result["stage"] == "rm" and result["data"]["pairs"] == len(rows) == 24
    assert result["metrics"]["pair_accuracy"] >= 0.9 > result["base"]["pair_accuracy"]
    assert result["metrics"]["pair_accuracy"] == pytest.approx(sum(r["reward_margin"] > 0 for r in rows) / len(rows))
    assert result["metrics"]["reward_margin"] == pytest.approx(sum(r["reward_margin"] for r in rows) / len(rows))
    assert all(r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"]) for r in rows)


def test_eval_of_a_reward_model_wants_pairs(rm_run, data_file, reward_pairs, tmp_path, capsys):
    from chattune.cli import main

    assert main(["eval", str(rm_run.output_dir), "--data", str(data_file), "--out", str(tmp_path / "e")]) == 2
    assert "is a reward model (stage rm)" in capsys.readouterr().err
    assert main(["eval", str(rm_run.output_dir), "--data", str(reward_pairs["held"]), "--compare", str(tmp_path),
                 "--out", str(tmp_path / "f")]) == 2
    assert "--compare" in capsys.readouterr().err


def test_a_reward_model_is_not_loaded_as_a_chat_model(rm_run, capsys):
    from chattune.cli import main
    from chattune.inference.runs import load_run

    with pytest.raises(ManifestError, match=r"a reward model \(stage rm\) scores conversations"):
        load_run(str(rm_run.output_dir))
    assert main(["predict", str(rm_run.output_dir), "--data", "unused.json", "--out", "unused.jsonl"]) == 2
    assert "reward model" in capsys.readouterr().err
    assert main(["export", str(rm_run.output_dir), "--out", "unused-export"]) == 2
    assert "reward model (stage rm) is not exported" in capsys.readouterr().err
