"""Bad input: a clear message, a non-zero exit, nothing left behind, and the running job undisturbed."""

from __future__ import annotations

import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from tests.harness import labelled_containers, make_mlserve, project_ready, teardown_mlserve

pytestmark = pytest.mark.integration

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def running(mlserve_module, tmp_path_factory):
    """One healthy job that every bad command must leave alone."""
    project = tmp_path_factory.mktemp("p") / "probe"
    shutil.copytree(APPS / "probe", project)
    out = mlserve_module.json("run", "--mode", "serve", cwd=project)
    return mlserve_module, out


def assert_nothing_left(ms, out, client) -> None:
    jobs = ms.json("status", "--all")
    assert [j["job"] for j in jobs] == [out["job"]], jobs
    assert len(labelled_containers(client, ms.home)) == 1
    assert requests.get(out["endpoint"], timeout=10).status_code == 200
    routes = ms.routes()  # only the running job, at its own endpoint and its project's
    assert list(routes["jobs"]) == [out["id"]] and routes["jobs"][out["id"]]["ready"]
    assert [project_ready(routes, key) for key in routes["projects"]] == [[out["id"]]]
    assert [v["version"] for v in ms.json("versions", "probe")] == [1]


def _project(tmp_path: Path, app_py: str | None, requirements: str | None = None) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    if app_py is not None:
        (folder / "app.py").write_text(app_py)
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


WSGI = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n"


@pytest.mark.parametrize(
    "app_py, expected",
    [
        (None, "no app.py"),
        ("x = 1\ndef broken(:\n    pass\n", "app.py:2"),
        ("application = 1\n", "global named app"),
        ("app = 3\n", "not callable"),
        ("if __name__ == '__main__':\n    from flask import Flask\n    app = Flask(__name__)\n", "__main__"),
    ],
    ids=["missing", "syntax", "no-app", "not-callable", "main-only"],
)
def test_static_app_errors(running, docker_client, tmp_path, app_py, expected):
    ms, out = running
    result = ms("run", "--mode", "serve", cwd=_project(tmp_path, app_py), check=False)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_left(ms, out, docker_client)


def test_import_error_inside_the_image_fails_the_build_with_the_traceback_tail(running, docker_client, tmp_path):
    ms, out = running
    folder = _project(tmp_path, "import not_a_module_xyz\n" + WSGI)
    result = ms("run", "--mode", "serve", "--project", "bad", cwd=folder, check=False)
    assert result.returncode != 0
    assert "No module named 'not_a_module_xyz'" in result.stderr
    assert_nothing_left(ms, out, docker_client)
    assert not docker_client.images.list(name="mlserve/tester-bad")


def test_unknown_requirement_shows_pips_error(running, docker_client, tmp_path):
    ms, out = running
    folder = _project(tmp_path, WSGI, "mlserve-no-such-package-xyz==1.0\n")
    result = ms("run", "--mode", "serve", cwd=folder, check=False)
    assert result.returncode != 0
    assert "mlserve-no-such-package-xyz" in result.stderr
    assert "No matching distribution" in result.stderr
    assert_nothing_left(ms, out, docker_client)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "./no-such-dir:input"], "does not exist"),
        (["--project", "../x"], "project name"),
        (["--project", "My Project"], "project name"),
        (["--project", "ml\u0455erve"], "project name"),  # a Cyrillic look-alike
        (["--mode", "job"], "--mode job is not supported"),
        (["python", "train.py"], "takes no command"),
        (["--data", "/:input"], "system folder"),
        (["--data", "/proc:input"], "system folder"),
        (["--data", "/run:input"], "system folder"),
        (["--data", "/root:input"], "home folder"),
        (["--data", "@HOME@:input"], "mlserve's home"),
        (["--data", "@HOME@/run:input"], "mlserve's home"),
        (["--canary", "10", "--replace"], "cannot be combined"),
        (["--canary", "10"], "no primary job"),
    ],
    ids=["data-missing", "dotdot", "spaces", "lookalike", "mode-job", "command", "data-root", "data-proc", "data-run",
         "data-root-home", "data-mlserve-home", "data-sockets", "canary-replace", "canary-new-project"],
)
def test_bad_run_options(running, docker_client, tmp_path, args, expected):
    ms, out = running
    folder = _project(tmp_path, WSGI)
    args = [arg.replace("@HOME@", str(ms.home)) for arg in args]
    result = ms("run", "--mode", "serve", *args, cwd=folder, check=False) if args[0] != "--mode" else ms(
        "run", *args, cwd=folder, check=False
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert_nothing_left(ms, out, docker_client)


@pytest.mark.parametrize("command", [["stop", "99"], ["logs", "nope/3"], ["info", "Z" * 22], ["stop", "a/b/c"]])
def test_job_reference_that_matches_nothing(running, docker_client, tmp_path, command):
    ms, out = running
    result = ms(*command, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "no job" in result.stderr
    assert_nothing_left(ms, out, docker_client)


@pytest.mark.parametrize("runtime", [["--runtime", "docker"], []], ids=["docker", "default"])
def test_engine_not_reachable(running, docker_client, tmp_path, runtime):
    # Without --runtime too: no silent fallback to running the app on the host.
    ms, out = running
    folder = _project(tmp_path, WSGI)
    result = ms("run", "--mode", "serve", *runtime, cwd=folder, check=False,
                env={"DOCKER_HOST": "unix:///tmp/no-engine-here.sock"})
    assert result.returncode != 0
    assert "DOCKER_HOST=unix:///tmp/no-engine-here.sock" in result.stderr
    assert "dockerd" in result.stderr and "--runtime local" in result.stderr
    assert_nothing_left(ms, out, docker_client)


def test_nginx_not_installed(running, docker_client, tmp_path):
    ms, out = running
    fresh = make_mlserve()
    try:
        result = fresh("run", "--mode", "serve", "--runtime", "docker", cwd=_project(tmp_path, WSGI), check=False,
                       env={"MLSERVE_NGINX": "/nonexistent/nginx"})
        assert result.returncode != 0
        assert "apt-get install -y nginx-light" in result.stderr
        assert fresh.json("status", "--all") == []
        assert not labelled_containers(docker_client, fresh.home)
    finally:
        teardown_mlserve(fresh, docker_client)
    assert_nothing_left(ms, out, docker_client)


def test_gateway_port_in_use(docker_client, nginx_available, tmp_path):
    fresh = make_mlserve()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", fresh.port))
    blocker.listen()
    try:
        result = fresh("run", "--mode", "serve", cwd=_project(tmp_path, WSGI), check=False)
        assert result.returncode != 0
        assert str(fresh.port) in result.stderr and "MLSERVE_GATEWAY_PORT" in result.stderr
        assert fresh.json("status", "--all") == []
        assert not labelled_containers(docker_client, fresh.home)
    finally:
        blocker.close()
        teardown_mlserve(fresh, docker_client)


def test_ctrl_c_during_build_leaves_nothing(running, docker_client, tmp_path):
    ms, out = running
    # The import check sleeps, so the build is surely running when Ctrl-C comes.
    folder = _project(tmp_path, "import time\ntime.sleep(60)\n" + WSGI)
    before = {c.id for c in docker_client.containers.list(all=True)}
    process = ms.start("run", "--mode", "serve", "--project", "slowbuild", cwd=folder)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # The check step's container appears once the build reaches it.
        if {c.id for c in docker_client.containers.list(all=True)} - before:
            break
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr.lower()
    deadline = time.monotonic() + 30
    while {c.id for c in docker_client.containers.list(all=True)} - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ({c.id for c in docker_client.containers.list(all=True)} - before)
    assert not docker_client.images.list(name="mlserve/tester-slowbuild")
    assert_nothing_left(ms, out, docker_client)


def test_app_that_crashes_at_start_leaves_no_job_container_or_image(running, docker_client, tmp_path):
    ms, out = running
    # Imports at build (no MLSERVE_JOB there), fails in every worker of the instance.
    folder = _project(tmp_path, "import os\nif os.environ.get('MLSERVE_JOB'):\n    raise RuntimeError('no model file')\n" + WSGI)
    result = ms("run", "--mode", "serve", "--project", "crashes", cwd=folder, check=False)
    assert result.returncode != 0
    assert "did not become healthy" in result.stderr
    assert "no model file" in result.stderr  # the instance's log tail
    assert_nothing_left(ms, out, docker_client)
    assert not docker_client.images.list(name="mlserve/tester-crashes")


def test_gateway_start_on_a_port_in_use_keeps_the_running_gateway(running, docker_client):
    ms, out = running
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        result = ms("gateway", "start", "--port", str(taken), env={"MLSERVE_GATEWAY_PORT": ""}, check=False)
        assert result.returncode != 0
        assert str(taken) in result.stderr and "in use" in result.stderr
    finally:
        blocker.close()
    # The gateway goes on where it was, and the failed port was not kept.
    assert_nothing_left(ms, out, docker_client)
    status = ms.json("gateway", "status")
    assert status["running"] and status["url"] == ms.url


def test_a_cloned_mlserve_yml_cannot_mount_folders_outside_the_project(running, docker_client, tmp_path):
    ms, out = running
    folder = _project(tmp_path, WSGI)
    outside = tmp_path / "private"
    outside.mkdir()
    (folder / "mlserve.yml").write_text(f"data: [{outside}:input]\n")
    result = ms("run", "--mode", "serve", cwd=folder, check=False)
    assert result.returncode != 0
    assert "outside the project folder" in result.stderr and "--allow-data-outside" in result.stderr
    assert_nothing_left(ms, out, docker_client)


@pytest.mark.parametrize("limits, key", [("{memory: 0}", "limits.memory"), ("{cpus: -1}", "limits.cpus"),
                                         ("{pids: 0}", "limits.pids"), ("{tmp: 0}", "limits.tmp"),
                                         ("{output: 0}", "limits.output")])
def test_a_limit_cannot_be_removed_by_zeroing_it(running, docker_client, tmp_path, limits, key):
    # Docker takes 0 as "no limit": mlserve.yml (perhaps a cloned repository's) must not lift one that way.
    ms, out = running
    folder = _project(tmp_path, WSGI)
    (folder / "mlserve.yml").write_text(f"limits: {limits}\n")
    result = ms("run", "--mode", "serve", cwd=folder, check=False)
    assert result.returncode != 0 and key in result.stderr and "Building" not in result.stdout + result.stderr
    assert_nothing_left(ms, out, docker_client)
