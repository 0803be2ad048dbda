"""Self-healing on the real engine and gateway: checks, rotation, restarts, draining, locked-down instances.

Loads go to loopback only, from a few threads, and stop by themselves (bounded in time)."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.harness import (
    Load,
    job_container,
    labelled_containers,
    project_pools,
    routed_jobs,
    served_jobs,
    wait_for,
)

pytestmark = pytest.mark.integration

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def healing(tmp_path) -> Path:
    target = tmp_path / "healing"
    shutil.copytree(APPS / "healing", target)
    return target


def test_kill_9_of_one_instance_under_load_loses_no_request(mlserve, healing, docker_client):
    out = mlserve.json("run", "--mode", "serve", cwd=healing)
    mlserve("scale", "3", cwd=healing)
    victim = out["id"]
    container = job_container(docker_client, mlserve.home, victim)
    with Load(out["project_endpoint"]) as load:
        time.sleep(2)
        container.kill(signal="SIGKILL")
        killed_at = time.monotonic()
        back = wait_for(lambda: mlserve.jobs()[out["job"]]["healthy"] and
                        mlserve.jobs()[out["job"]]["restarts"] >= 1, timeout=30)
        back_after = time.monotonic() - killed_at
        time.sleep(2)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50
    assert back, "the killed instance did not come back"
    assert back_after <= 15, back_after
    assert out["job"] in served_jobs(out["project_endpoint"], 12)
    assert "supervisor: running" in mlserve("gateway", "status").stdout


def test_hanging_health_path_leaves_rotation_and_is_restarted(mlserve, healing):
    sick = mlserve.json("run", "--mode", "serve", cwd=healing)
    mlserve("scale", "2", cwd=healing)
    well = next(j for j in mlserve.jobs().values() if j["id"] != sick["id"])
    assert requests.post(sick["endpoint"] + "/sick", timeout=10).json() == {"sick": True}
    started = time.monotonic()
    with Load(sick["project_endpoint"], threads=2) as load:
        out_of_rotation = wait_for(lambda: not mlserve.jobs()[sick["job"]]["healthy"], timeout=20)
        left_after = time.monotonic() - started
        assert out_of_rotation, "the sick job stayed in rotation"
        assert served_jobs(sick["project_endpoint"], 6) == {well["job"]}
        back = wait_for(lambda: (j := mlserve.jobs()[sick["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
    assert left_after <= 10, left_after
    assert back, "the sick job was not restarted back to health"
    assert load.failures == [], load.failures[:5]
    assert served_jobs(sick["project_endpoint"], 12) == {sick["job"], well["job"]}


def test_scale_down_and_stop_under_load_lose_no_request(mlserve, healing):
    out = mlserve.json("run", "--mode", "serve", cwd=healing)
    mlserve("scale", "3", cwd=healing)
    with Load(out["project_endpoint"]) as load:
        time.sleep(1)
        mlserve("scale", "1", cwd=healing)
        time.sleep(1)
        remaining = list(mlserve.jobs())
        mlserve("scale", "--add", "1", cwd=healing)
        mlserve("stop", remaining[0])
        time.sleep(1)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50
    assert len(mlserve.jobs()) == 1


def test_max_runtime_stops_the_job_and_status_shows_time_left(mlserve, healing):
    out = mlserve.json("run", "--mode", "serve", "--max-runtime", "8s", cwd=healing)
    left = mlserve.json("status")[0]["expires_in"]
    assert 0 < left <= 8
    stopped = wait_for(lambda: mlserve.json("status", "--all")[0]["state"] == "stopped", timeout=30)
    assert stopped
    assert mlserve.json("info", out["job"])["reason"] == "maximum runtime reached"
    assert requests.get(out["endpoint"], timeout=10).status_code == 404


def test_a_job_that_keeps_failing_becomes_failed_with_its_log(mlserve, tmp_path):
    folder = tmp_path / "crashy"
    folder.mkdir()
    # Healthy until /die: then the instance dies, and every restart fails to load the app.
    (folder / "app.py").write_text(
        "import os, signal\n"
        "BROKEN = os.path.join(os.environ.get('OUTPUT_DIR', '/tmp'), 'broken')\n"
        "if os.environ.get('MLSERVE_JOB') and os.path.exists(BROKEN):\n"
        "    raise RuntimeError('crashy: the model file is corrupt')\n"
        "def app(environ, start_response):\n"
        "    if environ['PATH_INFO'] == '/die':\n"
        "        open(BROKEN, 'w').close()\n"
        "        os.kill(1, signal.SIGTERM)  # uWSGI master is pid 1: it ends the instance\n"
        "    start_response('200 OK', [])\n"
        "    return [b'ok']\n"
    )
    out = mlserve.json("run", "--mode", "serve", cwd=folder)
    requests.get(out["endpoint"] + "/die", timeout=10)
    failed = wait_for(lambda: mlserve.json("status", "--all")[0]["state"] == "failed", timeout=150, interval=1)
    assert failed, mlserve.json("status", "--all")
    info = mlserve.json("info", out["job"])
    assert info["restarts"] >= 3
    assert "restarted" in info["reason"] and "last log lines" in info["reason"]
    assert "the model file is corrupt" in info["reason"]
    assert "failed" in mlserve("status", "--all").stdout


def test_lock_helper_counts_exactly_across_both_workers(mlserve, healing):
    out = mlserve.json("run", "--mode", "serve", cwd=healing)
    session = requests.Session()

    def bump(_: int) -> int:
        return session.post(out["endpoint"] + "/inc", timeout=30).json()["pid"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pids = set(pool.map(bump, range(1000)))
    assert len(pids) == 2  # both workers took part
    assert requests.get(out["endpoint"] + "/count", timeout=10).json()["value"] == 1000


@pytest.mark.parametrize(
    "route, path",
    [("write", "/app/x"), ("write", "/etc/x"), ("write", "/x"), ("write", "/run/mlserve/x"),
     ("read", "/var/run/docker.sock"), ("connect", "/var/run/docker.sock"), ("read", "/etc/shadow")],
)
def test_locked_down_instance_cannot_write_outside_tmp_and_output(mlserve_module, route, path, tmp_path_factory):
    project = tmp_path_factory.mktemp("lock") / "healing"
    if not project.exists():
        shutil.copytree(APPS / "healing", project)
    jobs = mlserve_module.json("status")
    out = jobs[0] if jobs else mlserve_module.json("run", "--mode", "serve", cwd=project)
    for allowed in ("/tmp/ok", "/output/ok"):
        assert requests.get(f"{out['endpoint']}/write", params={"path": allowed}, timeout=10).json()["ok"], allowed
    answer = requests.get(f"{out['endpoint']}/{route}", params={"path": path}, timeout=10).json()
    assert answer["ok"] is False, answer


def test_paths_that_climb_out_of_an_endpoint_never_reach_another_job(mlserve, healing):
    a = mlserve.json("run", "--mode", "serve", cwd=healing)
    b = mlserve.json("run", "--mode", "serve", cwd=healing)
    for path in (f"/serve/{a['id']}/../{b['id']}", f"/serve/{a['id']}/%2e%2e/{b['id']}",
                 f"/serve/{a['id']}/..%2f{b['id']}", f"/serve/{a['id']}//../{b['id']}", f"/serve//{b['id']}"):
        answer = subprocess.run(["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", mlserve.url + path],
                                capture_output=True, text=True, timeout=30).stdout
        assert answer == "400", (path, answer)


def test_twenty_concurrent_commands_leave_state_containers_and_routes_in_agreement(mlserve, healing, docker_client):
    mlserve("run", "--mode", "serve", cwd=healing)
    commands = [["scale", str(n % 4 + 1)] if n % 3 else ["run", "--mode", "serve"] for n in range(20)]
    procs = [mlserve.start(*args, cwd=healing) for args in commands]
    for proc in procs:
        proc.communicate(timeout=900)
        assert proc.returncode == 0
    jobs = mlserve.json("status")
    ids = {j["id"] for j in jobs}
    containers = labelled_containers(docker_client, mlserve.home)
    assert {c.labels["io.mlserve.job"] for c in containers} == ids
    assert all(c.status == "running" for c in containers)
    routes = mlserve.routes()
    assert routed_jobs(routes) == project_pools(routes) == ids
    numbers = sorted(int(j["job"].rsplit("/", 1)[1]) for j in mlserve.json("status", "--all"))
    assert len(numbers) == len(set(numbers))


def test_a_crashed_gateway_and_supervisor_come_back_with_any_command(mlserve, healing):
    import os
    import signal

    out = mlserve.json("run", "--mode", "serve", cwd=healing)
    status = mlserve.json("gateway", "status")
    assert status["running"] and status["supervisor"]["running"]
    os.kill(status["supervisor"]["pid"], signal.SIGKILL)
    nginx = status["pid"]
    workers = Path(f"/proc/{nginx}/task/{nginx}/children").read_text().split()
    for pid in [nginx, *map(int, workers)]:  # all of nginx dies, as in a reboot
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not mlserve.json("gateway", "status")["running"], timeout=10)
    listing = mlserve("status")
    assert "the gateway was not running" in listing.stderr
    assert "the supervisor was not running" in listing.stderr
    assert requests.get(out["endpoint"], timeout=10).status_code == 200
    again = mlserve.json("gateway", "status")
    assert again["running"] and again["supervisor"]["running"]


@pytest.mark.engine_restart
def test_engine_restart_restores_routes_and_jobs_rejoin(mlserve, healing, docker_client):
    import os
    import signal

    from mlserve import host

    out = mlserve.json("run", "--mode", "serve", cwd=healing)
    mlserve("scale", "2", cwd=healing)
    pid = int(Path("/var/run/docker.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=60)
    host.ensure_engine(print).close()

    def all_back() -> bool:
        jobs = mlserve.json("status")
        return len(jobs) == 2 and all(j["healthy"] and j["restarts"] >= 1 for j in jobs)

    assert wait_for(all_back, timeout=120, interval=1), mlserve.json("status")
    assert requests.get(out["project_endpoint"], timeout=10).status_code == 200
    assert requests.get(out["endpoint"], timeout=10).status_code == 200
