"""Answers from a loaded run: batched, streamed, and their settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.inference.generate import answer, generate, sampling_params, stream
from chattune.inference.runs import load_run
from tests.training.test_recipe import make_config

ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory) -> Path:
    from chattune.demo import demo_records
    from chattune.training.recipe import train

    taught, held = demo_records()
    root = tmp_path_factory.mktemp("gen")
    data = root / "train.json"
    data.write_text(json.dumps(taught, ensure_ascii=False))
    config = make_config(tiny_models("glm4"), data, root / "run", max_steps=4, save_steps=4,
                         eval_fraction=0.0, report_to=["none"])
    return train(config, log=lambda *_: None).output_dir


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(str(run_dir))


def test_batched_generation_equals_one_by_one(run):
    prompts = [ASK, [{"role": "user", "content": "What is the capital of Veloria? Please answer."}]]
    together = answer(run, prompts, max_new_tokens=8, ignore_eos=True)
    alone = [answer(run, [p], max_new_tokens=8, ignore_eos=True)[0] for p in prompts]
    assert [s.generated for s in together] == [s.generated for s in alone]
    assert all(len(s.generated) == 8 for s in together)


def test_stream_reassembles_to_the_greedy_answer(run):
    messages = [{"role": "user", "content": "Who rules Veloria?"}]
    pieces = list(stream(run, messages, max_new_tokens=10))
    assert len(pieces) >= 1
    assert "".join(pieces) == generate(run, [messages], max_new_tokens=10)[0]


def test_max_new_tokens_bounds_the_answer(run):
    assert len(answer(run, [ASK], max_new_tokens=3, ignore_eos=True)[0].generated) == 3


def test_seeded_sampling_repeats_and_differs_by_seed(run):
    def sampled(seed):
        return answer(run, [ASK], max_new_tokens=12, temperature=1.5, seed=seed, ignore_eos=True)[0].generated

    assert sampled(5) == sampled(5)
    assert len({tuple(sampled(s)) for s in range(5)}) > 1


def test_sampling_settings_come_from_the_run_unless_overridden(run):
    profile = run.profile()
    assert profile.generation.max_new_tokens == 12  # make_config's
    params = sampling_params(profile)
    assert params.max_tokens == 12 and params.temperature == 0.0  # do_sample is off: greedy
    params = sampling_params(profile, max_new_tokens=3, temperature=0.5, top_k=4, repetition_penalty=1.3, seed=1)
    assert (params.max_tokens, params.temperature, params.top_k, params.repetition_penalty, params.seed) == \
        (3, 0.5, 4, 1.3, 1)
    assert sampling_params(profile, temperature=0.5, do_sample=False).temperature == 0.0


def test_a_long_history_is_cut_to_leave_room_for_the_answer(run):
    history = []
    for i in range(60):
        history += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": "ok " * 8}]
    history.append({"role": "user", "content": "last question"})
    seq = answer(run, [history], max_new_tokens=5, ignore_eos=True)[0]
    assert len(seq.prompt_ids) + 5 <= run.context_length
    assert len(seq.generated) == 5


# --- one way to decode a batch: generate, eval during training and the export probe agree ------------------------


PROMPTS = [ASK, [{"role": "user", "content": "What is the capital of Veloria? Please answer."}],
           [{"role": "user", "content": "你是谁？"}]]


def test_generate_and_the_decoder_give_the_same_tokens_through_decode_batch(run):
    from chattune.inference.decoding import Sequence, decode_batch
    from chattune.inference.generate import decode, sequence
    from chattune.inference.sampling import SamplingParams
    from chattune.inference.textstream import TextStream

    served = run.profile()
    answers = answer(run, PROMPTS, max_new_tokens=8, ignore_eos=True)
    ids = [run.prompt_ids(p, served) for p in PROMPTS]
    built = decode(run, [sequence(run, served, i, SamplingParams(max_tokens=8, ignore_eos=True)) for i in ids])
    bare = decode_batch(run.model, [Sequence(i, SamplingParams(max_tokens=8, ignore_eos=True),
                                             TextStream(run.decode, [], strip=True), lambda _: None,
                                             adapter=served.adapter) for i in ids],
                        pad_token_id=run.tokenizer.pad_token_id, use_adapters=run.uses_adapters)
    assert [s.prompt_ids for s in answers] == ids
    assert [s.generated for s in answers] == [s.generated for s in built] == [s.generated for s in bare]
    assert [s.text.text for s in answers] == [s.text.text for s in built]


def test_eval_during_training_answers_as_generate_does(run, monkeypatch):
    """generation_metrics (eval_generate) scores the very answers generate gives the same prompt ids."""
    from chattune.evaluation import evaluate as ev

    served = run.profile()
    answers = answer(run, PROMPTS, max_new_tokens=6, do_sample=False)
    scored = []
    real_score = ev.score
    monkeypatch.setattr(ev, "score", lambda text, label: scored.append(text) or real_score(text, label))
    samples = [(s.prompt_ids, [1, 2]) for s in answers]
    figures = ev.generation_metrics(run.model, run.tokenizer, served.template, samples, max_new_tokens=6,
                                    batch_size=2)
    assert scored == [s.text.text for s in answers]
    assert figures["answer_length"] == pytest.approx(sum(len(s.generated) for s in answers) / len(answers))


def test_the_export_probe_decodes_as_generate_does(run):
    from chattune.export.model import GREEDY_TOKENS, probe

    answers = answer(run, PROMPTS, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)
    _, tokens = probe(run.model, [s.prompt_ids for s in answers])
    assert tokens == [s.generated for s in answers]
