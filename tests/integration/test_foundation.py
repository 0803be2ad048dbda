"""The foundation under load of bad input and faults: typed settings refused before a build, hostile
health text, commands that never wait on each other's health waits, killed commands cleaned up,
a stopped gateway that stays stopped, and builds that do not pile up image tags."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.harness import home_images, job_container, labelled_containers, wait_for

pytestmark = pytest.mark.integration

HELLO = """
from flask import Flask, jsonify
app = Flask(__name__)

@app.get("/")
def hello():
    return jsonify(version=VERSION)

VERSION = 1
"""

# Slow only when served: the build's import check must stay fast.
SLOW = """
import time
try:
    import uwsgi  # noqa: F401
    time.sleep(90)
except ImportError:
    pass

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow"]
"""

# Once told to, the health path answers 500 with a status line full of nginx-special characters.
HOSTILE_HEALTH = r"""
import os

HOSTILE = '500 price $x; } "quoted" { return 200 owned; \x1b[31m'


def app(environ, start_response):
    path = environ.get("PATH_INFO")
    if path == "/turn":
        open("/tmp/hostile", "w").close()
    status = HOSTILE if path == "/health" and os.path.exists("/tmp/hostile") else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"hi"]
"""


def _app(tmp_path: Path, name: str, source: str, config: str = "", requirements: str = "flask\n") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(source)
    if requirements:
        (folder / "requirements.txt").write_text(requirements)
    if config:
        (folder / "mlserve.yml").write_text(config)
    return folder


@pytest.mark.parametrize("config, key", [
    ("health: {interval: soon}\n", "health.interval"),
    ("workers: many\n", "workers"),
    ("limits: {memory: lots}\n", "limits.memory"),
    ("max_runtime: -1\n", "max_runtime"),
])
def test_a_wrong_value_in_mlserve_yml_fails_before_any_build(mlserve, docker_client, tmp_path, config, key):
    folder = _app(tmp_path, "typed", HELLO, config)
    result = mlserve("run", "--mode", "serve", cwd=folder, check=False)
    assert result.returncode != 0
    assert f"{key} must be" in result.stderr
    assert "Building" not in result.stdout + result.stderr
    assert home_images(docker_client, mlserve.home, "tester/projects/typed") == set()
    assert mlserve.json("status") == []


def test_an_app_controlled_health_answer_never_reaches_the_gateway_config(mlserve, tmp_path):
    steady = _app(tmp_path, "steady", HELLO)
    mlserve("run", "--mode", "serve", cwd=steady)
    hostile = _app(tmp_path, "hostile", HOSTILE_HEALTH, "health: {path: /health, interval: 0.5s}\n")
    started = mlserve.json("run", "--mode", "serve", cwd=hostile)
    hostile_job = started["job"]
    for _ in range(4):  # both workers
        requests.post(f"{started['endpoint']}/turn", timeout=10)
    assert wait_for(lambda: not mlserve.jobs()[hostile_job]["healthy"], timeout=20)
    assert "$x" not in mlserve.gateway_conf() and "owned" not in mlserve.gateway_conf()
    reason = mlserve.jobs()[hostile_job]["reason"]
    assert reason and "$x" in reason and "\x1b" not in reason  # kept for `info`, but no terminal escapes
    # Other projects still run, scale and stop, and the gateway answers.
    mlserve("scale", "2", "--project", "steady")
    assert requests.get(f"{mlserve.url}/serve/tester/projects/steady", timeout=10).json() == {"version": 1}
    answer = requests.get(f"{mlserve.url}/serve/{mlserve.jobs()[hostile_job]['id']}", timeout=10)
    assert answer.status_code == 503 and answer.json()["job"] == hostile_job
    mlserve("scale", "1", "--project", "steady")
    mlserve("stop", "--project", "steady")
    assert requests.get(f"{mlserve.url}/serve/tester/projects/steady", timeout=10).status_code == 503


def test_a_slow_start_blocks_no_other_command_and_a_killed_run_leaves_nothing(mlserve, docker_client, tmp_path):
    quick = _app(tmp_path, "quick", HELLO)
    out = mlserve.json("run", "--mode", "serve", cwd=quick)
    slow = _app(tmp_path, "slow", SLOW, requirements="")
    run = mlserve.start("run", "--mode", "serve", cwd=slow)
    try:
        starting = wait_for(lambda: [c for c in labelled_containers(docker_client, mlserve.home,
                                                                     project="tester/projects/slow")], timeout=120)
        assert starting, "the slow job's container never started"
        # While the slow run waits for its instance, another project scales in seconds ...
        began = time.monotonic()
        mlserve("scale", "2", "--project", "quick", timeout=60)
        assert time.monotonic() - began < 30
        # ... and the supervisor keeps healing it.
        job_container(docker_client, mlserve.home, out["id"]).kill()
        assert wait_for(lambda: (j := mlserve.jobs()[out["job"]])["restarts"] >= 1 and j["healthy"], timeout=30)
        assert run.poll() is None, "the slow run should still be waiting"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    # Within a supervisor round, nothing of the killed run remains: no row, no container.
    assert wait_for(lambda: not labelled_containers(docker_client, mlserve.home, project="tester/projects/slow"),
                    timeout=15)
    assert not [j for j in mlserve.json("status", "--all") if "/slow/" in j["job"]]


def test_the_gateway_after_kill_9_of_its_master_comes_back_with_the_next_command(mlserve, tmp_path):
    folder = _app(tmp_path, "hello", HELLO)
    out = mlserve.json("run", "--mode", "serve", cwd=folder)
    pid = int((mlserve.home / "gateway" / "nginx.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    mlserve("status")
    assert requests.get(out["project_endpoint"], timeout=10).json() == {"version": 1}
    status = mlserve.json("gateway", "status")
    assert status["running"] and status["pid"] != pid


def test_gateway_stop_stays_stopped_until_gateway_start(mlserve, tmp_path):
    folder = _app(tmp_path, "hello", HELLO)
    out = mlserve.json("run", "--mode", "serve", cwd=folder)
    mlserve("gateway", "stop")
    mlserve("status")
    time.sleep(3)  # more than one supervisor round, were one running
    assert not mlserve.json("gateway", "status")["running"]
    with pytest.raises(requests.ConnectionError):
        requests.get(out["project_endpoint"], timeout=5)
    mlserve("gateway", "start")
    assert requests.get(out["project_endpoint"], timeout=10).json() == {"version": 1}


def test_a_home_with_dot_dot_in_its_path_is_one_home(mlserve, tmp_path):
    folder = _app(tmp_path, "hello", HELLO)
    (mlserve.home / "sub").mkdir()
    dotted = {"MLSERVE_HOME": f"{mlserve.home}/sub/.."}
    mlserve("run", "--mode", "serve", cwd=folder, env=dotted)
    assert len(mlserve.json("status")) == 1
    result = mlserve("scale", "2", "--project", "hello", env=dotted)
    assert "2 serving job(s)" in result.stdout


def test_an_empty_project_name_is_refused(mlserve, tmp_path):
    folder = _app(tmp_path, "hello", HELLO)
    result = mlserve("run", "--mode", "serve", "--project", "", cwd=folder, check=False)
    assert result.returncode != 0 and "'' is not a valid project name" in result.stderr
    assert mlserve.json("status") == []


def test_builds_do_not_pile_up_image_tags(mlserve, docker_client, tmp_path):
    # The images of the newest 3 versions stay (for `scale --version N`), and those of serving jobs.
    folder = _app(tmp_path, "tags", HELLO)
    tags = []
    for version in (1, 2, 3, 4, 5):
        (folder / "app.py").write_text(HELLO.replace("VERSION = 1", f"VERSION = {version}"))
        tags.append(mlserve.json("run", "--mode", "serve", cwd=folder)["build"]["image"])
        if version > 2:
            mlserve("stop", str(version - 1), cwd=folder)  # the job before stops (job 1 serves on)
    assert len(set(tags)) == 5
    assert home_images(docker_client, mlserve.home, "tester/projects/tags") == {tags[0], tags[2], tags[3], tags[4]}


def test_the_supervisor_caps_the_gateways_access_log(mlserve, tmp_path):
    folder = _app(tmp_path, "hello", HELLO)
    cap = {"MLSERVE_LOG_MAX_BYTES": "40000"}  # the supervisor this run starts inherits it
    out = json.loads(mlserve("run", "--mode", "serve", "--json", cwd=folder, env=cap).stdout)
    access_log = mlserve.home / "gateway" / "access.log"
    with requests.Session() as session:
        for _ in range(2500):  # about 400 KB of access log lines
            session.get(f"{out['endpoint']}/nowhere", timeout=10)
    assert wait_for(lambda: access_log.stat().st_size < 40000 + (64 << 10), timeout=10), access_log.stat().st_size
    requests.get(f"{out['endpoint']}/after-the-cap", timeout=10)
    assert wait_for(lambda: b"/after-the-cap" in access_log.read_bytes(), timeout=10)  # still logging
