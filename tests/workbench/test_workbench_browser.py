"""The Train view of ``chattune workbench`` in a real browser: Chromium driven by Selenium, against
the real workbench (its jobs real processes) over a tiny model.

The road: the form is filled, checked (an error shows at its field), its data previewed with the
trained spans marked, audited and planned; a training is started and watched (progress, loss
curve), found again after a reload, stopped with a checkpoint, resumed to its end, evaluated
against its base, chatted with and exported (the export's parity check in its log).

Needs Chromium, chromedriver and selenium as tests/serve/test_ui_browser.py does (skipped without
them). Screenshots go to ``$CHATTUNE_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from tests.browser import find, find_all, needs_browser, screenshot_folder, start_browser, wait

pytestmark = needs_browser

TIMEOUT = 60
JOB_TIMEOUT = 240
RUN = "browser-run"
FORM = {"model_name_or_path": "tiny", "train_files": "alpaca.json", "output_dir": RUN, "max_seq_length": "128",
        "per_device_train_batch_size": "2", "max_steps": "3000", "logging_steps": "5", "save_steps": "100000",
        "report_to": "none"}
"""A training long enough to watch and stop (a step of the tiny model takes tens of milliseconds)."""


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go."""
    return screenshot_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser(900)
    yield driver
    driver.quit()








def open_train(driver, url: str, *, fresh: bool = True) -> None:
    """Load the page on the Train view (with empty browser storage when ``fresh``) and wait for its form."""
    driver.get(f"{url}/#train")
    if fresh:
        driver.execute_script("localStorage.clear()")
        driver.refresh()
    wait(driver, lambda d: find(d, "body").get_attribute("data-workbench") == "1"
         and find(d, "#view-train").is_displayed() and find_all(d, "#wb-field-model_name_or_path"))


def set_field(driver, key: str, value: str) -> None:
    """Set a form field as a user would (several files: each chosen), then fire change."""
    from selenium.webdriver.support.ui import Select

    element = find(driver, "#wb-field-" + key)
    if element.tag_name == "select":
        select = Select(element)
        if element.get_attribute("multiple"):
            select.deselect_all()
            for name in value.split(","):
                select.select_by_value(name)
        else:
            select.select_by_value(value)
    else:
        element.clear()
        element.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def fill(driver, values: dict) -> None:
    for key, value in values.items():
        set_field(driver, key, value)


def output(driver, kind: str) -> None:
    """Wait for the output area to show ``kind`` (config, preview, audit, plan)."""
    wait(driver, lambda d: find(d, "#wb-output").get_attribute("data-kind") == kind, message=f"no {kind} shown")


def field_error(driver, key: str) -> str:
    wait(driver, lambda d: find(d, f"#wb-error-{key}").is_displayed(), message=f"no error at {key}")
    return find(driver, f"#wb-error-{key}").text


def job_state(driver) -> str:
    return find(driver, "#wb-job-state").get_attribute("data-state")


def step(driver) -> int:
    return int(find(driver, "#wb-progress").get_attribute("data-step") or 0)


def points(driver) -> int:
    return int(find(driver, "#chart-loss").get_attribute("data-points"))


def wait_job(driver, title: str, states=("finished",), seconds: float = JOB_TIMEOUT) -> str:
    """Wait for the job shown to be ``title``'s and to reach one of ``states``; its log."""
    wait(driver, lambda d: find(d, "#wb-job-title").text.startswith(title), message=f"{title} not shown")
    ended = ("finished", "failed", "stopped")
    wait(driver, lambda d: job_state(d) in ended, seconds, message=f"{title} did not end")
    log = find(driver, "#wb-log").get_attribute("textContent")
    assert job_state(driver) in states, log[-2000:]
    return log


def test_the_form_is_checked_at_its_fields_and_previews_audits_and_plans(browser, bench, tmp_path, shots):
    open_train(browser, bench.url)
    assert find(browser, "#tabs button[data-view=train]").is_displayed()
    opened = {g.get_attribute("data-group"): g.get_attribute("open") is not None for g in find_all(browser, "#wb-groups details")}
    assert opened == {"model": True, "data": True, "method": True, "train": True, "generate": False,
                      "preference": False, "rl": False}
    assert [o.get_attribute("value") for o in find_all(browser, "#wb-field-model_name_or_path option")] == ["", "tiny"]
    assert find(browser, "#wb-field-train_files").get_attribute("multiple") is not None
    assert find(browser, "#wb-field-lora_rank").get_attribute("value") == "8"  # prefilled with the default

    find(browser, "#wb-validate").click()  # nothing chosen: the required fields say so
    assert "required" in field_error(browser, "model_name_or_path")
    assert "required" in field_error(browser, "output_dir")

    fill(browser, {**FORM, "lora_rank": "0"})
    find(browser, "#wb-validate").click()
    assert "lora_rank" in field_error(browser, "lora_rank")
    assert "invalid" in find(browser, ".wb-field[data-key=lora_rank]").get_attribute("class")
    assert not find(browser, "#wb-error-model_name_or_path").is_displayed()  # fixed, so no longer shown
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", find(browser, "#wb-field-lora_rank"))
    browser.save_screenshot(str(shots / "workbench-form.png"))

    set_field(browser, "lora_rank", "4")
    assert not find(browser, "#wb-error-lora_rank").is_displayed()  # a change clears its error
    set_field(browser, "method", "full")  # LoRA's keys are for LoRA only
    assert not find(browser, ".wb-field[data-key=lora_rank]").is_displayed()
    set_field(browser, "method", "lora")
    assert find(browser, ".wb-field[data-key=lora_rank]").is_displayed()
    find(browser, "#wb-validate").click()
    output(browser, "config")
    assert not find_all(browser, ".wb-field.invalid")
    yaml = find(browser, "#wb-yaml").text
    assert "lora_rank: 4" in yaml and f"{bench.folders.runs / RUN}" in yaml and "max_steps: 3000" in yaml
    assert "lora_dropout" not in yaml  # only what differs from the defaults
    assert find(browser, "#wb-command").text == "chattune train config.yaml"
    assert "lora_rank=4" in find(browser, "#wb-overrides-command").text

    find(browser, "#wb-preview").click()
    output(browser, "preview")
    marks = [m.text for m in find_all(browser, "#wb-output .wb-row mark")]
    rows = json.loads((bench.folders.data / "alpaca.json").read_text())
    assert len(find_all(browser, "#wb-output .wb-row")) == 3
    assert any(rows[0]["output"] in m for m in marks), marks  # the answer is trained, marked
    assert "read 40 · kept 40" in find(browser, "#wb-preview-read").text
    browser.save_screenshot(str(shots / "workbench-preview.png"))

    # a data file with HTML in it, uploaded from the page: previewed as text, never run
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps([{"instruction": "<img src=x onerror=\"window.pwned=1\"> hi",
                                    "input": "", "output": "<script>window.pwned=2</script><b>bold</b>"}] * 3))
    find(browser, "#wb-upload").send_keys(str(hostile))
    wait(browser, lambda d: [o.get_attribute("value") for o in find_all(d, "#wb-field-train_files option:checked")]
         == ["alpaca.json", "hostile.json"], message="the upload was not chosen")
    assert (bench.folders.data / "hostile.json").read_bytes() == hostile.read_bytes()
    set_field(browser, "train_files", "hostile.json")
    find(browser, "#wb-preview").click()
    wait(browser, lambda d: "<b>bold</b>" in find(d, "#wb-output .wb-row mark").text)
    assert not find_all(browser, "#wb-output img, #wb-output script, #wb-output b")
    assert browser.execute_script("return window.pwned") is None
    set_field(browser, "train_files", "alpaca.json")

    set_field(browser, "max_seq_length", "zero")  # the audit's 400 names its field
    find(browser, "#wb-audit").click()
    assert "max_seq_length" in field_error(browser, "max_seq_length")
    set_field(browser, "max_seq_length", FORM["max_seq_length"])
    find(browser, "#wb-audit").click()
    output(browser, "audit")
    assert "supervised" in find(browser, "#wb-audit-text").text
    find(browser, "#wb-plan").click()
    output(browser, "plan")
    plan = find(browser, "#wb-plan-text").text
    assert "trainable" in plan and "total" in plan


def test_a_training_is_watched_stopped_resumed_evaluated_chatted_with_and_exported(browser, bench, shots):
    from selenium.webdriver.support.ui import Select

    open_train(browser, bench.url)
    fill(browser, FORM)
    find(browser, "#wb-start").click()
    wait(browser, lambda d: find(d, "#wb-job").is_displayed() and find(d, "#wb-job-title").text == f"train {RUN}")
    job_id = find(browser, "#wb-job").get_attribute("data-id")
    assert find(browser, f".wb-job-row[data-id='{job_id}']").get_attribute("class").endswith("selected")
    wait(browser, lambda d: step(d) >= 10 and points(d) >= 2, message="no progress or loss curve")
    assert job_state(browser) == "running" and find(browser, "#wb-progress .text").text.startswith("step ")
    assert find(browser, "#wb-progress").get_attribute("data-max-steps") == "3000"
    first = points(browser)
    wait(browser, lambda d: points(d) >= first + 2, message="the loss curve did not grow")
    assert "ETA" in find(browser, "#wb-progress .text").text
    assert find(browser, "#wb-stop").is_displayed() and not find(browser, "#wb-resume").is_displayed()
    assert not find(browser, "#wb-run-actions").is_displayed()
    browser.execute_script("document.querySelector('.wb-left').scrollTop = 0;"
                           "document.getElementById('wb-job').scrollIntoView({block: 'start'})")
    browser.save_screenshot(str(shots / "workbench-training.png"))

    browser.refresh()  # the job lives on the server: the page finds it again, still running
    wait(browser, lambda d: find(d, "#wb-job").get_attribute("data-id") == job_id and job_state(d) == "running")
    before = step(browser)
    wait(browser, lambda d: step(d) > before and points(d) > 0, message="no progress after the reload")

    find(browser, "#wb-stop").click()
    log = wait_job(browser, f"train {RUN}", states=("stopped",), seconds=TIMEOUT)
    stopped = re.search(r"stopped at step (\d+): checkpoint-(\d+)", log)
    assert stopped and stopped.group(1) == stopped.group(2), log[-1500:]
    at = int(stopped.group(1))
    assert 10 <= at < 3000 and step(browser) == at
    assert f"stopped at step {at}: checkpoint-{at}" in find(browser, "#wb-outcome").text
    wait(browser, lambda d: find(d, "#wb-resume").is_displayed())
    assert not find(browser, "#wb-stop").is_displayed()

    # resume to a near end: the job's own config asks for 10 steps more than the checkpoint's
    config = bench.jobs.job_dir(bench.jobs.get(job_id)) / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 3000", f"max_steps: {at + 10}"))
    find(browser, "#wb-resume").click()
    log = wait_job(browser, f"resume {RUN}")
    assert f"resuming from checkpoint-{at}" in log and step(browser) == at + 10
    assert not find(browser, "#wb-resume").is_displayed()
    wait(browser, lambda d: find(d, "#wb-run-actions").is_displayed())

    Select(find(browser, "#wb-eval-data")).select_by_value("alpaca.json")
    find(browser, "#wb-eval-limit").send_keys("4")
    assert find(browser, "#wb-eval-compare").is_selected()
    find(browser, "#wb-eval").click()
    wait_job(browser, f"eval {RUN}")
    wait(browser, lambda d: "alpaca" in find(d, "#run-evals").text, message="the evaluation is not shown")
    head = [th.text for th in find_all(browser, "#run-evals tr th")]
    assert head == ["metric", "base", "value", "better / worse / same"]
    assert "eval_loss" in find(browser, "#run-evals").text
    assert find(browser, "#run-title").text == RUN and points(browser) > 0
    browser.execute_script("document.getElementById('run-evals').scrollIntoView({block: 'center'})")
    browser.save_screenshot(str(shots / "workbench-after.png"))
    # the run's details are the runs view's own: shown there on its tab, back in the job panel after
    find(browser, "#tabs button[data-view=runs]").click()
    wait(browser, lambda d: find(d, "#view-runs #run-detail").is_displayed() and find(d, "#run-title").text == RUN)
    assert [r.text.split(" ")[0] for r in find_all(browser, "#runs-table tbody tr")] == [RUN]
    find(browser, "#tabs button[data-view=train]").click()
    wait(browser, lambda d: find(d, "#wb-run-slot #run-detail").is_displayed() and points(d) > 0)

    # Chat: the resumed training's run becomes the chat view's model
    find(browser, ".wb-job-row[data-kind=train]").click()  # the newest training: the resumed one
    wait(browser, lambda d: find(d, "#wb-run-actions").is_displayed())
    find(browser, "#wb-chat").click()
    wait(browser, lambda d: find(d, "#view-chat").is_displayed() and find(d, "#chat-model").get_attribute("value"))
    model = find(browser, "#chat-model").get_attribute("value")
    assert model == bench.slot.name
    browser.execute_script("document.getElementById('temperature').value = 0;"
                           "document.getElementById('max-tokens').value = 8;")
    find(browser, "#chat-input").send_keys("What is 2 plus 2?")
    find(browser, "#send").click()
    wait(browser, lambda d: find_all(d, ".msg.assistant.done"))
    shown = find(browser, ".msg.assistant").get_attribute("data-raw")
    client = openai.OpenAI(base_url=f"{bench.url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 plus 2?"}],
                                           temperature=0, max_tokens=8)
    assert shown == reply.choices[0].message.content and not find_all(browser, ".msg .error")

    # Export: a merged model folder in the models folder, checked against the run
    find(browser, "#tabs button[data-view=train]").click()
    wait(browser, lambda d: find(d, "#wb-run-actions").is_displayed())
    out = find(browser, "#wb-export-out")
    out.clear()
    out.send_keys("browser-export")
    find(browser, "#wb-export").click()
    log = wait_job(browser, f"export {RUN}")
    assert "check:" in log and "identical" in log, log[-2000:]
    check = [li.text for li in find_all(browser, "#wb-outcome li") if li.text.startswith("check:")]
    assert len(check) == 1 and "identical" in check[0]
    assert (bench.folders.models / "browser-export" / "config.json").is_file()
    wait(browser, lambda d: "browser-export" in [o.get_attribute("value")
                                                 for o in find_all(d, "#wb-field-model_name_or_path option")])
    states = [r.get_attribute("data-state") for r in find_all(browser, ".wb-job-row")]
    assert states == ["finished", "finished", "finished", "stopped"]  # export, eval, resume, train


def test_with_a_key_the_page_asks_for_it_and_a_plain_server_has_no_train_view(browser, tmp_path_factory,
                                                                               tiny_models):
    from chattune.inference.runs import load_run
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine
    from tests.serve.server_thread import ServerThread
    from tests.workbench.conftest import start_bench

    keyed, thread = start_bench(tmp_path_factory.mktemp("keyed-workbench"), tiny_models("llama"), key="wb-key")
    try:
        browser.get(f"{keyed.url}/#train")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait(browser, lambda d: find(d, "#key-dialog").get_attribute("open") is not None)
        assert not find(browser, "#tabs button[data-view=train]").is_displayed()
        find(browser, "#key-input").send_keys("wb-key")
        find(browser, "#key-submit").click()
        wait(browser, lambda d: find(d, "body").get_attribute("data-workbench") == "1"
             and find(d, "#view-train").is_displayed() and find_all(d, "#wb-field-model_name_or_path"))
        assert find(browser, "#tabs button[data-view=train]").is_displayed()
        wait(browser, lambda d: find(d, "#wb-jobs").text == "No jobs yet.")
        assert "tiny" in [o.get_attribute("value") for o in find_all(browser, "#wb-field-model_name_or_path option")]
    finally:
        thread.stop()
        keyed.jobs.close(wait=30)
        keyed.slot.close()

    served = load_run(str(tiny_models("llama")))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id)
    engine.start()
    plain = ServerThread(create_app(served, engine)).start()
    try:
        browser.get(f"{plain.url}/#train")
        browser.refresh()
        wait(browser, lambda d: find(d, "body").get_attribute("data-workbench") == "0")
        assert not find(browser, "#tabs button[data-view=train]").is_displayed()
        assert find(browser, "#view-chat").is_displayed() and not find(browser, "#view-train").is_displayed()
    finally:
        plain.stop()
        engine.stop()
