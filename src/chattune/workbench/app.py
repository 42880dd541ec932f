"""The workbench's server: the page, its run views, the job routes, and a model loaded on demand.

See :mod:`chattune.workbench` for the routes. The OpenAI routes (``/v1/...``) answer with the
run last opened by the page's Chat button (:class:`ModelSlot`): a run is loaded when asked
for, the one before is let go once the new one is ready.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from chattune.errors import ChattuneError, ConfigError
from chattune.serve import ui as ui_module
from chattune.serve.app import LimitBody, RequireKey, add_error_handlers
from chattune.serve.run_info import MANIFEST_NAME, find_runs, run_id
from chattune.serve.schema import APIError, error_body
from chattune.training.callbacks import PROGRESS_NAME
from chattune.workbench import form as form_module
from chattune.workbench import preview as preview_module
from chattune.workbench.folders import Folders, PathRefused
from chattune.workbench.jobs import ACTIVE, Job, JobNotFound, JobQueue

PREFIX = "/ui/api/workbench"
JOBS_FOLDER = ".jobs"
"""The jobs' folder inside the runs folder (hidden: the runs view does not list it)."""
PREVIEW_OUTPUT = ".preview"
MAX_UPLOAD_BYTES = 200 << 20
BODY_BYTES = 1 << 20


class Strict(BaseModel):
    """A request body: unknown fields are a 400 naming them."""

    model_config = ConfigDict(extra="forbid")


class FormBody(Strict):
    """The form as the page sends it."""

    values: dict[str, Any]
    rows: int = Field(default=preview_module.PREVIEW_ROWS, ge=1, le=preview_module.MAX_PREVIEW_ROWS)


class JobBody(Strict):
    """A job to start: a training from the form, or an evaluation or export of a run."""

    kind: Literal["train", "eval", "export"]
    values: dict[str, Any] | None = None
    run: str | None = None
    data: str | None = None
    compare: Literal["base"] | None = None
    limit: int | None = Field(default=None, ge=1)
    out: str | None = None
    gguf: Literal["f16", "q8_0"] | None = None


class RunBody(Strict):
    """A run, by the id the runs view lists it under."""

    run: str


class ModelSlot:
    """The model ``/v1`` answers with: none until the page asks for a run, then that run (an
    OpenAI app of :func:`chattune.serve.app.create_app` over its own engine)."""

    def __init__(self, max_batch: int = 8, max_body_bytes: int | None = None):
        self.app = None
        self.engine = None
        self.name: str | None = None
        self.path: Path | None = None
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.lock = threading.Lock()

    def load(self, path: Path, warn=print) -> str:
        """Load ``path`` (a run folder), then let the model before it go; returns its model name."""
        from chattune.inference.runs import LoadOptions, load_run
        from chattune.serve import TEXT_BODY_BYTES, VISION_BODY_BYTES
        from chattune.serve.app import create_app
        from chattune.serve.engine import Engine

        with self.lock:
            served = load_run(str(path), LoadOptions(), warn=warn)
            engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=self.max_batch,
                            use_adapters=served.uses_adapters)
            engine.start()
            body = self.max_body_bytes or (VISION_BODY_BYTES if served.vision is not None else TEXT_BODY_BYTES)
            try:
                app = create_app(served, engine, max_body_bytes=body, ui=False)
            except Exception:
                engine.stop()
                raise
            old = self.engine
            self.app, self.engine, self.name, self.path = app, engine, served.default, path
        if old is not None:
            old.stop()
        return served.default

    def close(self) -> None:
        """Stop the engine."""
        if self.engine is not None:
            self.engine.stop()

    async def __call__(self, scope, receive, send):
        """Hand the request to the loaded model's app, or answer 503."""
        app = self.app
        if app is None:
            body = error_body("no model is loaded: open a run on the Train page and press Chat "
                              "(POST /ui/api/workbench/chat)", code="model_not_loaded")
            return await JSONResponse(body, status_code=503)(scope, receive, send)
        await app(scope, receive, send)


class Dispatch:
    """ASGI: ``/v1/...`` to the model slot, everything else to the workbench's app."""

    def __init__(self, app, slot: ModelSlot):
        self.app, self.slot = app, slot

    async def __call__(self, scope, receive, send):
        """Route by path."""
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            return await self.slot(scope, receive, send)
        await self.app(scope, receive, send)


def _form_error(exc: form_module.FormError) -> JSONResponse:
    first = exc.errors[0]
    body = error_body(first["message"], param=first["key"], code="invalid_config")
    body["errors"] = exc.errors
    return JSONResponse(body, status_code=400)


def create_workbench(folders: Folders, jobs: JobQueue, slot: ModelSlot, *, api_key: str | None = None) -> Dispatch:
    """The workbench's ASGI app (the page, the run views, the job routes, ``/v1`` through
    ``slot``); the job queue's thread is started by whoever owns it."""
    app = FastAPI(title="chattune workbench", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.folders, app.state.jobs, app.state.slot = folders, jobs, slot

    def served_dirs() -> dict:
        return {slot.name: slot.path} if slot.name else {}

    ui_module.add_ui(app, served_dirs, folders.runs)

    add_error_handlers(app)

    @app.exception_handler(form_module.FormError)
    async def form_error(_request, exc: form_module.FormError):
        """A form ``chattune train`` would refuse: 400, every problem with its key."""
        return _form_error(exc)

    @app.exception_handler(JobNotFound)
    async def no_job(_request, exc: JobNotFound):
        """An unknown job id."""
        return JSONResponse(error_body(str(exc), param="id", code="job_not_found"), status_code=404)

    @app.exception_handler(ChattuneError)
    async def bad_input(_request, exc: ChattuneError):
        """Bad input found by chattune's own checks (a path, a data file, a model): 400."""
        param = exc.key if isinstance(exc, PathRefused) else None
        return JSONResponse(error_body(str(exc), param=param), status_code=400)

    @app.get("/health")
    async def health():
        """Liveness, the loaded model and the jobs by state; needs no API key."""
        counts: dict[str, int] = {}
        for job in jobs.listed():
            counts[job.state] = counts.get(job.state, 0) + 1
        return {"status": "ok", "model": slot.name, "jobs": counts}

    @app.get(PREFIX)
    async def about():
        """The folders and the queue's settings."""
        return {"models_dir": str(folders.models), "data_dir": str(folders.data), "runs_dir": str(folders.runs),
                "key_required": bool(api_key), "max_running": jobs.max_running, "model": slot.name}

    @app.get(f"{PREFIX}/schema")
    async def get_schema():
        """The form's keys, grouped."""
        return form_module.schema()

    @app.get(f"{PREFIX}/models")
    async def list_models():
        """Model folders and GGUF files in the models folder."""
        return {"models": await asyncio.to_thread(folders.models_found)}

    @app.get(f"{PREFIX}/data")
    async def list_data():
        """Data files in the data folder."""
        return {"files": await asyncio.to_thread(folders.data_found)}

    @app.post(f"{PREFIX}/data")
    async def upload(request: Request, name: str = ""):
        """A data file uploaded into the data folder (the body is the file)."""
        body = await request.body()
        if not body:
            raise APIError(400, "body: empty; send the file's bytes as the body", param="body")
        path = await asyncio.to_thread(folders.save_upload, name, body)
        return JSONResponse({"name": folders.relative("data", path), "size": len(body)}, status_code=201)

    def checked(values: dict, need_output: bool = True) -> form_module.CheckedForm:
        values = dict(values)
        if not need_output and not str(values.get("output_dir") or "").strip():
            values["output_dir"] = PREVIEW_OUTPUT  # a name only: preview, audit and plan write no run
        return form_module.read_form(values, folders)

    @app.post(f"{PREFIX}/validate")
    async def validate(body: FormBody):
        """The form checked as ``chattune train`` checks it, with its YAML and command lines."""
        try:
            form = await asyncio.to_thread(checked, body.values)
        except form_module.FormError as exc:
            return {"ok": False, "errors": exc.errors}
        return {"ok": True, "yaml": form.yaml(), "command": form.command(),
                "overrides_command": form.overrides_command(), "output_dir": form.config.train.output_dir}

    @app.post(f"{PREFIX}/preview")
    async def data_preview(body: FormBody):
        """The first rows as converted, rendered with trained spans marked."""
        form = await asyncio.to_thread(checked, body.values, False)
        return await asyncio.to_thread(preview_module.preview, form.config, body.rows)

    @app.post(f"{PREFIX}/audit")
    async def data_audit(body: FormBody):
        """The data audit, as ``chattune data prepare`` prints it."""
        form = await asyncio.to_thread(checked, body.values, False)
        return await asyncio.to_thread(preview_module.audit, form.config)

    @app.post(f"{PREFIX}/plan")
    async def plan(body: FormBody):
        """The memory plan of ``chattune train --dry-run``."""
        form = await asyncio.to_thread(checked, body.values, False)
        return await asyncio.to_thread(preview_module.memory_plan, form.config)

    def run_folder(run: str | None, what: str) -> Path:
        """A run's folder to load: the run when finished, else its newest complete checkpoint."""
        if not run:
            raise APIError(400, f"run: required for {what}; give a run id of GET /ui/api/runs", param="run")
        entry = find_runs(served_dirs(), folders.runs).get(run)
        if entry is None:
            raise APIError(404, f"run: no run with id {run!r}; GET /ui/api/runs lists them", param="run",
                           code="run_not_found")
        return loadable(entry.path, what)

    def job_view(job: Job) -> dict:
        run_dir = Path(job.run_dir) if job.run_dir else None
        return {"id": job.id, "kind": job.kind, "state": job.state, "title": job.title,
                "run": run_id(run_dir) if run_dir else None, "run_name": run_dir.name if run_dir else None,
                "created": job.created, "started": job.started, "ended": job.ended, "returncode": job.returncode,
                "message": job.message, "position": jobs.position(job), "command": job.command(),
                "resumes": job.resumes}

    def job_detail(job: Job) -> dict:
        run_dir = Path(job.run_dir) if job.run_dir else None
        checkpoints = complete_checkpoints(run_dir) if run_dir else []
        log = jobs.log_tail(job)
        return {**job_view(job), "progress": progress(run_dir, job), "log": log, "outcome": outcome(job, log),
                "checkpoints": [path.name for path in checkpoints],
                "resumable": (job.kind == "train" and job.state in ("stopped", "failed") and bool(checkpoints)
                              and not (run_dir / MANIFEST_NAME).is_file())}

    @app.get(f"{PREFIX}/jobs")
    async def list_jobs():
        """Every job, newest first."""
        return {"jobs": [job_view(job) for job in jobs.listed()]}

    @app.get(f"{PREFIX}/jobs/{{job_id}}")
    async def get_job(job_id: str):
        """One job, with its progress and the tail of its log."""
        return await asyncio.to_thread(job_detail, jobs.get(job_id))

    @app.post(f"{PREFIX}/jobs")
    async def start_job(body: JobBody):
        """Queue a training (from the form), an evaluation or an export."""
        job = await asyncio.to_thread(submit, body)
        return JSONResponse(job_view(job), status_code=201)

    def submit(body: JobBody) -> Job:
        if body.kind == "train":
            if body.values is None:
                raise APIError(400, "values: required for a training (the form's key: text)", param="values")
            form = checked(body.values)
            run_dir = form.config.train.output_dir
            if any(j.run_dir == run_dir and j.state in ACTIVE for j in jobs.listed()):
                raise APIError(409, f"output_dir: a job already trains into {run_dir}", param="output_dir")
            return jobs.submit("train", f"train {Path(run_dir).name}", ["train", "{job}/config.yaml"], run_dir,
                               files={"config.yaml": form.yaml()})
        path = run_folder(body.run, body.kind)
        if body.kind == "eval":
            if not body.data:
                raise APIError(400, "data: required; a file of the data folder with prompts and answers",
                               param="data")
            data = folders.inside("data", body.data, "data")
            argv = ["eval", str(path), "--data", str(data), "--out", str(run_root(path) / "eval" / data.stem)]
            argv += ["--compare", body.compare] if body.compare else []
            argv += ["--limit", str(body.limit)] if body.limit else []
            return jobs.submit("eval", f"eval {path.name} on {data.name}", argv, str(run_root(path)))
        if not body.out:
            raise APIError(400, "out: required; a name for the exported model's new folder in the models folder",
                           param="out")
        out = folders.inside("models", body.out, "out", must_exist=False)
        if out == folders.models or out.exists():
            raise APIError(400, f"out: {body.out!r} is already in the models folder; choose a new name", param="out")
        argv = ["export", str(path), "--out", str(out)] + (["--gguf", body.gguf] if body.gguf else [])
        return jobs.submit("export", f"export {path.name} to {out.name}", argv, str(run_root(path)),
                           extra={"out": folders.relative("models", out)})

    @app.post(f"{PREFIX}/jobs/{{job_id}}/stop")
    async def stop_job(job_id: str):
        """Stop a job (a training writes a checkpoint first)."""
        try:
            return job_view(jobs.stop(job_id))
        except JobNotFound:
            raise
        except ConfigError as exc:
            raise APIError(409, str(exc), param="id", code="job_not_running") from exc

    @app.post(f"{PREFIX}/jobs/{{job_id}}/resume")
    async def resume_job(job_id: str):
        """A new job going on with a stopped training from its newest checkpoint."""
        job = jobs.get(job_id)
        detail = job_detail(job)
        if not detail["resumable"]:
            raise APIError(409, f"job {job_id}: only a stopped or failed training with a checkpoint can be resumed "
                           f"(it is a {job.kind} job, {job.state}, with {len(detail['checkpoints'])} checkpoints)",
                           param="id", code="not_resumable")
        if any(j.run_dir == job.run_dir and j.state in ACTIVE for j in jobs.listed()):
            raise APIError(409, f"a job already trains into {job.run_dir}", param="id", code="not_resumable")
        config = (jobs.job_dir(job) / "config.yaml").read_text(encoding="utf-8")
        new = jobs.submit("train", f"resume {Path(job.run_dir).name}",
                          ["train", "{job}/config.yaml", "resume_from_checkpoint=true"], job.run_dir,
                          files={"config.yaml": config}, resumes=job.id)
        return JSONResponse(job_view(new), status_code=201)

    @app.post(f"{PREFIX}/chat")
    async def chat(body: RunBody):
        """Load a run as the model the chat view and ``/v1`` answer with."""
        path = run_folder(body.run, "chat")
        warn = lambda message: print(message, file=sys.stderr)  # noqa: E731
        try:
            name = await asyncio.to_thread(slot.load, path, warn)
        except ChattuneError as exc:
            raise APIError(400, f"run: {exc}", param="run") from exc
        return {"model": name, "path": str(path)}

    return Dispatch(app, slot)


OUTCOME_STARTS = {"train": ("done:", "stopped at step", "chattune: error:"),
                  "eval": ("chattune: error:", "wrote "),
                  "export": ("exported ", "check:", "wrote ", "chattune: error:")}
"""The lines of a job's log that say what it came to (an export's parity check among them)."""


def outcome(job: Job, log: str) -> list[str]:
    """The lines of the log's tail that say what the job came to: a training's last line, an
    export's parity check, an evaluation's files; every error line."""
    starts = OUTCOME_STARTS.get(job.kind, ())
    return [line.strip() for line in log.splitlines() if line.strip().lower().startswith(starts)]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints that a resume or a load can use, newest first."""
    from chattune.training.checkpoints import checkpoint_problems, list_checkpoints

    if not run_dir.is_dir():
        return []
    return [folder for _, folder in list_checkpoints(run_dir) if not checkpoint_problems(folder)]


def loadable(path: Path, what: str) -> Path:
    """``path`` when it holds a finished run, else its newest complete checkpoint."""
    if (path / MANIFEST_NAME).is_file():
        return path
    checkpoints = complete_checkpoints(path)
    if not checkpoints:
        raise APIError(409, f"run: {path.name} has no finished model and no checkpoint yet to {what}", param="run",
                       code="run_not_ready")
    return checkpoints[0]


def run_root(path: Path) -> Path:
    """The run folder of a run or of one of its checkpoints."""
    return path.parent if path.name.startswith("checkpoint-") else path


def progress(run_dir: Path | None, job: Job) -> dict | None:
    """A training's ``progress.json`` (written by the training), with ``fraction`` done."""
    if run_dir is None or job.kind != "train":
        return None
    try:
        data = json.loads((run_dir / PROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    steps = data.get("max_steps") or 0
    data["fraction"] = round(min(data.get("step", 0) / steps, 1.0), 4) if steps else None
    return data


def build_app(folders: Folders, jobs: JobQueue, slot: ModelSlot, *, api_key: str | None = None,
              max_body_bytes: int = BODY_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The whole ASGI app: the key check, body limits (larger for uploads), then the workbench."""
    inner = create_workbench(folders, jobs, slot, api_key=api_key)
    limited = LimitBody(inner, max_body_bytes, path_limits={f"{PREFIX}/data": max_upload_bytes})
    return RequireKey(limited, api_key, open_path=ui_module.is_open_path)


def workbench_folders(args) -> tuple[Folders, JobQueue]:
    """The folders and job queue ``chattune workbench``'s options name."""
    folders = Folders.create(args.models_dir, args.data_dir, args.runs_dir)
    return folders, JobQueue(folders.runs / JOBS_FOLDER, max_running=args.max_jobs)


def run_workbench(args) -> int:
    """``chattune workbench``: serve the page with training until interrupted; running jobs are
    stopped (with their checkpoints) when the server stops."""
    import os

    import uvicorn

    from chattune.serve import API_KEY_ENV, check_address

    folders, jobs = workbench_folders(args)
    check_address(args.host, args.port)
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the workbench on {args.host} without an API key lets anyone reach it train "
              f"(--api-key or ${API_KEY_ENV})", file=sys.stderr)
    slot = ModelSlot()
    app = build_app(folders, jobs.start(), slot, api_key=key)
    print(f"chattune workbench: models {folders.models}, data {folders.data}, runs {folders.runs}; "
          f"page at http://{args.host}:{args.port}/" + (" (API key required)" if key else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        jobs.close()
        slot.close()
    return 0
