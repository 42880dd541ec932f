"""``chattune serve``: an OpenAI-compatible HTTP API over run folders, batched.

- :func:`chattune.inference.runs.load_run` loads the base model once with every adapter;
- :mod:`chattune.serve.engine` decodes all requests together in one worker thread, through
  :class:`chattune.inference.decoding.Decoder` (which ``chat`` and ``predict`` use too);
- :mod:`chattune.serve.schema` and :mod:`chattune.serve.app` are the HTTP side.

``chattune serve`` (its options are in :mod:`chattune.cli`) calls :func:`serve`.
"""

from __future__ import annotations

import os
import sys

from chattune.errors import ConfigError

API_KEY_ENV = "CHATTUNE_API_KEY"


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=RUN_DIR`` from the command line."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"--adapter: expected NAME=RUN_DIR, got {text!r}")
    return name.strip(), path.strip()


SWITCH_INTERVAL = 0.001
"""Seconds a Python thread runs before it hands the interpreter to another that waits for it
(Python's default: 0.005)."""


def set_threads(threads: int | None) -> None:
    """torch's CPU threads: as given, else torch's own default (every core, or
    ``OMP_NUM_THREADS``): on 2 cores, 16 SmolLM2 requests at once finished in 9.0-10.3 s with 2
    threads against 12.3-13.7 s with one left to the HTTP side (interleaved), one by one the
    same. And Python's switch interval (:data:`SWITCH_INTERVAL`), so that a long prompt rendered
    in a worker thread holds the engine's thread and the event loop up for at most that long at
    a time."""
    import torch

    sys.setswitchinterval(SWITCH_INTERVAL)
    if threads:
        torch.set_num_threads(threads)


def build_reward(args, warn=print):
    """For a reward-model run (stage rm): load it as a scorer and return (scorer, None, app), the
    app :func:`chattune.serve.rewards.create_reward_app` (no engine: nothing is generated).
    ConfigError for the options a reward model cannot take (more adapters, knowledge bases)."""
    from chattune.inference.reward import load_reward_model
    from chattune.serve.rewards import create_reward_app

    for option, given in (("--adapter", getattr(args, "adapter", None)), ("--kb", getattr(args, "kb", None))):
        if given:
            raise ConfigError(f"{option}: {args.run_dir} is a reward model (stage rm), served alone: it scores "
                              "conversations at /v1/rewards; leave out " + option)
    set_threads(args.threads)
    scorer = load_reward_model(args.run_dir, base_model=args.base_model, force=args.force, name=args.name,
                               batch_size=args.max_batch or 8, warn=warn)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return scorer, None, create_reward_app(scorer, api_key=api_key, max_body_bytes=args.max_body_bytes or TEXT_BODY_BYTES)


def build(args, warn=print):
    """Load what ``args`` names and return (served, engine, app); the engine is started. A
    reward-model run is built by :func:`build_reward` (served is then its scorer, engine None)."""
    from chattune.inference.reward import is_reward_run
    from chattune.inference.runs import LoadOptions, load_run

    if is_reward_run(args.run_dir):
        return build_reward(args, warn)
    from chattune.kb.store import THRESHOLD, TOP_K
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from chattune.serve.retrieval import open_kbs

    kbs = open_kbs(getattr(args, "kb", None) or [], getattr(args, "kb_top_k", TOP_K),
                   getattr(args, "kb_threshold", THRESHOLD))
    options = LoadOptions(base_model=args.base_model, force=args.force, trust_remote_code=args.trust_remote_code,
                          name=args.name, adapters=[parse_adapter(text) for text in args.adapter])
    set_threads(args.threads)
    served = load_run(args.run_dir, options, warn=warn)
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=args.max_batch,
                    max_waiting=args.max_queue, use_adapters=served.uses_adapters)
    engine.start()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        body = args.max_body_bytes or (VISION_BODY_BYTES if served.vision is not None else TEXT_BODY_BYTES)
        app = create_app(served, engine, api_key=api_key, max_body_bytes=body,
                         ui=not getattr(args, "no_ui", False), runs_dir=getattr(args, "runs_dir", None), kbs=kbs)
    except Exception:
        engine.stop()
        raise
    return served, engine, app


TEXT_BODY_BYTES = 1 << 20
"""The default largest request body: 1 MiB."""
VISION_BODY_BYTES = 20 << 20
"""The default largest request body of a model that reads images (sent as base64, each turn
again with the history): 20 MiB."""


def check_address(host: str, port: int) -> None:
    """Raise ConfigError, before any model loads, when the server could not listen on
    ``host:port``: a port outside 0-65535, a host that does not resolve, an address in use."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be from 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                          "expected a free port on an address of this machine") from exc


def serve(args) -> int:
    """Run the server in the foreground until interrupted (``chattune serve``)."""
    import uvicorn

    for option in ("max_batch", "max_queue", "max_body_bytes", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')}: must be >= 1")
    runs_dir = getattr(args, "runs_dir", None)
    if runs_dir is not None and not os.path.isdir(runs_dir):
        raise ConfigError(f"--runs-dir: {runs_dir} is not a folder (expected a folder holding run folders)")
    check_address(args.host, args.port)
    served, engine, app = build(args, warn=lambda m: print(m, file=sys.stderr))
    key = args.api_key or os.environ.get(API_KEY_ENV)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not key and not loopback:
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    if engine is None:  # a reward model
        print(f"chattune serve: reward model {served.name}; POST http://{args.host}:{args.port}/v1/rewards"
              + (" (API key required)" if key else ""), file=sys.stderr)
    else:
        kb_names = [f"{model}+{name}" for model in served.profiles for name in getattr(app.state, "kb_names", [])]
        print(f"chattune serve: models {', '.join([*served.profiles, *kb_names])} (default {served.default}); "
              f"OpenAI API at http://{args.host}:{args.port}/v1" + (" (API key required)" if key else "")
              + ("" if getattr(args, "no_ui", False) else f"; web page at http://{args.host}:{args.port}/"),
              file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        if engine is not None:
            engine.stop()
    return 0
