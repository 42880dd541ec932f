"""The workbench's routes over HTTP, the whole road on a tiny model: form, preview, audit, plan, a
training started, watched, stopped with a checkpoint and resumed, then evaluated against its
base, chatted with and exported, each job a process of its own."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.workbench.conftest import start_bench

API = "/ui/api/workbench"
FORM = {"model_name_or_path": "tiny", "train_files": "alpaca.json", "max_seq_length": "64",
        "per_device_train_batch_size": "2", "logging_steps": "5", "save_steps": "100000"}


def post(bench, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(bench.url + API + path, json=body, timeout=120, **kw)


def get(bench, path: str, **kw) -> httpx.Response:
    return httpx.get(bench.url + API + path, timeout=60, **kw)


def wait_job(bench, job_id: str, done, seconds: float = 240.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job = get(bench, f"/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never got there: {job['state']}\n{job['log'][-2000:]}")


def test_the_page_learns_its_folders_and_form(bench):
    about = get(bench, "").json()
    assert about["runs_dir"] == str(bench.folders.runs) and about["max_running"] == 1 and not about["key_required"]
    assert get(bench, "/models").json() == {"models": [{"name": "tiny", "kind": "folder"}]}
    assert [f["name"] for f in get(bench, "/data").json()["files"]] == ["alpaca.json"]
    groups = get(bench, "/schema").json()["groups"]
    assert groups[0]["keys"][0]["key"] == "model_name_or_path"


def test_uploads_go_into_the_data_folder_once(bench):
    body = b'[{"instruction": "hi", "input": "", "output": "hello"}]'
    made = httpx.post(bench.url + API + "/data", params={"name": "up.json"}, content=body)
    assert made.status_code == 201 and made.json() == {"name": "up.json", "size": len(body)}
    assert (bench.folders.data / "up.json").read_bytes() == body
    again = httpx.post(bench.url + API + "/data", params={"name": "up.json"}, content=b"[]")
    assert again.status_code == 400 and again.json()["error"]["param"] == "name"
    out = httpx.post(bench.url + API + "/data", params={"name": "../up.json"}, content=b"[]")
    assert out.status_code == 400 and "plain file name" in out.json()["error"]["message"]
    big = post(bench, "/validate", {"values": {"x": "y" * (2 << 20)}})
    assert big.status_code == 413  # the upload route alone takes large bodies


def test_validate_names_the_field_and_gives_the_yaml_and_commands(bench):
    bad = post(bench, "/validate", {"values": {**FORM, "output_dir": "v", "lora_rank": "0"}}).json()
    assert bad == {"ok": False, "errors": [{"key": "lora_rank", "message": "lora_rank: must be >= 1"}]}
    good = post(bench, "/validate", {"values": {**FORM, "output_dir": "v"}}).json()
    assert good["ok"] and good["command"] == "chattune train config.yaml"
    assert f"output_dir: {bench.folders.runs / 'v'}" in good["yaml"]
    assert "max_seq_length=64" in good["overrides_command"]


@pytest.mark.parametrize(("body", "param"), [
    ({"kind": "fly"}, "kind"),
    ({"kind": "train", "valuez": {}}, "valuez"),
    ({"kind": "train"}, "values"),
    ({"kind": "train", "values": {**FORM, "output_dir": "x", "lora_rank": "-1"}}, "lora_rank"),
    ({"kind": "train", "values": {**FORM, "output_dir": "/tmp/elsewhere"}}, "output_dir"),
    ({"kind": "eval", "run": "nope", "data": "alpaca.json"}, "run"),
    ({"kind": "export", "run": None}, "run"),
    ({"kind": "export", "run": "x", "gguf": "q2"}, "gguf"),
    ({"kind": "eval", "run": "x", "limit": 0}, "limit"),
])
def test_a_malformed_job_request_is_a_400_naming_the_field(bench, body, param):
    answer = post(bench, "/jobs", body)
    assert answer.status_code in (400, 404), answer.text
    assert answer.json()["error"]["param"] == param


def test_preview_audit_and_plan_before_training(bench):
    values = {**FORM}  # no run name yet: these need none
    shown = post(bench, "/preview", {"values": values, "rows": 2}).json()
    assert shown["shown"] == 2 and shown["read"] == {**shown["read"], "rows": 40, "kept": 40}
    assert shown["rows"][0]["messages"][0] == {"role": "user", "content": "What is 0 plus 0?"}
    assert "⟪0 plus 0 is 0." in shown["rows"][0]["rendering"]  # the answer is trained, the prompt is not
    assert "⟪" not in shown["rows"][0]["rendering"].split("What is 0 plus 0?")[0]
    audit = post(bench, "/audit", {"values": values}).json()
    assert audit["audit"]["train"]["rows_in"] == 40 and "supervised" in audit["text"]
    plan = post(bench, "/plan", {"values": values}).json()
    assert "trainable" in plan["text"] and "total" in plan["text"]
    bad = post(bench, "/audit", {"values": {**values, "max_seq_length": "zero"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_seq_length"


def test_the_whole_road_train_stop_resume_evaluate_chat_export(bench):
    assert httpx.get(bench.url + "/v1/models").status_code == 503  # nothing loaded yet
    made = post(bench, "/jobs", {"kind": "train", "values": {**FORM, "output_dir": "road", "max_steps": "2000"}})
    assert made.status_code == 201, made.text
    job = made.json()
    running = wait_job(bench, job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 10)
    assert running["state"] == "running" and running["progress"]["max_steps"] == 2000
    assert running["progress"]["eta_seconds"] > 0 and 0 < running["progress"]["fraction"] < 1
    twice = post(bench, "/jobs", {"kind": "train", "values": {**FORM, "output_dir": "road"}})
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "output_dir"
    metrics = httpx.get(f"{bench.url}/ui/api/runs/{job['run']}/metrics").json()
    assert metrics["rows"] and "loss" in metrics["rows"][0]

    assert post(bench, f"/jobs/{job['id']}/stop", {}).json()["state"] == "stopping"
    stopped = wait_job(bench, job["id"], lambda j: j["state"] not in ("running", "stopping"))
    step = stopped["progress"]["step"]
    assert stopped["state"] == "stopped" and stopped["resumable"], stopped["log"][-1500:]
    assert stopped["checkpoints"] == [f"checkpoint-{step}"]
    assert f"stopped at step {step}: checkpoint-{step} written" in stopped["log"]
    assert not (bench.folders.runs / "road" / "chattune.json").exists()  # not a finished run
    assert post(bench, f"/jobs/{job['id']}/stop", {}).status_code == 409

    # a shorter run to the end: resume goes on from the checkpoint to max_steps
    config = bench.jobs.job_dir(bench.jobs.get(job["id"])) / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 2000", f"max_steps: {step + 10}"))
    resumed = post(bench, f"/jobs/{job['id']}/resume", {})
    assert resumed.status_code == 201 and resumed.json()["resumes"] == job["id"]
    finished = wait_job(bench, resumed.json()["id"], lambda j: j["state"] not in ("queued", "running"))
    assert finished["state"] == "finished", finished["log"][-2000:]
    assert f"resuming from checkpoint-{step}" in finished["log"]
    assert finished["progress"]["step"] == step + 10
    assert (bench.folders.runs / "road" / "chattune.json").is_file()
    assert post(bench, f"/jobs/{job['id']}/resume", {}).status_code == 409  # finished now

    evaluated = post(bench, "/jobs", {"kind": "eval", "run": job["run"], "data": "alpaca.json", "compare": "base",
                                      "limit": 4})
    assert evaluated.status_code == 201, evaluated.text
    done = wait_job(bench, evaluated.json()["id"], lambda j: j["state"] not in ("queued", "running"))
    assert done["state"] == "finished", done["log"][-2000:]
    detail = httpx.get(f"{bench.url}/ui/api/runs/{job['run']}").json()
    assert detail["evaluations"][0]["name"] == "alpaca" and detail["evaluations"][0]["compare"]["name"] == "base"

    loaded = post(bench, "/chat", {"run": job["run"]})
    assert loaded.status_code == 200 and loaded.json()["model"] == "road"
    client = openai.OpenAI(base_url=bench.url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="road", messages=[{"role": "user", "content": "What is 3 plus 3?"}],
                                            max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1
    assert [run["name"] for run in httpx.get(bench.url + "/ui/api/runs").json()["runs"]] == ["road"]

    exported = post(bench, "/jobs", {"kind": "export", "run": job["run"], "out": "road-merged"})
    assert exported.status_code == 201
    out = wait_job(bench, exported.json()["id"], lambda j: j["state"] not in ("queued", "running"))
    assert out["state"] == "finished", out["log"][-2000:]
    assert "check: float32: max |logit difference|" in out["log"]
    assert out["outcome"][0].startswith("exported ") and out["outcome"][1].startswith("check: float32")
    assert {"name": "road-merged", "kind": "folder"} in get(bench, "/models").json()["models"]
    again = post(bench, "/jobs", {"kind": "export", "run": job["run"], "out": "road-merged"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "out"


def test_with_a_key_the_page_is_open_and_every_route_needs_the_key(tmp_path, tiny_models):
    bench, server = start_bench(tmp_path, tiny_models("llama"), key="sk-bench")
    try:
        assert httpx.get(bench.url + "/").status_code == 200
        assert get(bench, "").status_code == 401
        assert post(bench, "/jobs", {"kind": "train", "values": FORM}).status_code == 401
        assert httpx.post(bench.url + API + "/data", params={"name": "x.json"}, content=b"[]").status_code == 401
        keyed = get(bench, "", headers={"Authorization": "Bearer sk-bench"}).json()
        assert keyed["key_required"] is True
        assert not (bench.folders.data / "x.json").exists()
    finally:
        server.stop()
        bench.jobs.close()
