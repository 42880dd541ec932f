"""``chattune workbench``: the web page as a training workbench (LlamaBoard's role).

The server of ``chattune serve``'s page, without a model loaded up front, plus routes that
start, watch, stop and resume trainings, evaluations and exports as separate processes
(:mod:`chattune.workbench.jobs`), inside three configured folders
(:mod:`chattune.workbench.folders`): models (``--models-dir``: model folders and GGUF files),
data (``--data-dir``) and runs (``--runs-dir``: every run the page starts is written there).

Routes (JSON; with an API key every one needs it, the page's files do not):

- ``GET /ui/api/workbench``: the folders, whether a key is required, how many jobs run at once.
- ``GET /ui/api/workbench/schema``: the form (:func:`chattune.workbench.form.schema`): groups of
  keys, each with its type, choices, default, help text, the methods it belongs to and the
  folder a path key is picked from.
- ``GET /ui/api/workbench/models`` and ``GET /ui/api/workbench/data``: what the folders hold
  (names relative to the folder); ``POST /ui/api/workbench/data?name=FILE``: upload a data file
  (the body is the file), never over an existing one.
- ``POST /ui/api/workbench/validate`` ``{"values": {key: text}}``: the form checked by the code
  of ``chattune train`` (values are read as ``key=value`` on its command line are):
  ``{"ok": true, "yaml", "command", "output_dir"}`` or ``{"ok": false, "errors": [{"key", "message"}]}``.
- ``POST /ui/api/workbench/preview`` / ``audit`` / ``plan`` ``{"values"}``: the first rows as
  converted with the template's rendering and trained spans marked; the data audit; the memory
  plan (``--dry-run``). An invalid form is a 400 naming the key.
- ``GET /ui/api/workbench/jobs``; ``POST /ui/api/workbench/jobs`` ``{"kind": "train", "values"}``,
  ``{"kind": "eval", "run", "data", "compare"}`` or ``{"kind": "export", "run", "out", "gguf"}``
  (201, the job); ``GET /ui/api/workbench/jobs/{id}`` (with progress and the log's tail);
  ``POST .../jobs/{id}/stop``; ``POST .../jobs/{id}/resume`` (a new job going on from the
  newest checkpoint).
- ``POST /ui/api/workbench/chat`` ``{"run"}``: load that run (a run id of ``/ui/api/runs``) as
  the model the chat and ``/v1`` routes answer with, replacing the one loaded before.
"""
