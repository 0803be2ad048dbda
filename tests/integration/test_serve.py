"""The serve path end to end: real image builds, real containers under uWSGI, the real nginx gateway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def probe_project(tmp_path) -> Path:
    target = tmp_path / "probe"
    shutil.copytree(APPS / "probe", target)
    return target


def test_run_serves_hello_example_on_both_endpoints(mlserve, project, tmp_path):
    out = mlserve.json("run", "--mode", "serve", cwd=project)
    assert out["job"] == "tester/projects/hello/1"
    assert len(out["id"]) == 22 and out["id"].isalnum()
    assert out["endpoint"] == f"{mlserve.url}/serve/{out['id']}"
    assert out["project_endpoint"] == f"{mlserve.url}/serve/tester/projects/hello"

    hello = requests.get(out["endpoint"], timeout=10)
    assert hello.status_code == 200 and hello.json()["message"] == "hello from mlserve"

    upload = tmp_path / "blob.bin"
    upload.write_bytes(b"x" * 300_000)
    answer = requests.post(out["project_endpoint"], files={"file": upload.open("rb")}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["bytes"] == 300_000

    jobs = mlserve.json("status")
    assert [(j["job"], j["state"], j["healthy"]) for j in jobs] == [("tester/projects/hello/1", "running", True)]


def test_routing_prefix_no_redirect_and_locked_down_instance(mlserve, probe_project):
    out = mlserve.json("run", "--mode", "serve", "--project", "probe", cwd=probe_project)
    endpoint = out["endpoint"]
    # /serve/<id> with no slash reaches the app's / for POST too, without a redirect.
    answer = requests.post(endpoint, data=b"abc", allow_redirects=False, timeout=10)
    assert answer.status_code == 200
    seen = answer.json()
    assert seen["path_info"] == "/" and seen["script_name"] == f"/serve/{out['id']}"
    assert seen["method"] == "POST" and seen["body_bytes"] == 3
    assert seen["uid"] == 65534  # not root inside the instance
    nested = requests.get(f"{out['project_endpoint']}/a/b?x=1", timeout=10).json()
    assert nested["script_name"] == "/serve/tester/projects/probe" and nested["path_info"] == "/a/b"
    assert requests.get(f"{mlserve.url}/serve/{'Z' * 22}", timeout=10).status_code == 404

    info = mlserve.json("info", out["job"])
    assert info["limits"]["gateway"] == info["limits"]["uwsgi"] == {"body_limit_mb": 100, "timeout_s": 60}
    assert info["workers"] == 2
    assert "spawned uWSGI worker 2" in mlserve("logs", out["job"]).stdout


def test_code_change_redeploys_from_cache_and_both_jobs_rotate(mlserve, probe_project):
    first = mlserve.json("run", "--mode", "serve", cwd=probe_project)
    app = probe_project / "app.py"
    app.write_text(app.read_text().replace('"version": 1', '"version": 2'))
    second = mlserve.json("run", "--mode", "serve", cwd=probe_project)
    assert second["job"].endswith("/2") and second["id"] != first["id"]
    build = second["build"]
    # Only the code layer and what follows it are rebuilt.
    assert build["steps"] - build["cached"] <= 5, build
    versions = {requests.get(second["project_endpoint"], timeout=10).json()["version"] for _ in range(8)}
    assert versions == {1, 2}
    assert requests.get(first["endpoint"], timeout=10).json()["version"] == 1
    assert requests.get(second["endpoint"], timeout=10).json()["version"] == 2


def test_scale_up_round_robins_and_scale_down_stops_oldest(mlserve, probe_project):
    mlserve("run", "--mode", "serve", cwd=probe_project)
    mlserve("scale", "3", cwd=probe_project)
    jobs = mlserve.json("status")
    assert sorted(j["job"] for j in jobs) == [f"tester/projects/probe/{n}" for n in (1, 2, 3)]
    assert all(j["healthy"] for j in jobs)
    project_endpoint = f"{mlserve.url}/serve/tester/projects/probe"
    served = {requests.get(project_endpoint, timeout=10).json()["job"] for _ in range(12)}
    assert served == {j["job"] for j in jobs}

    mlserve("scale", "--add", "1", "--project", "probe")
    assert len(mlserve.json("status")) == 4
    mlserve("scale", "1", cwd=probe_project)
    remaining = mlserve.json("status")
    assert [j["job"] for j in remaining] == ["tester/projects/probe/4"]
    stopped = {j["job"]: j["state"] for j in mlserve.json("status", "--all")}
    assert stopped["tester/projects/probe/1"] == "stopped"
    served = {requests.get(project_endpoint, timeout=10).json()["job"] for _ in range(4)}
    assert served == {"tester/projects/probe/4"}


def test_stop_by_number_name_and_id_then_project_answers_503(mlserve, probe_project):
    a = mlserve.json("run", "--mode", "serve", cwd=probe_project)
    mlserve("scale", "3", cwd=probe_project)
    jobs = {j["job"]: j for j in mlserve.json("status")}
    mlserve("stop", "1", cwd=probe_project)
    mlserve("stop", "probe/2")
    third = jobs["tester/projects/probe/3"]
    mlserve("stop", third["id"])
    assert mlserve.json("status") == []
    gone = requests.get(a["project_endpoint"], timeout=10)
    assert gone.status_code == 503 and "Retry-After" in gone.headers
    assert gone.headers["Content-Type"].startswith("application/json")
    assert requests.get(a["endpoint"], timeout=10).status_code == 404
    assert "spawned uWSGI worker" in mlserve("logs", "probe/1").stdout


def test_local_runtime_serves_the_same_app(mlserve, probe_project):
    # The caller's environment (tokens, keys) stays the caller's.
    out = json.loads(mlserve("run", "--mode", "serve", "--runtime", "local", "--json", cwd=probe_project,
                             env={"CALLERS_SECRET_TOKEN": "s3cret"}).stdout)
    seen = requests.get(out["endpoint"] + "/x", timeout=10).json()
    assert seen["path_info"] == "/x" and seen["job"] == out["job"]
    assert "MLSERVE_JOB" in seen["environ"] and "CALLERS_SECRET_TOKEN" not in seen["environ"]
    assert mlserve.json("status")[0]["runtime"] == "local"
    mlserve("stop", out["job"])
    assert requests.get(out["endpoint"], timeout=10).status_code == 404
