"""Self-healing under load and faults (issue 3): kill -9, a hanging health path, scale down and stop, 20
concurrent commands, and (with --engine-restart) a restart of the Docker engine, each on a fresh mlserve
serving the fault tests' healing app, most under a GET load whose every failure counts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import requests
from results import BenchError, Result, one_line
from sandbox import COMMAND_TIMEOUT_S, sandbox

from mlserve.constants import LABEL_JOB
from tests.harness import (
    REPO,
    Load,
    Mlserve,
    job_container,
    labelled_containers,
    project_pools,
    routed_jobs,
    seconds_until,
    served_jobs,
)

HEALING_APP = REPO / "tests" / "integration" / "apps" / "healing"  # the app the fault tests use
LOAD_LIMIT_S = 90  # no load runs longer than this, whatever happens
REQUEST_TIMEOUT_S = 65

Scenario = Callable[[docker.DockerClient, Mlserve, Path], list[Result]]


def load_on(url: str) -> Load:
    """The load of every scenario: 4 threads of sequential GETs, bounded in time."""
    return Load(url, timeout=REQUEST_TIMEOUT_S, limit=LOAD_LIMIT_S)


def failed_requests(name: str, load: Load) -> Result:
    return Result(name, len(load.failures), "requests", "0", not load.failures, load.describe())


def deploy(ms: Mlserve, app: Path, replicas: int) -> dict[str, Any]:
    """`run` then `scale N`; returns run's JSON once every job is healthy."""
    out = ms.json("run", "--mode", "serve", cwd=app, timeout=900)
    if replicas > 1:
        ms("scale", str(replicas), cwd=app)
    if seconds_until(lambda: (jobs := ms.jobs()) and len(jobs) == replicas
                     and all(j["healthy"] for j in jobs.values()), timeout=60) is None:
        raise BenchError(f"{replicas} healthy jobs expected, status says: {ms.jobs()}")
    return out


def kill_9_one_of_three(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = deploy(ms, app, 3)
    container = job_container(client, ms.home, out["id"])
    if container is None:
        raise BenchError(f"no container labelled with job {out['id']}")
    with load_on(out["project_endpoint"]) as load:
        time.sleep(2)
        container.kill(signal="SIGKILL")
        back = seconds_until(lambda: (j := ms.jobs()[out["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
        time.sleep(2)
    served = served_jobs(out["project_endpoint"], 12)
    return [
        failed_requests("(a) kill -9 of 1 of 3 instances under GET load: failed requests", load),
        Result("(a) ... seconds until the killed job is healthy again", back, "s", "<= 15", back is not None and back <= 15,
               "restarts >= 1 and healthy in `mlserve status --json`; "
               + ("back in the project's round robin" if out["job"] in served else "NOT served by the project endpoint after")),
    ]


def hanging_health_path(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    sick = deploy(ms, app, 2)
    answer = requests.post(sick["endpoint"] + "/sick", timeout=10)
    if answer.json() != {"sick": True}:
        raise BenchError(f"POST /sick answered {answer.status_code} {answer.text[:200]}")
    started = time.monotonic()
    seen: dict[str, float] = {}
    with load_on(sick["project_endpoint"]) as load:
        while time.monotonic() - started < 75 and "back" not in seen:
            job = ms.jobs()[sick["job"]]
            routed = sick["id"] in project_pools(ms.routes())
            now = time.monotonic() - started
            if "unhealthy" not in seen and not job["healthy"]:
                seen["unhealthy"] = now
            if "unrouted" not in seen and not routed:
                seen["unrouted"] = now
            if "unrouted" in seen and job["healthy"] and job["restarts"] >= 1 and routed:
                seen["back"] = now
            time.sleep(0.25)
        time.sleep(1)
    out_s = max(seen["unhealthy"], seen["unrouted"]) if "unhealthy" in seen and "unrouted" in seen else None
    back_s = seen.get("back")
    return [
        Result("(b) health path hangs: seconds until out of rotation", out_s, "s", "<= 10", out_s is not None and out_s <= 10,
               f"`healthy` false after {seen.get('unhealthy', float('nan')):.1f}s, gone from the project upstream "
               f"after {seen.get('unrouted', float('nan')):.1f}s (from POST /sick)"),
        Result("(b) ... seconds until restarted and back in rotation", back_s, "s", "-", back_s is not None,
               "restarts >= 1, healthy, in the project upstream again"),
        failed_requests("(b) ... failed requests on the project endpoint meanwhile", load),
    ]


def scale_down_and_stop(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = deploy(ms, app, 3)
    with load_on(out["project_endpoint"]) as load:
        time.sleep(1)
        down, _ = ms.timed("scale", "1", cwd=app)
        time.sleep(1)
        remaining = list(ms.jobs())
        ms("scale", "--add", "1", cwd=app)
        stop, _ = ms.timed("stop", remaining[0])
        time.sleep(1)
    left = len(ms.jobs())
    return [failed_requests("(c) scale 3 -> 1, scale --add 1, stop the older job, under GET load: failed requests", load),
            Result("(c) ... seconds for scale 3 -> 1 / for stop (draining included)", down, "s", "-", None,
                   f"stop took {stop:.2f}s; {left} job(s) left (1 expected)")]


def twenty_concurrent_commands(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    deploy(ms, app, 1)
    commands = [["scale", str(n % 4 + 1)] if n % 3 else ["run", "--mode", "serve"] for n in range(20)]
    started = time.monotonic()
    procs = [ms.start(*args, cwd=app) for args in commands]
    failures = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=max(1, COMMAND_TIMEOUT_S * 2 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"   mlserve {' '.join(args)} exited {proc.returncode}:\n{err[-1500:]}", flush=True)
            failures.append(f"{' '.join(args)}: {err.strip().splitlines()[-1:] if err.strip() else proc.returncode}")
    wall = time.monotonic() - started

    def agreement() -> tuple[bool, str]:
        jobs = ms.json("status")
        ids = {j["id"] for j in jobs}
        containers = labelled_containers(client, ms.home)
        labelled = {c.labels.get(LABEL_JOB) for c in containers}
        routes = ms.routes()
        routed = routed_jobs(routes)
        in_project = {i for i in ids if i in project_pools(routes)}
        healthy = {j["id"] for j in jobs if j["healthy"]}
        numbers = [int(j["job"].rsplit("/", 1)[1]) for j in ms.json("status", "--all")]
        ok = (ids == labelled == routed and in_project == healthy == ids
              and all(c.status == "running" for c in containers) and len(numbers) == len(set(numbers)))
        text = (f"{len(ids)} jobs in the state, {len(labelled)} labelled containers "
                f"({sum(c.status == 'running' for c in containers)} running), {len(routed)} job routes, "
                f"{len(in_project)} in the project upstream, {len(healthy)} healthy, "
                f"{sum(j['runtime'] != 'docker' for j in jobs)} not on Docker; job numbers unique: "
                f"{len(numbers) == len(set(numbers))}")
        return ok, text

    agree, text = agreement()
    settled = seconds_until(lambda: agreement()[0], timeout=30, interval=1) if not agree else 0.0
    if not agree:
        text += f"; after {settled:.0f}s more: agree" if settled is not None else "; still not after 30 s: " + agreement()[1]
    return [
        Result("(d) 20 concurrent scale/run on one project: wall time", wall, "s", "-", None,
               f"{len(procs) - len(failures)} of 20 commands exited 0" + (f"; {failures[:2]}" if failures else "")),
        Result("(d) ... commands that failed", len(failures), "commands", "0", not failures),
        Result("(d) ... state, labelled containers and gateway routes agree right after", float(agree), "yes/no", "yes",
               agree, text),
    ]


def engine_restart(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = deploy(ms, app, 2)
    pid = int(Path("/var/run/docker.pid").read_text())
    stopping = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if seconds_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=90) is None:
        raise BenchError(f"dockerd {pid} did not exit within 90 s of SIGTERM")
    down = time.monotonic() - stopping
    start = subprocess.run([sys.executable, "-c", "from mlserve import host; host.ensure_engine(print)"],
                           capture_output=True, text=True, timeout=180, check=False)
    if start.returncode != 0:
        raise BenchError(f"the engine did not start again:\n{start.stdout}\n{start.stderr}")
    up = time.monotonic()

    def all_back() -> bool:
        jobs = ms.jobs()
        return len(jobs) == 2 and all(j["healthy"] and j["restarts"] >= 1 for j in jobs.values())

    routes = seconds_until(lambda: requests.get(out["project_endpoint"], timeout=5).status_code == 200, timeout=120)
    healthy = None
    if seconds_until(all_back, timeout=max(1, 120 - (time.monotonic() - up)), interval=0.5) is not None:
        healthy = time.monotonic() - up
    endpoint = requests.get(out["endpoint"], timeout=10).status_code
    jobs = ms.jobs()
    return [
        Result("(e) Docker engine restart: seconds until the project endpoint answers 200", routes, "s", "-",
               routes is not None, f"from the engine answering again; dockerd took {down:.1f}s to stop and "
               f"{up - stopping - down:.1f}s to start"),
        Result("(e) ... seconds until every job is healthy again", healthy, "s", "-", healthy is not None,
               f"restarts: {[j['restarts'] for j in jobs.values()]}; the job endpoint answers {endpoint}"),
    ]


def self_healing(client: docker.DockerClient, work: Path, with_engine_restart: bool) -> list[Result]:
    """The self-healing section: every scenario runs, whether one before it failed or not."""
    healing = work / "healing"
    shutil.copytree(HEALING_APP, healing)
    with sandbox() as warm:
        warm("run", "--mode", "serve", cwd=healing, timeout=900)  # builds the image once (flask from PyPI)
    scenarios: list[Scenario] = [kill_9_one_of_three, hanging_health_path, scale_down_and_stop,
                                 twenty_concurrent_commands]
    if with_engine_restart:
        scenarios.append(engine_restart)
    results: list[Result] = []
    for scenario in scenarios:
        started = time.monotonic()
        print(f"-- {scenario.__name__}", flush=True)
        with sandbox() as ms:
            try:
                results += scenario(client, ms, healing)
            except Exception as exc:  # noqa: BLE001 - one scenario failing must not lose the others' numbers
                traceback.print_exc()
                results.append(Result(f"{scenario.__name__} (did not complete)", None, "", "-", False, one_line(exc)))
            finally:
                if scenario is engine_restart:
                    client = docker.from_env()  # the old client's connections died with the engine
        print(f"   {time.monotonic() - started:.0f}s", flush=True)
    return results
