"""Busy is not sick, on the real engine and gateway: an instance whose workers are all in long requests
stays in the rotation and is never restarted; a worker the kernel kills for memory is counted and shown.

Requests go to loopback only, a handful of them, each bounded in time."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import requests

from tests.harness import wait_for

pytestmark = pytest.mark.integration

# Plain WSGI (no requirements): the build is a code-only layer.
APP = """
import json
import os
import time


def app(environ, start_response):
    path, query = environ.get("PATH_INFO"), environ.get("QUERY_STRING", "")
    if path == "/sleep":
        time.sleep(float(query.partition("s=")[2] or 1))
    elif path == "/eat":  # touch every page: the kernel's OOM killer ends this worker
        hog = b"x" * (int(query.partition("mb=")[2] or 1) << 20)
        del hog
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""

SLEEP_S = 25


def _project(tmp_path: Path, name: str, config: str = "") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    if config:
        (folder / "mlserve.yml").write_text(config)
    return folder


def _supervisor_log(mlserve) -> str:
    path = mlserve.home / "gateway" / "supervisor.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_two_long_requests_on_both_workers_are_busy_not_sick(mlserve, tmp_path):
    out = mlserve.json("run", "--mode", "serve", cwd=_project(tmp_path, "sleepy"))
    job = out["job"]
    assert wait_for(lambda: mlserve.jobs()[job]["healthy"], timeout=30)
    seen: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        calls = [pool.submit(requests.get, f"{out['endpoint']}/sleep", params={"s": SLEEP_S}, timeout=SLEEP_S + 30)
                 for _ in range(2)]
        while not all(call.done() for call in calls) and time.monotonic() - started < SLEEP_S + 30:
            seen.append(mlserve.jobs()[job])  # the supervisor checks every 2 s meanwhile
            time.sleep(1)
        answers = [call.result() for call in calls]
    took = time.monotonic() - started
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    assert len({a.json()["pid"] for a in answers}) == 2, "both workers were busy at once"
    assert took >= SLEEP_S and len(seen) >= 10, (took, len(seen))
    assert all(s["healthy"] and s["restarts"] == 0 and s["state"] == "running" for s in seen), seen
    after = mlserve.jobs()[job]
    assert after["healthy"] and after["restarts"] == 0
    log = _supervisor_log(mlserve)
    assert f"{job}: busy, not sick (2 of 2 workers busy" in log, log[-2000:]
    assert "out of rotation" not in log and "restarting" not in log, log[-2000:]
    assert requests.get(out["endpoint"], timeout=10).status_code == 200


def test_a_worker_killed_for_memory_is_counted_and_the_job_keeps_serving(mlserve, tmp_path):
    folder = _project(tmp_path, "hungry", "limits: {memory: 128m}\n")
    out = mlserve.json("run", "--mode", "serve", cwd=folder)
    job = out["job"]
    before = mlserve.json("info", job)
    assert before["oom_kills"] == 0 and before["worker_respawns"] == 0
    try:
        answer = requests.get(f"{out['endpoint']}/eat", params={"mb": 400}, timeout=60)
        assert answer.status_code >= 500  # the worker died under the request
    except requests.ConnectionError:
        pass
    counted = wait_for(lambda: (mlserve.jobs()[job]["oom_kills"] or 0) >= 1, timeout=20)
    assert counted, mlserve.jobs()[job]
    # The master notices the death within its next cycle, then starts the worker again.
    info = wait_for(lambda: (i := mlserve.json("info", job))["worker_respawns"] and i, timeout=20)
    assert info and info["oom_kills"] >= 1 and info["worker_respawns"] >= 1, mlserve.json("info", job)
    assert "oom kills:" in mlserve("info", job).stdout
    listing = mlserve("status").stdout
    assert "OOM KILLS" in listing and f"{job}: out of memory" in listing, listing
    # uWSGI started the worker again: the job keeps serving, in the rotation, never restarted for it.
    assert wait_for(lambda: requests.get(out["endpoint"], timeout=10).status_code == 200, timeout=20)
    assert requests.get(out["project_endpoint"], timeout=10).status_code == 200
    after = mlserve.jobs()[job]
    assert after["healthy"] and after["restarts"] == 0 and after["state"] == "running"
    assert wait_for(lambda: f"{job}: out of memory: the kernel killed" in _supervisor_log(mlserve), timeout=10), \
        _supervisor_log(mlserve)[-2000:]
