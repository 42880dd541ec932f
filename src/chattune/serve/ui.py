"""The web page of ``chattune serve``: chat, side by side, runs.

Plain HTML, CSS and JavaScript from ``chattune/serve/static`` (no build step, nothing
fetched from elsewhere): ``GET /`` is the page, ``/ui/static/...`` its files. The page talks
to the server's own OpenAI routes (``/v1/models``, streamed ``/v1/chat/completions``) and to
three read-only routes about run folders (:mod:`chattune.serve.run_info`):

- ``GET /ui/api/runs``: every served run and every run under ``--runs-dir``, summarized;
- ``GET /ui/api/runs/{id}``: one run's summary, data audit and evaluations;
- ``GET /ui/api/runs/{id}/metrics?offset=N``: its metrics.jsonl rows after byte N.

With an API key the page and its static files are open (they hold no secret: the page asks
for the key and sends it as the bearer header), every other route needs the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from chattune.serve.run_info import find_runs, metrics_since, run_detail, run_summary
from chattune.serve.schema import APIError

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
"""The page's Content-Security-Policy: its own scripts and styles only (no inline script, no
other host), images only from itself or the user's own files (data: and blob: URLs), requests
only to its server, never framed by another page."""
PAGE_PATHS = ("/", "/favicon.ico")
STATIC_PREFIX = "/ui/static/"


def is_open_path(path: str) -> bool:
    """Whether a request path is the page or one of its files (served without the API key)."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


def add_ui(app: FastAPI, served_dirs: Callable[[], dict[str, Path | None]],
           runs_dir: str | Path | None = None) -> None:
    """Add the page and its run routes to ``app``; ``served_dirs()``: the run folder of each
    model served now, by name (None for a bare base model)."""
    if not (STATIC_DIR / "index.html").is_file():
        raise FileNotFoundError(f"{STATIC_DIR}: the page's files are missing from this install")
    runs_root = Path(runs_dir) if runs_dir is not None else None
    no_store = {"Cache-Control": "no-cache"}

    def entries():
        return find_runs(served_dirs(), runs_root)

    def entry(run: str):
        found = entries().get(run)
        if found is None:
            raise APIError(404, f"no run with id {run!r}; GET /ui/api/runs lists them", param="id",
                           code="run_not_found")
        return found

    @app.get("/", include_in_schema=False)
    async def page():
        """The page."""
        return FileResponse(STATIC_DIR / "index.html",
                            headers={**no_store, "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        """The page's icon."""
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/ui/api/runs")
    async def list_runs():
        """Every run the page can show, summarized."""
        return {"runs_dir": str(runs_root) if runs_root else None,
                "runs": [run_summary(e) for e in entries().values()]}

    @app.get("/ui/api/runs/{run}")
    async def get_run(run: str):
        """One run: summary, data audit, evaluations."""
        return run_detail(entry(run))

    @app.get("/ui/api/runs/{run}/metrics")
    async def get_metrics(run: str, offset: int = 0):
        """The run's metrics.jsonl rows after byte ``offset``."""
        found = entry(run)
        return {**metrics_since(found.path, offset), "state": run_summary(found)["state"]}

    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
