"""``chattune serve``: an OpenAI-compatible HTTP API over run folders, batched.

- :mod:`chattune.serve.registry` loads the base model once with every adapter;
- :mod:`chattune.serve.engine` decodes all requests together in one worker thread;
- :mod:`chattune.serve.text` turns tokens into text that is safe to stream;
- :mod:`chattune.serve.schema` and :mod:`chattune.serve.app` are the HTTP side.

``chattune serve`` (its options are in :mod:`chattune.cli`) calls :func:`serve`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

API_KEY_ENV = "CHATTUNE_API_KEY"


class ServerThread:
    """A uvicorn server for ``app`` on a loopback port, in a background thread (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; return once the server accepts connections."""
        import time

        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def set_threads(threads: int | None) -> None:
    """torch's CPU threads: as given, else on a CPU-only machine one less than the cores, so
    that the model's threads never wait on a core the HTTP side holds."""
    import torch

    if threads is None and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads:
        torch.set_num_threads(threads)


def build(args, warn=print):
    """Load what ``args`` names and return (served, engine, app); the engine is started."""
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from chattune.serve.registry import load_served, parse_adapter

    adapters = [parse_adapter(text) for text in args.adapter]
    set_threads(args.threads)
    served = load_served(args.run_dir, adapters, name=args.name, base_model=args.base_model, force=args.force,
                         trust_remote_code=args.trust_remote_code, warn=warn)
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=args.max_batch,
                    max_waiting=args.max_queue, use_adapters=served.uses_adapters)
    engine.start()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(served, engine, api_key=api_key, max_body_bytes=args.max_body_bytes)
    return served, engine, app


def serve(args) -> int:
    """Run the server in the foreground until interrupted (``chattune serve``)."""
    import uvicorn

    from chattune.config import ConfigError

    for option in ("max_batch", "max_queue", "max_body_bytes", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')}: must be >= 1")
    served, engine, app = build(args, warn=lambda m: print(m, file=sys.stderr))
    key = args.api_key or os.environ.get(API_KEY_ENV)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not key and not loopback:
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"chattune serve: models {', '.join(served.models)} (default {served.default}); "
          f"OpenAI API at http://{args.host}:{args.port}/v1" + (" (API key required)" if key else ""),
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
