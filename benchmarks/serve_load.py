"""Load test for ``chattune serve``: N concurrent clients for a fixed time each.

    python benchmarks/serve_load.py                      # tiny model, fine-tuned on the spot
    python benchmarks/serve_load.py --run RUN_DIR        # serve this run folder
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a running server

Unless ``--url`` is given it starts ``chattune serve`` itself on a free loopback port
and stops it at the end. For each level (1, 4, 16 clients) every client sends streamed
chat completions back to back for ``--duration`` seconds; each answer is exactly
``--max-tokens`` tokens (``ignore_eos``), sampled with a seed per request. It reports requests/s, output
tokens/s, p50/p95 latency and time to first token, and errors. Then the same 16
requests one after another versus all at once, to show what batching buys.
It talks only to loopback and ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Result:
    """One request: seconds to the end and to the first text, tokens generated, or an error."""

    latency: float = 0.0
    ttft: float = 0.0
    tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, i: int,
                      headers: dict) -> Result:
    """Send one streamed chat completion and time it."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: who are you?"}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(error=chunk["error"]["message"][:60])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as exc:
        return Result(error=type(exc).__name__)
    end = time.perf_counter()
    return Result(latency=end - start, ttft=(first or end) - start, tokens=tokens)


async def run_level(url: str, model: str, clients: int, duration: float, max_tokens: int,
                    headers: dict) -> tuple[list[Result], float]:
    """``clients`` clients, each sending requests back to back until ``duration`` is over."""
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                results.append(await one_request(client, url, model, max_tokens, w * 10_000 + n, headers))
                n += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
        return results, time.perf_counter() - start


async def run_burst(url: str, model: str, count: int, max_tokens: int, headers: dict,
                    together: bool) -> tuple[list[Result], float]:
    """The same ``count`` requests, one after another or all at once."""
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        if together:
            results = list(await asyncio.gather(*(one_request(client, url, model, max_tokens, i, headers)
                                                  for i in range(count))))
        else:
            results = [await one_request(client, url, model, max_tokens, i, headers) for i in range(count)]
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def row(label: str, results: list[Result], elapsed: float) -> str:
    """One line of the table."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ms = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok]
    return (f"{label:<22}{len(ok):>6}{len(ok) / elapsed:>8.2f}{tokens / elapsed:>10.1f}"
            f"{percentile(ms, 50):>9.0f}{percentile(ms, 95):>9.0f}{percentile(ttft, 50):>9.0f}"
            f"{percentile(ttft, 95):>9.0f}{len(results) - len(ok):>7}")


HEADER = (f"{'clients':<22}{'reqs':>6}{'req/s':>8}{'out tok/s':>10}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'TTFT p50':>9}{'TTFT p95':>9}{'errors':>7}")


def tiny_run(workdir: Path) -> Path:
    """A tiny GLM-4 model (chattune tiny-model's default size) with a LoRA adapter trained for a few steps."""
    from chattune.config_io import load_config
    from chattune.demo import demo_records
    from chattune.tiny import build_tiny_model
    from chattune.training.recipe import train

    base = build_tiny_model(workdir / "base", "glm4")
    data = workdir / "train.json"
    data.write_text(json.dumps(demo_records()[0], ensure_ascii=False))
    overrides = {"model_name_or_path": base, "train_files": f'["{data}"]', "output_dir": workdir / "run",
                 "max_steps": 8, "save_steps": 8, "logging_steps": 8, "report_to": '["none"]',
                 "max_seq_length": 96, "learning_rate": 2e-3, "cache_dir": workdir / "cache"}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return train(config, log=lambda *_: None).output_dir


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run_dir: Path, port: int, max_batch: int, extra: list[str]) -> subprocess.Popen:
    """``chattune serve`` in a subprocess; returns once /health answers."""
    command = [sys.executable, "-m", "chattune.cli", "serve", str(run_dir), "--name", "bench", "--port", str(port),
               "--max-batch", str(max_batch), "--log-level", "warning", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CHATTUNE_API_KEY", None)
    proc = subprocess.Popen(command, env=env)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"chattune serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("chattune serve did not start within 180 s")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    from train_throughput import float32_gflops  # (torch: imported only when run)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", default="bench", help="the model name to ask for (with --url)")
    parser.add_argument("--run", help="run folder to serve (default: a tiny model fine-tuned here)")
    parser.add_argument("--api-key", default=os.environ.get("CHATTUNE_API_KEY"))
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--burst", type=int, default=16, help="requests in the sequential vs together comparison")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: its own default)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    with tempfile.TemporaryDirectory(prefix="chattune-bench-") as tmp:
        if args.url:
            if urlparse(args.url).hostname not in LOOPBACK:
                raise SystemExit("--url: this benchmark talks only to loopback (127.0.0.1, localhost, ::1)")
            url, model = args.url.rstrip("/"), args.model
        else:
            print("preparing a tiny fine-tuned model ..." if not args.run else f"serving {args.run} ...", flush=True)
            run_dir = Path(args.run) if args.run else tiny_run(Path(tmp))
            port = free_port()
            extra = ["--threads", str(args.threads)] if args.threads else []
            proc = start_server(run_dir, port, max(max(levels), args.burst), extra)
            url, model = f"http://127.0.0.1:{port}", "bench"
        try:
            print(f"server {url}, model {model}, {args.max_tokens} tokens per answer, sampled, streamed; "
                  f"{args.duration:g} s per level; {os.cpu_count()} CPU cores\n")
            print(HEADER)
            asyncio.run(run_burst(url, model, 2, 4, headers, together=True))  # warm-up
            peak_before = float32_gflops()
            for clients in levels:
                results, elapsed = asyncio.run(run_level(url, model, clients, args.duration, args.max_tokens,
                                                         headers))
                print(row(f"{clients} concurrent", results, elapsed), flush=True)
            print()
            seq, seq_time = asyncio.run(run_burst(url, model, args.burst, args.max_tokens, headers, together=False))
            print(row(f"{args.burst} one by one", seq, seq_time), flush=True)
            par, par_time = asyncio.run(run_burst(url, model, args.burst, args.max_tokens, headers, together=True))
            print(row(f"{args.burst} at once", par, par_time))
            print(f"\nthe same {args.burst} requests: {seq_time:.2f} s one by one, {par_time:.2f} s at once "
                  f"({seq_time / par_time:.1f}x the output tokens/s)")
            print(f"matmul peak before / after the levels: {peak_before:.0f} / {float32_gflops():.0f} GFLOP/s float32")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
