"""The web page in a real browser: Chromium driven by Selenium, against the real server.

Needs Chromium and its driver (Debian: ``apt-get install -y chromium chromium-driver``; CI's
``.ci/run`` installs them) and the ``selenium`` package (the ``test`` extra); without them the
tests skip, saying so. Screenshots go to ``$CHATTUNE_SCREENSHOTS`` (default: the test's
temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from chattune.serve.app import create_app
from tests.browser import find, find_all, needs_browser, screenshot_folder, start_browser, wait
from tests.serve.helpers import KEY
from tests.serve.server_thread import ServerThread

pytestmark = needs_browser

TIMEOUT = 60


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go."""
    return screenshot_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser-runs")


@pytest.fixture(scope="module")
def urls(server, runs_dir):
    """(open, keyed) servers with the page over the session's runs, listing ``runs_dir`` too."""
    open_server = ServerThread(create_app(server.served, server.engine, runs_dir=str(runs_dir))).start()
    keyed = ServerThread(create_app(server.served, server.engine, api_key=KEY)).start()
    yield open_server.url, keyed.url
    open_server.stop()
    keyed.stop()


@pytest.fixture(scope="module")
def browser():
    driver = start_browser(860)
    yield driver
    driver.quit()








def open_page(driver, url: str, *, fresh: bool = True, view: str = "chat"):
    """Load the page (with empty browser storage when ``fresh``) and wait for its models."""
    driver.get(f"{url}/#{view}")
    if fresh:
        driver.execute_script("localStorage.clear()")
        driver.refresh()  # a new page: nothing left in memory or storage from an earlier test
    wait(driver, lambda d: d.find_element("css selector", "body").get_attribute("data-ready") == "1"
         or d.find_element("css selector", "#key-dialog").get_attribute("open") is not None)


def set_value(driver, css: str, value) -> None:
    """Set a field as a user would, then fire change (the page saves settings on change)."""
    element = find(driver, css)
    if element.tag_name == "select":
        from selenium.webdriver.support.ui import Select

        Select(element).select_by_value(str(value))
    else:
        element.clear()
        element.send_keys(str(value))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def greedy(driver, max_tokens: int = 32) -> None:
    set_value(driver, "#temperature", 0)
    set_value(driver, "#max-tokens", max_tokens)


def send(driver, text: str) -> None:
    before = len(find_all(driver, ".msg.assistant.done"))
    find(driver, "#chat-input").send_keys(text)
    find(driver, "#send").click()
    wait(driver, lambda d: len(find_all(d, ".msg.assistant.done")) == before + 1, message="the answer never ended")


def messages(driver) -> list[tuple[str, str]]:
    """(role, raw text) of each message shown."""
    return [("user" if "user" in m.get_attribute("class") else "assistant", m.get_attribute("data-raw"))
            for m in find_all(driver, ".msg")]


def api_answer(url: str, model: str, conversation: list[dict], max_tokens: int = 32, **kw) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=conversation, temperature=0,
                                           max_tokens=max_tokens, **kw)
    return reply.choices[0].message.content


def test_chat_streams_the_answer_and_ends_with_the_apis_answer(browser, urls, shots, slow_steps):
    url = urls[0]
    open_page(browser, url)
    greedy(browser, 40)
    set_value(browser, "#chat-model", "base")
    # record every length the streaming answer shows, in the page itself
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const m = document.querySelector('.msg.assistant.streaming');
          if (m) window.lengths.push(m.dataset.raw.length);
        }).observe(document.getElementById('messages'), {subtree: true, attributes: true, childList: true});
    """)
    send(browser, "Who are you?")
    shown = messages(browser)
    expected = api_answer(url, "base", [{"role": "user", "content": "Who are you?"}], 40)
    assert shown == [("user", "Who are you?"), ("assistant", expected)]
    lengths = sorted(set(browser.execute_script("return window.lengths")))
    assert len(lengths) >= 5 and lengths[-1] == len(expected), lengths  # it grew token by token
    assert find(browser, ".msg.assistant .who").text.startswith("base")
    browser.save_screenshot(str(shots / "chat.png"))


def test_switching_models_multi_turn_and_a_system_prompt(browser, urls):
    url = urls[0]
    open_page(browser, url)
    greedy(browser)
    set_value(browser, "#chat-model", "b")
    set_value(browser, "#system-prompt", "Answer briefly.")
    send(browser, "Who are you?")
    set_value(browser, "#chat-model", "a")
    send(browser, "你好")
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who are you?"}]
    first = api_answer(url, "b", history)
    second = api_answer(url, "a", history + [{"role": "assistant", "content": first},
                                             {"role": "user", "content": "你好"}])
    assert messages(browser) == [("user", "Who are you?"), ("assistant", first), ("user", "你好"),
                                 ("assistant", second)]
    assert [w.text.split("\n")[0] for w in find_all(browser, ".msg.assistant .who")] == ["b", "a"]


def test_the_conversation_survives_a_reload_and_regenerate_and_clear_work(browser, urls):
    url = urls[0]
    open_page(browser, url)
    greedy(browser)
    set_value(browser, "#chat-model", "b")
    send(browser, "Hello")
    before = messages(browser)
    browser.refresh()
    wait(browser, lambda d: len(find_all(d, ".msg")) == 2)
    assert messages(browser) == before
    assert find(browser, "#chat-model").get_attribute("value") == "b"
    assert find(browser, "#temperature").get_attribute("value") == "0"
    find(browser, "#regenerate").click()  # greedy: the same answer again, in place of the old one
    wait(browser, lambda d: len(find_all(d, ".msg.assistant.done")) == 1 and not find_all(d, ".streaming"))
    assert messages(browser) == before
    find(browser, "#clear").click()
    assert messages(browser) == []
    browser.refresh()
    wait(browser, lambda d: find_all(d, ".empty"))
    assert messages(browser) == []


def test_copy_puts_the_answer_on_the_clipboard(browser, urls):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, urls[0])
    greedy(browser)
    set_value(browser, "#chat-model", "b")
    send(browser, "Hello")
    answer = messages(browser)[-1][1]
    copy = find(browser, ".msg.assistant .copy")
    browser.execute_script("arguments[0].click()", copy)  # shown on hover only
    wait(browser, lambda d: copy.get_attribute("textContent") == "Copied")
    box = find(browser, "#chat-input")
    box.click()
    box.send_keys(Keys.CONTROL, "v")
    assert box.get_attribute("value") == answer


def test_stop_strings_are_sent(browser, urls):
    url = urls[0]
    open_page(browser, url)
    greedy(browser)
    set_value(browser, "#chat-model", "b")
    set_value(browser, "#stop", "boop")
    send(browser, "Hello")
    expected = api_answer(url, "b", [{"role": "user", "content": "Hello"}], stop=["boop"])
    assert messages(browser)[-1] == ("assistant", expected)
    assert "boop" not in expected


def test_answers_render_markdown_and_never_the_models_html(browser, urls):
    open_page(browser, urls[0])
    html = browser.execute_script("return Markdown.render(arguments[0])",
                                  "# Title\nSome **bold** and `code` and *it*.\n\n```python\nprint('<b>')\n```\n"
                                  "- one\n- two\n\n<img src=x onerror=alert(1)> [link](https://example.com)")
    flat = html.replace("\n", "")
    assert "<h3>Title</h3>" in flat
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<em>it</em>" in html
    assert '<pre data-lang="python"><code>print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in flat
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer">link</a>' in html
    more = browser.execute_script("return Markdown.render(arguments[0])",
                                  "| a | b |\n|---|---|\n| 1 | 2 |\n\n- outer\n  - inner\n\n"
                                  "[bad](javascript:alert(1)) ![pic](https://example.com/x.png)").replace("\n", "")
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr>" in more
    assert "<li>outer<ul><li>inner</li></ul></li>" in more
    assert "[bad](javascript:alert(1))" in more and 'href="javascript' not in more  # text, not a link
    assert "<img" not in more and '!<a href="https://example.com/x.png"' in more  # never loaded: a link to click
    violations = [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert violations == []


def test_side_by_side_sends_one_prompt_to_two_models(browser, urls, shots):
    url = urls[0]
    open_page(browser, url, view="compare")
    set_value(browser, "#compare-left", "base")
    set_value(browser, "#compare-right", "b")
    browser.execute_script("document.getElementById('temperature').value = 0;"
                           "document.getElementById('max-tokens').value = 24;")
    find(browser, "#compare-input").send_keys("Who are you?")
    find(browser, "#compare-send").click()
    wait(browser, lambda d: len(find_all(d, ".answer.done")) == 2)
    ask = [{"role": "user", "content": "Who are you?"}]
    left = find(browser, "#compare-left-out").get_attribute("data-raw")
    right = find(browser, "#compare-right-out").get_attribute("data-raw")
    assert (left, right) == (api_answer(url, "base", ask, 24), api_answer(url, "b", ask, 24))
    assert left != right
    browser.save_screenshot(str(shots / "compare.png"))


def test_chinese_and_english(browser, urls):
    open_page(browser, urls[0])
    assert find(browser, "#tabs button[data-view=chat]").text == "Chat"
    find(browser, "#lang-button").click()
    assert find(browser, "#tabs button[data-view=chat]").text == "对话"
    assert find(browser, "#send").text == "发送"
    browser.refresh()
    wait(browser, lambda d: find(d, "#tabs button[data-view=chat]").text == "对话")
    find(browser, "#lang-button").click()
    assert find(browser, "#send").text == "Send"


def test_the_api_key_is_asked_for_and_a_wrong_one_is_refused(browser, urls):
    keyed = urls[1]
    open_page(browser, keyed)
    dialog = find(browser, "#key-dialog")
    assert dialog.get_attribute("open") is not None
    find(browser, "#key-input").send_keys("wrong-key")
    find(browser, "#key-submit").click()
    wait(browser, lambda d: find(d, "#key-message").is_displayed())
    assert "401" in find(browser, "#key-message").text
    find(browser, "#key-input").send_keys(KEY)
    find(browser, "#key-submit").click()
    wait(browser, lambda d: find(d, "body").get_attribute("data-ready") == "1")
    assert find(browser, "#chat-model").get_attribute("value")
    assert browser.execute_script("return localStorage.getItem('chattune.key')") is None  # not remembered
    browser.refresh()
    wait(browser, lambda d: find(d, "#key-dialog").get_attribute("open") is not None)
    find(browser, "#key-input").send_keys(KEY)
    find(browser, "#key-remember").click()
    find(browser, "#key-submit").click()
    wait(browser, lambda d: find(d, "body").get_attribute("data-ready") == "1")
    browser.refresh()  # remembered: no question this time
    wait(browser, lambda d: find(d, "body").get_attribute("data-ready") == "1")
    assert find(browser, "#key-dialog").get_attribute("open") is None
    browser.execute_script("localStorage.clear()")


def _train_in_background(base: Path, data: Path, out: Path) -> subprocess.Popen:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model_name_or_path": str(base), "train_files": [str(data)], "output_dir": str(out),
        "max_seq_length": 64, "lora_rank": 4, "per_device_train_batch_size": 2, "max_steps": 5000,
        "logging_steps": 1, "save_steps": 5000, "report_to": ["none"], "cache_dir": str(out.parent / "cache"),
        "eval_fraction": 0.0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "chattune.cli", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_runs_shows_the_curve_of_a_training_while_it_grows(browser, urls, server, runs_dir, tiny_models,
                                                          data_file, shots):
    url = urls[0]
    out = runs_dir / "live-run"
    training = _train_in_background(tiny_models("glm4"), data_file, out)
    try:
        metrics = out / "metrics.jsonl"
        end = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert training.poll() is None, training.stderr.read().decode()[-2000:]
            assert time.monotonic() < end, "the training wrote no metrics"
            time.sleep(0.2)
        open_page(browser, url, view="runs")
        wait(browser, lambda d: any(r.text.startswith("live-run") for r in find_all(d, "#runs-table tbody tr")))
        row = next(r for r in find_all(browser, "#runs-table tbody tr") if r.text.startswith("live-run"))
        assert "training" in row.text
        row.click()
        wait(browser, lambda d: int(find(d, "#chart-loss").get_attribute("data-points")) >= 2)
        first = int(find(browser, "#chart-loss").get_attribute("data-points"))
        wait(browser, lambda d: int(find(d, "#chart-loss").get_attribute("data-points")) >= first + 3,
             message="the curve did not grow")
        assert training.poll() is None  # still training while the page showed it growing
        assert "updating while training writes" in find(browser, "#curve-status").text
        assert find(browser, "#chart-lr").get_attribute("data-series") == "learning_rate"
        browser.save_screenshot(str(shots / "runs-live.png"))
    finally:
        training.kill()
        training.wait()


def test_runs_shows_a_served_runs_summary_audit_and_curves(browser, urls, server, runs_dir, shots):
    evaluated = runs_dir / "evaluated"
    shutil.copytree(server.runs["b"], evaluated, ignore=shutil.ignore_patterns("checkpoint-*"))
    (evaluated / "eval" / "dev").mkdir(parents=True)
    (evaluated / "eval" / "dev" / "eval.json").write_text(json.dumps({
        "metrics": {"rouge-l": 87.5, "eval_loss": 0.25},
        "compare": {"name": "base", "metrics": {"rouge-l": 3.25, "eval_loss": 7.5}, "better": {"rouge-l": 7},
                    "worse": {"rouge-l": 0}, "same": {"rouge-l": 1}}}))
    open_page(browser, urls[0], view="runs")
    wait(browser, lambda d: any(r.text.startswith("evaluated ") for r in find_all(d, "#runs-table tbody tr")))
    next(r for r in find_all(browser, "#runs-table tbody tr") if r.text.startswith("evaluated ")).click()
    wait(browser, lambda d: "dev" in find(d, "#run-evals").text)
    rows = [r.text for r in find_all(browser, "#run-evals tr")]
    assert rows == ["metric base value better / worse / same", "rouge-l 3.2500 87.500 7 / 0 / 1",
                    "eval_loss 7.5000 0.25000"]
    wait(browser, lambda d: any(r.text.startswith("b ") for r in find_all(d, "#runs-table tbody tr")))
    row = next(r for r in find_all(browser, "#runs-table tbody tr") if r.text.startswith("b "))
    assert row.text.split()[:3] == ["b", "finished", "lora"]
    row.click()
    logged = [json.loads(line) for line in (server.runs["b"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in logged if "loss" in r]
    wait(browser, lambda d: find(d, "#chart-loss").get_attribute("data-points") == str(len(losses)))
    summary = find(browser, "#run-summary").text
    manifest = json.loads((server.runs["b"] / "chattune.json").read_text())
    assert manifest["data_fingerprint"] in summary and str(manifest["base_model"]["path"]) in summary
    audit = find(browser, "#run-audit").text
    assert "supervised" in audit
    browser.save_screenshot(str(shots / "runs.png"))


PREFERENCE_CHARTS = ("#chart-rewards", "#chart-accuracy", "#chart-margin", "#chart-kl")


@pytest.fixture(scope="module")
def dpo_run(runs_dir, tiny_models, shared_data, tmp_path_factory) -> Path:
    """A DPO run (LoRA, 4 steps, rewards logged each step and evaluated every 2) under ``runs_dir``."""
    from chattune.training.recipe import train
    from tests.training.test_preference_recipe import make_config

    work = tmp_path_factory.mktemp("dpo-data")
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps(json.loads((shared_data / "dpo_en_demo.json").read_text())[:30]))
    config = make_config(tiny_models("llama"), pairs, runs_dir / "dpo-run", report_to=["none"],
                         cache_dir=str(work / "cache"))
    return train(config, log=lambda *_: None).output_dir


def _show_run(driver, name: str) -> None:
    """Click the runs table's row of ``name`` and wait for its details."""
    wait(driver, lambda d: any(r.text.split(" ")[0] == name for r in find_all(d, "#runs-table tbody tr")))
    next(r for r in find_all(driver, "#runs-table tbody tr") if r.text.split(" ")[0] == name).click()
    wait(driver, lambda d: find(d, "#run-title").text == name)


def _logged(folder: Path, key: str) -> int:
    """How many of a run's metrics rows have ``key``."""
    return sum(key in json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())


def test_runs_shows_the_stage_and_rewards_of_a_preference_run_and_none_for_sft(browser, urls, server, runs_dir,
                                                                                 dpo_run, shots):
    open_page(browser, urls[0], view="runs")
    _show_run(browser, "dpo-run")
    rewards = find(browser, "#chart-rewards")
    wait(browser, lambda d: rewards.get_attribute("data-points") == str(_logged(dpo_run, "rewards/chosen")))
    assert _logged(dpo_run, "rewards/chosen") == 4 and _logged(dpo_run, "eval_rewards/chosen") == 2
    assert rewards.get_attribute("data-series") == ("rewards/chosen,rewards/rejected,eval_rewards/chosen,"
                                                    "eval_rewards/rejected")
    assert find(browser, "#chart-accuracy").get_attribute("data-series") == "rewards/accuracies,eval_rewards/accuracies"
    assert find(browser, "#chart-margin").get_attribute("data-series") == "rewards/margins,eval_rewards/margins"
    assert [find(browser, c).is_displayed() for c in PREFERENCE_CHARTS] == [True, True, True, False]  # kl: kto's
    summary = [r.text for r in find_all(browser, "#run-summary tr")]
    assert 'Stage dpo {"pref_beta":0.1,"pref_loss":"sigmoid","pref_label_smoothing":0,"pref_ftx":0}' in summary
    assert "Reference adapter_off" in summary
    row = next(r for r in find_all(browser, "#runs-table tbody tr") if r.text.startswith("dpo-run "))
    assert row.text.split()[:5] == ["dpo-run", "finished", "lora", "·", "dpo"]
    browser.execute_script("document.getElementById('chart-loss').scrollIntoView()")
    browser.save_screenshot(str(shots / "runs-dpo.png"))

    _show_run(browser, "b")  # supervised: the loss, learning rate and speed, no reward chart
    losses = _logged(server.runs["b"], "loss")
    wait(browser, lambda d: find(d, "#chart-loss").get_attribute("data-points") == str(losses))
    assert [find(browser, c).is_displayed() for c in PREFERENCE_CHARTS] == [False] * 4
    assert "Stage" not in find(browser, "#run-summary").text


def test_runs_shows_kto_charts_and_a_preference_run_before_its_first_log(browser, urls, runs_dir, dpo_run):
    kto = runs_dir / "kto-run"
    shutil.copytree(dpo_run, kto, ignore=shutil.ignore_patterns("checkpoint-*"))
    manifest = json.loads((kto / "chattune.json").read_text())
    manifest["stage"] = {"name": "kto", "pref_beta": 0.1, "kto_desirable_weight": 1.0,
                         "kto_undesirable_weight": 1.0, "reference": "adapter_off"}
    (kto / "chattune.json").write_text(json.dumps(manifest))
    (kto / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [  # as a KTO run logs them
        {"step": 1, "loss": 0.5, "kl": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.49, "kl": 0.5, "rewards/chosen": 0.06, "rewards/margins": 0.06},
        {"step": 2, "eval_loss": 0.5, "eval_kl": 0.8, "eval_rewards/chosen": 0.08, "eval_rewards/rejected": 0.1,
         "eval_rewards/margins": -0.02}]))
    live = runs_dir / "dpo-live"  # training, no checkpoint yet: the stage is the data audit's
    live.mkdir()
    (live / "data_audit.json").write_text(json.dumps({"stage": "dpo", "kind": "paired"}))
    (live / "metrics.jsonl").write_text("")
    open_page(browser, urls[0], view="runs")
    _show_run(browser, "kto-run")
    wait(browser, lambda d: find(d, "#chart-kl").get_attribute("data-points") == "2")
    assert find(browser, "#chart-kl").get_attribute("data-series") == "kl,eval_kl"
    assert [find(browser, c).is_displayed() for c in PREFERENCE_CHARTS] == [True, False, True, True]
    assert find(browser, "#chart-rewards").get_attribute("data-points") == "2"
    _show_run(browser, "dpo-live")
    wait(browser, lambda d: find(d, "#curve-status").get_attribute("data-rows") == "0"
         and find(d, "#chart-kl").get_attribute("hidden") is not None)
    assert [find(browser, c).is_displayed() for c in PREFERENCE_CHARTS] == [True, True, True, False]
    assert find(browser, "#chart-rewards").get_attribute("data-points") == "0"  # "no data yet"


def test_runs_shows_a_grpo_runs_reward_curves_per_function(browser, urls, runs_dir, dpo_run, shots):
    grpo = runs_dir / "grpo-run"
    shutil.copytree(dpo_run, grpo, ignore=shutil.ignore_patterns("checkpoint-*"))
    manifest = json.loads((grpo / "chattune.json").read_text())
    manifest["stage"] = {"name": "grpo", "num_generations": 8, "reward_funcs": ["answer_match", "format"],
                         "reference": "adapter_off"}
    (grpo / "chattune.json").write_text(json.dumps(manifest))
    steps = [{"step": n, "loss": 0.01, "reward": 0.1 * n, "kl": 0.01 * n, "completion_length": 20 - n,
              "completion_length_min": 10 - n, "completion_length_max": 24, "rewards/answer_match/mean": 0.05 * n,
              "completions_per_second": 5.0,
              "rewards/format/mean": 0.2 * n} for n in (1, 2, 3)]
    steps.append({"step": 3, "eval_loss": 0.0, "eval_reward": 0.25, "eval_completion_length": 16.0, "eval_kl": 0.02})
    (grpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    open_page(browser, urls[0], view="runs")
    _show_run(browser, "grpo-run")
    chart = find(browser, "#chart-grpo-reward")
    wait(browser, lambda d: chart.get_attribute("data-points") == "3")
    assert chart.get_attribute("data-series") == ("reward,eval_reward,rewards/answer_match/mean,"
                                                  "rewards/format/mean")
    assert find(browser, "#chart-length").get_attribute("data-series") == (
        "completion_length,completion_length_min,completion_length_max,eval_completion_length")
    assert find(browser, "#chart-tps").get_attribute("data-series") == "completions_per_second"
    shown = [find(browser, c).is_displayed() for c in (*PREFERENCE_CHARTS, "#chart-grpo-reward", "#chart-length")]
    assert shown == [False, False, False, True, True, True]  # no pairs: KL, rewards and lengths
    browser.execute_script("document.getElementById('chart-grpo-reward').scrollIntoView()")
    browser.save_screenshot(str(shots / "runs-grpo.png"))


@pytest.fixture(scope="module")
def kb_url(server, tmp_path_factory):
    """The session's models with the generated world's KB (``MODEL+docs``); (url, facts)."""
    from chattune.kb import store
    from chattune.serve.retrieval import open_kbs
    from tests.kb.world import fiction

    root = tmp_path_factory.mktemp("browser-kb")
    facts = fiction.write_world(root / "docs")
    store.build([root / "docs"], root / "kb")
    thread = ServerThread(create_app(server.served, server.engine, kbs=open_kbs([f"docs={root / 'kb'}"]))).start()
    yield thread.url, facts
    thread.stop()


def test_an_answer_from_a_knowledge_base_shows_its_sources(browser, kb_url):
    url, facts = kb_url
    fact = next(f for f in facts if f.language == "zh")
    open_page(browser, url)
    greedy(browser)
    set_value(browser, "#chat-model", "b+docs")
    send(browser, fact.question)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="b+docs", messages=[{"role": "user", "content": fact.question}],
                                           temperature=0, max_tokens=32)
    sources = reply.model_extra["sources"]
    assert sources and messages(browser)[-1] == ("assistant", reply.choices[0].message.content)
    shown = [li.text for li in find_all(browser, ".msg.assistant .sources li")]
    assert shown == [f"{s['file']}, chunk {s['chunk']} ({s['score']:.3f})" for s in sources]
    assert fact.file in {s["file"].rsplit("/", 1)[-1] for s in sources}


@pytest.fixture(scope="module")
def vision_urls(tiny_vlms, tiny_models):
    """(url of a tiny LLaVA model's server, url of a tiny text-only model's server), with the page."""
    from chattune.inference.runs import load_run
    from chattune.serve.engine import Engine

    started = []
    for path in (tiny_vlms("llava"), tiny_models("llama")):
        served = load_run(str(path))
        engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id)
        engine.start()
        started.append((ServerThread(create_app(served, engine)).start(), engine))
    yield tuple(thread.url for thread, _ in started)
    for thread, engine in started:
        thread.stop()
        engine.stop()


def test_an_image_attached_to_a_message_is_sent_and_shown(browser, vision_urls, tmp_path, shots):
    import base64

    from PIL import Image

    url, text_url = vision_urls
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(image)
    (tmp_path / "notes.txt").write_text("not an image")
    sent = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    open_page(browser, url)
    greedy(browser, 8)
    wait(browser, lambda d: find(d, "#attach").is_enabled(), message="a vision model's page cannot attach images")
    find(browser, "#chat-image").send_keys(str(tmp_path / "notes.txt"))
    wait(browser, lambda d: find(d, "#chat-error").is_displayed())
    assert "notes.txt: not an image" in find(browser, "#chat-error").text
    find(browser, "#chat-image").send_keys(str(image))
    wait(browser, lambda d: len(find_all(d, "#attachments .thumb")) == 1)
    text = "<b>What</b> colour is <img src=x onerror=alert(1)> it?"
    send(browser, text)
    expected = api_answer(url, "base", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sent}}, {"type": "text", "text": text}]}], 8)
    assert messages(browser) == [("user", text), ("assistant", expected)]
    assert not find_all(browser, "#attachments .thumb") and not find(browser, "#chat-error").is_displayed()
    thumb = find(browser, ".msg.user .images img.thumb")
    assert thumb.get_attribute("src") == sent
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 40  # it shows the image
    user = find(browser, ".msg.user .content")
    assert user.text == text and not find_all(browser, ".msg.user .content *")  # text, never HTML
    browser.save_screenshot(str(shots / "chat-image.png"))
    browser.refresh()  # kept with the conversation; regenerating sends the image again
    wait(browser, lambda d: len(find_all(d, ".msg .images img.thumb")) == 1
         and find(d, "body").get_attribute("data-ready") == "1")
    find(browser, "#regenerate").click()
    wait(browser, lambda d: len(find_all(d, ".msg.assistant.done")) == 1 and not find_all(d, ".streaming"))
    assert messages(browser) == [("user", text), ("assistant", expected)]
    big = tmp_path / "big.png"  # noise: too large to send as it is, so scaled down as JPEG
    Image.effect_noise((1800, 1200), 80).convert("RGB").save(big)
    assert big.stat().st_size > 1_000_000
    find(browser, "#chat-image").send_keys(str(big))
    wait(browser, lambda d: len(find_all(d, "#attachments .thumb")) == 1)
    scaled = find(browser, "#attachments .thumb").get_attribute("src")
    assert scaled.startswith("data:image/jpeg;base64,") and len(scaled) <= 400_000
    assert browser.execute_script("return arguments[0].naturalWidth", find(browser, "#attachments .thumb")) <= 1536
    browser.execute_script("arguments[0].click()", find(browser, "#attachments .remove"))
    wait(browser, lambda d: not find(d, "#attachments").is_displayed())
    open_page(browser, text_url)  # a text-only model: no attaching
    assert not find(browser, "#attach").is_enabled()
    assert find(browser, "#attach").get_attribute("title") == "This model reads no images"
