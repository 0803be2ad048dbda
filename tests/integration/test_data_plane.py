"""The data plane, end to end on the real engine, gateway and uWSGI: routing changes without reloads,
whole-segment endpoints, chunked uploads, the gateway's 504 first, and no replays of a request that
broke its worker."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.harness import wait_for

pytestmark = pytest.mark.integration

# Each instance names itself; /crash ends its worker mid-request; /sleep holds it.
APP = """
import os, time
from flask import Flask, jsonify, request

app = Flask(__name__)
print("\\x1b[2J\\x1b]0;pwned\\x07 loaded", flush=True)  # escape sequences, in the instance's log
SEEN = os.path.join(os.environ.get("OUTPUT_DIR", "/tmp"), "seen.log")


@app.route("/", methods=["GET", "POST"])
def hello():
    return jsonify(job=os.environ.get("MLSERVE_JOB"), bytes=len(request.get_data()))


@app.get("/crash")
def crash():
    with open(SEEN, "a") as seen:
        seen.write("crash\\n")
    os._exit(9)


@app.get("/steer")
def steer():
    # An app trying to make the gateway serve something else, and to claim another version.
    return "mine", 200, {"X-Accel-Redirect": request.args["to"], "X-Accel-Limit-Rate": "1",
                         "X-Mlserve-Version": "99"}


@app.get("/sleep")
def sleep():
    time.sleep(float(request.args["s"]))
    return jsonify(slept=True)
"""


@pytest.fixture
def app_dir(tmp_path) -> Path:
    folder = tmp_path / "plane"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "requirements.txt").write_text("flask\n")
    return folder


def _nginx_processes(home: Path) -> set[int]:
    master = int((home / "gateway" / "nginx.pid").read_text())
    children = {int(p) for p in os.listdir("/proc") if p.isdigit()
                and _parent(int(p)) == master}
    return {master} | children


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_scaling_never_reloads_and_a_keep_alive_client_loses_nothing(mlserve, app_dir):
    out = mlserve.json("run", "--mode", "serve", cwd=app_dir)
    processes = _nginx_processes(mlserve.home)
    failures: list[str] = []
    answered = [0]
    done = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=0))  # no retries: every error counts
            while not done.is_set():
                try:
                    answer = session.get(out["project_endpoint"], timeout=30)
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text[:100]}")
                    answered[0] += 1
                except requests.RequestException as exc:
                    failures.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for replicas in (3, 1, 2, 1):
            mlserve("scale", str(replicas), cwd=app_dir)
    finally:
        done.set()
        thread.join(timeout=60)
    assert failures == [], failures[:5]
    assert answered[0] > 100
    assert _nginx_processes(mlserve.home) == processes  # no reload: the same master and workers


def test_endpoints_match_whole_path_segments(mlserve, app_dir, tmp_path):
    mlserve("run", "--mode", "serve", "--project", "types", cwd=app_dir)
    mlserve("stop", "--project", "types")
    other = mlserve.json("run", "--mode", "serve", "--project", "other", cwd=app_dir)
    base = f"{mlserve.url}/serve/tester/projects"
    assert requests.get(f"{base}/types", timeout=10).status_code == 503  # known, nothing healthy
    answer = requests.get(f"{base}/types2", timeout=10)
    assert answer.status_code == 404 and answer.json() == {"error": "no such endpoint"}
    assert requests.get(f"{base}/other/x", timeout=10).status_code == 404  # the app's own 404
    assert requests.get(f"{base}/otherwise", timeout=10).json() == {"error": "no such endpoint"}
    assert requests.get(f"{mlserve.url}/serve/{other['id']}x", timeout=10).json() == {"error": "no such endpoint"}


def test_a_chunked_upload_reaches_the_app_whole(mlserve, app_dir):
    out = mlserve.json("run", "--mode", "serve", cwd=app_dir)
    blob = os.urandom(3 << 20)

    def chunks():
        for start in range(0, len(blob), 1 << 16):
            yield blob[start:start + (1 << 16)]

    answer = requests.post(out["endpoint"], data=chunks(), timeout=60)  # a generator: Transfer-Encoding: chunked
    assert answer.status_code == 200 and answer.json()["bytes"] == len(blob)


def test_a_request_over_the_timeout_gets_the_gateways_504_at_the_timeout(mlserve, app_dir):
    mlserve("gateway", "start", "--timeout", "3")
    out = mlserve.json("run", "--mode", "serve", cwd=app_dir)
    answer = requests.get(f"{out['endpoint']}/sleep?s=6", timeout=30)
    assert answer.status_code == 504, answer.text
    assert answer.json()["timeout_s"] == 3
    assert answer.elapsed.total_seconds() < 5.5  # the gateway's, not uWSGI's harakiri (8 s) after replays


def test_a_request_that_breaks_its_worker_is_not_sent_to_the_others(mlserve, app_dir):
    out = mlserve.json("run", "--mode", "serve", cwd=app_dir)
    mlserve("scale", "3", cwd=app_dir)
    answer = requests.get(f"{out['project_endpoint']}/crash", timeout=30)
    assert answer.status_code == 502 and answer.json()["error"]
    seen = [path for path in (mlserve.home / "output").glob("*/seen.log")]
    assert len(seen) == 1 and seen[0].read_text() == "crash\n"  # one instance saw it, once
    # Every instance stays in the rotation: the next requests all succeed.
    assert all(requests.get(out["project_endpoint"], timeout=10).status_code == 200 for _ in range(30))
    assert wait_for(lambda: all(j["healthy"] for j in mlserve.jobs().values()), timeout=10)


def test_an_apps_headers_do_not_steer_the_gateway(mlserve, app_dir):
    out = mlserve.json("run", "--mode", "serve", "--project", "steer", cwd=app_dir)
    other = mlserve.json("run", "--mode", "serve", "--project", "victim", cwd=app_dir)
    answer = requests.get(f"{out['endpoint']}/steer", params={"to": f"/serve/{other['id']}/"}, timeout=10)
    assert answer.status_code == 200 and answer.text == "mine"  # not the other job's answer
    assert "X-Accel-Redirect" not in answer.headers and "X-Accel-Limit-Rate" not in answer.headers
    assert answer.headers["X-Mlserve-Version"] == "1"  # the gateway's word, not the app's 99


def test_escape_sequences_in_an_apps_log_never_reach_the_terminal(mlserve, app_dir):
    out = mlserve.json("run", "--mode", "serve", cwd=app_dir)
    shown = wait_for(lambda: next((line for line in mlserve("logs", out["id"]).stdout.splitlines()
                                   if "loaded" in line), None), timeout=10)
    assert shown is not None and "\x1b" not in shown and "\x07" not in shown
    assert shown.endswith("\\x1b[2J\\x1b]0;pwned\\x07 loaded")  # shown escaped, as text
