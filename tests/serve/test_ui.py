"""The web page's routes over HTTP (the page itself in a browser: test_ui_browser.py)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from chattune.serve.app import create_app
from chattune.serve.ui import STATIC_DIR
from tests.serve.helpers import KEY
from tests.serve.server_thread import ServerThread

PAGE_FILES = ["index.html", "app.js", "vendor/markdown-it.min.js", "markdown.js", "charts.js", "workbench.js",
              "style.css", "favicon.svg"]


@pytest.fixture(scope="module")
def runs_dir(server, tmp_path_factory):
    """A folder with a copy of run ``b`` and a run still being trained (no manifest yet)."""
    root = tmp_path_factory.mktemp("runs-dir")
    shutil.copytree(server.runs["b"], root / "team" / "b-copy")
    live = root / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n')
    (live / "data_audit.json").write_text(json.dumps({"rows": 12}))
    return root


@pytest.fixture(scope="module")
def page_server(server, runs_dir):
    """The served runs with the page and --runs-dir, and the same without the page."""
    with_ui = ServerThread(create_app(server.served, server.engine, runs_dir=str(runs_dir))).start()
    keyed = ServerThread(create_app(server.served, server.engine, api_key=KEY, runs_dir=str(runs_dir))).start()
    without = ServerThread(create_app(server.served, server.engine, ui=False)).start()
    yield with_ui.url, keyed.url, without.url
    for thread in (with_ui, keyed, without):
        thread.stop()


def test_the_page_and_its_files_are_served_from_the_package(page_server):
    url = page_server[0]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in PAGE_FILES[1:]:
        response = httpx.get(f"{url}/ui/static/{name}")
        assert response.status_code == 200, name
        assert response.content == (STATIC_DIR / name).read_bytes()
        assert f"/ui/static/{name}" in page.text or name == "favicon.svg"
    assert httpx.get(url + "/favicon.ico").headers["content-type"] == "image/svg+xml"


def test_the_page_comes_with_a_content_security_policy(page_server):
    page = httpx.get(page_server[0] + "/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "default-src 'self';" in policy and "object-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "<script>" not in page.text and " style=" not in page.text and " on" + "click=" not in page.text
    assert page.headers["x-content-type-options"] == "nosniff"


def test_nothing_is_fetched_from_another_host():
    for name in ("index.html", "app.js", "markdown.js", "charts.js", "workbench.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert "//cdn" not in text and "https://" not in text.replace("https?:", ""), name
        assert "src=\"http" not in text and "href=\"http" not in text, name


def test_with_a_key_the_page_is_open_but_everything_else_needs_the_key(page_server):
    keyed = page_server[1]
    page = httpx.get(keyed + "/")
    assert page.status_code == 200 and KEY not in page.text
    for name in PAGE_FILES:
        assert KEY not in httpx.get(f"{keyed}/ui/static/{name}").text
    for path in ("/v1/models", "/ui/api/runs"):
        refused = httpx.get(keyed + path)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    runs = httpx.get(keyed + "/ui/api/runs", headers={"Authorization": f"Bearer {KEY}"})
    assert runs.status_code == 200
    assert httpx.get(keyed + "/ui/static/../../app.py").status_code in (401, 404)


def test_no_ui_serves_the_api_only(page_server):
    without = page_server[2]
    assert httpx.get(without + "/").status_code == 404
    assert httpx.get(without + "/ui/static/app.js").status_code == 404
    assert httpx.get(without + "/ui/api/runs").status_code == 404
    assert httpx.get(without + "/v1/models").status_code == 200


def test_runs_lists_the_served_runs_and_those_under_runs_dir(page_server, server, runs_dir):
    body = httpx.get(page_server[0] + "/ui/api/runs").json()
    assert body["runs_dir"] == str(runs_dir)
    by_path = {r["path"]: r for r in body["runs"]}
    a, b = by_path[str(server.runs["a"])], by_path[str(server.runs["b"])]
    assert a["served_as"][0] == "a" and b["served_as"] == ["b"]
    assert a["state"] == "finished" and a["manifest"]["method"] == "lora"
    assert a["manifest"]["data_fingerprint"] and a["manifest"]["template"]
    copy = by_path[str(runs_dir / "team" / "b-copy")]
    assert copy["served_as"] == [] and copy["manifest"]["data_fingerprint"] == b["manifest"]["data_fingerprint"]
    live = by_path[str(runs_dir / "live")]
    assert live["state"] == "training" and live["manifest"] is None


def test_one_run_and_its_metrics_as_they_grow(page_server, runs_dir):
    url = page_server[0]
    runs = httpx.get(url + "/ui/api/runs").json()["runs"]
    live = next(r for r in runs if r["name"] == "live")
    detail = httpx.get(f"{url}/ui/api/runs/{live['id']}").json()
    assert detail["audit"] == {"rows": 12} and detail["evaluations"] == []
    first = httpx.get(f"{url}/ui/api/runs/{live['id']}/metrics").json()
    assert first["rows"] == [{"step": 1, "loss": 3.5}] and first["state"] == "training"
    with (runs_dir / "live" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "loss": 3.1}\n')
    second = httpx.get(f"{url}/ui/api/runs/{live['id']}/metrics", params={"offset": first["offset"]}).json()
    assert second["rows"] == [{"step": 2, "loss": 3.1}]


def test_an_unknown_run_is_a_404_and_paths_are_never_opened(page_server):
    url = page_server[0]
    for run in ("0123456789ab", "..", "%2Fetc%2Fpasswd"):
        response = httpx.get(f"{url}/ui/api/runs/{run}")
        assert response.status_code == 404
    body = httpx.get(f"{url}/ui/api/runs/0123456789ab").json()
    assert body["error"]["code"] == "run_not_found" and "GET /ui/api/runs" in body["error"]["message"]


def test_serve_refuses_a_runs_dir_that_is_not_a_folder(tmp_path, capsys):
    from chattune.cli import main

    assert main(["serve", str(tmp_path), "--runs-dir", str(tmp_path / "nope")]) == 2
    assert "--runs-dir" in capsys.readouterr().err
