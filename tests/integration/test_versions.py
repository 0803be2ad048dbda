"""Versions and traffic on the real engine and gateway: every `run` is a numbered version with its own
endpoint; the project endpoint splits its traffic by job (equal turns) or by version (shares, canaries,
sticky cookies), falls back to a fallback version when no primary can serve, and says in
X-Mlserve-Version which version answered; `run --replace` swaps versions under load and changes nothing
when the new one never gets healthy; bad input changes nothing.

Every project here is the same small app (its image is built once and then cached): it says which
version and job it is from MLSERVE_VERSION and MLSERVE_JOB, so answers can be told apart.
`mlserve.yml` is kept out of the image (.mlserveignore), so a version's health path or a broken
environment differ by configuration only, on the same image. Loads go to loopback only and stop by
themselves."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.harness import Load, home_images, job_container, labelled_containers, wait_for

pytestmark = pytest.mark.integration

HEADER = "X-Mlserve-Version"

APP = '''\
import json
import os

if os.environ.get("MLSERVE_JOB") and os.environ.get("VERAPP_BREAK"):
    raise RuntimeError("verapp: the model file is corrupt")  # only inside an instance, not at the build's check

SICK = os.path.join(os.environ.get("OUTPUT_DIR") or "/tmp", "sick")  # /output outlives restarts


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    status = "200 OK"
    headers = [("Content-Type", "application/json")]
    if path == "/never-healthy" or (path == "/health" and os.path.exists(SICK)):
        status = "503 Service Unavailable"
    elif path == "/sick" and environ["REQUEST_METHOD"] == "POST":
        open(SICK, "w").close()
    elif path == "/spoof":
        headers += [("X-Mlserve-Version", "999"), ("x-mlserve-version", "998")]
    body = json.dumps({
        "job": os.environ.get("MLSERVE_JOB"), "version": int(os.environ.get("MLSERVE_VERSION") or 0),
        "script_name": environ.get("SCRIPT_NAME"), "path_info": path,
    }).encode()
    headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]
'''

HEALTH_PATH = "health:\n  path: /health\n"


def make_app(folder: Path, config: str | None = None) -> Path:
    """The versioned app in ``folder`` (its name is the project's), with ``config`` as its mlserve.yml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP)
    (folder / ".mlserveignore").write_text("mlserve.yml\n")
    if config is not None:
        (folder / "mlserve.yml").write_text(config)
    return folder


# -- clients -----------------------------------------------------------------------------------


def _session() -> requests.Session:
    """One keep-alive connection, never retried: every failure shows."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(max_retries=0))
    return session


def answered(answer: requests.Response) -> int:
    """The version that answered, as the gateway says it; checked against what the app itself says."""
    assert answer.status_code == 200, (answer.status_code, answer.text[:200])
    said = answer.raw.headers.getlist(HEADER)
    body = answer.json()
    assert said == [str(body["version"])], f"{HEADER}: {said} on an answer of version {body['version']} ({body['job']})"
    return body["version"]


def versions_of(url: str, n: int, session: requests.Session | None = None) -> collections.Counter[int]:
    """How many of ``n`` GETs on one keep-alive connection each version answered."""
    with contextlib.ExitStack() as stack:
        client = session or stack.enter_context(_session())
        return collections.Counter(answered(client.get(url, timeout=10)) for _ in range(n))


def versions_in_parallel(url: str, n: int, threads: int = 4) -> collections.Counter[int]:
    """Like versions_of, with ``n`` GETs spread over ``threads`` connections (so over the gateway's workers)."""
    with ThreadPoolExecutor(threads) as pool:
        counts = pool.map(lambda count: versions_of(url, count), [n // threads] * threads)
    return sum(counts, collections.Counter())


def jobs_of(url: str, n: int) -> collections.Counter[str]:
    """How many of ``n`` GETs on one keep-alive connection each job answered."""
    with _session() as session:
        jobs: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            answer = session.get(url, timeout=10)
            answered(answer)
            jobs[answer.json()["job"]] += 1
        return jobs


class CheckedVersionLoad(Load):
    """A Load (the harness's: GETs from a few threads, every failure counted) that also checks every
    answer's X-Mlserve-Version against the version the app says it is in its body (a mismatch, or the
    header twice, is a failure), and keeps when each answer began (seconds into the load) with the
    version that gave it. Stricter than the harness's VersionLoad, which takes the header's word."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.answers: list[tuple[float, int]] = []

    def judge(self, answer: requests.Response) -> str | None:
        if answer.status_code != 200:
            return f"{answer.status_code} {answer.text[:120].strip()}"
        version = answer.json()["version"]
        said = answer.raw.headers.getlist(HEADER)
        return None if said == [str(version)] else f"{HEADER} {said} from version {version}"

    def note(self, began: float, ended: float, answer: requests.Response | None, failure: str | None) -> None:
        if answer is not None and not failure:
            self.answers.append((began - self.started, answer.json()["version"]))

    def since(self, at: float) -> collections.Counter[int]:
        """Versions of the answers that began ``at`` (time.monotonic()) or later."""
        offset = at - self.started
        with self._lock:
            return collections.Counter(v for began, v in self.answers if began >= offset)


class Wrk:
    """wrk on keep-alive connections in the background until stopped (SIGINT: it prints its totals).
    wrk never retries anything."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.output = ""
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Wrk:
        self.process = subprocess.Popen(["wrk", "-t1", "-c4", "-d300s", "--timeout", "30s", self.url],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.output, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()

    def counts(self) -> tuple[int, int, int]:
        """Requests completed, "Non-2xx or 3xx responses", and socket errors of every kind."""
        total = re.search(r"(\d+) requests in", self.output)
        assert total, f"wrk printed no request count:\n{self.output}"
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", self.output)
        sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", self.output)
        return (int(total[1]), int(non_2xx[1]) if non_2xx else 0,
                sum(map(int, sockets.groups())) if sockets else 0)


@contextlib.contextmanager
def maybe_wrk(url: str) -> Iterator[Wrk | None]:
    if shutil.which("wrk") is None:  # `mlserve setup` installs it; without it the Session loads still run
        yield None
        return
    with Wrk(url) as wrk:
        yield wrk


# -- the record, as the commands show it -------------------------------------------------------


def split_of(ms, project: str) -> dict[int, dict[str, Any]]:
    """`traffic P --json` by version."""
    return {row["version"]: row for row in ms.json("traffic", project)}


def picture(ms, client, project: str) -> dict[str, Any]:
    """Everything a command that changes nothing must leave as it was."""
    return {
        "versions": ms.json("versions", project),
        "traffic": ms.json("traffic", project),
        "jobs": [(j["job"], j["id"], j["version"], j["fallback"], j["state"], j["healthy"], j["restarts"])
                 for j in ms.json("status", "--all")],
        "routes": ms.routes(),
        "containers": sorted(c.id for c in labelled_containers(client, ms.home)),
        "images": home_images(client, ms.home),
    }


def get(url: str) -> requests.Response:
    with _session() as session:
        return session.get(url, timeout=10)


# -- versions, their endpoints, the header ------------------------------------------------------


def test_every_run_is_a_new_version_with_its_own_endpoint_and_the_header(mlserve, tmp_path):
    folder = make_app(tmp_path / "vnum")
    first = mlserve.json("run", "--mode", "serve", cwd=folder)
    key = "tester/projects/vnum"
    project = f"{mlserve.url}/serve/{key}"
    assert (first["job"], first["version"]) == (f"{key}/1", 1)
    assert first["project_endpoint"] == project and first["version_endpoint"] == f"{project}/v/1"
    assert first["replaced"] == [] and [j["job"] for j in first["jobs"]] == [first["job"]]
    mlserve("scale", "2", cwd=folder)  # copies version 1
    second = mlserve.json("run", "--mode", "serve", cwd=folder)
    assert (second["job"], second["version"], second["version_endpoint"]) == (f"{key}/3", 2, f"{project}/v/2")

    jobs = mlserve.json("status")
    assert [(j["job"], j["version"], j["fallback"], j["healthy"]) for j in jobs] == [
        (f"{key}/1", 1, False, True), (f"{key}/2", 1, False, True), (f"{key}/3", 2, False, True)]
    listed = mlserve.json("versions", cwd=folder)
    assert [(v["version"], v["jobs"], v["healthy"], v["percent"], v["now"], v["fallback"], v["endpoint"])
            for v in listed] == [(1, 2, 2, 66.7, 66.7, False, f"{project}/v/1"),
                                 (2, 1, 1, 33.3, 33.3, False, f"{project}/v/2")]
    assert {v["image"] for v in listed} == {first["build"]["image"]}
    assert listed[0]["created"] <= listed[1]["created"]
    table = mlserve("versions", "vnum").stdout
    assert re.search(r"^1 .*2/2 .*66\.7%", table, re.M) and re.search(r"^2 .*1/1 .*33\.3%", table, re.M), table

    # No shares set: every healthy job takes an equal turn, whatever its version.
    turns = jobs_of(project, 300)
    assert set(turns) == {f"{key}/1", f"{key}/2", f"{key}/3"}, turns
    assert all(85 <= n <= 115 for n in turns.values()), turns

    # A version's endpoint: its own jobs only, under its own prefix.
    with _session() as session:
        at_v1 = [session.get(f"{project}/v/1", timeout=10) for _ in range(20)]
        assert {answered(a) for a in at_v1} == {1}
        assert {a.json()["job"] for a in at_v1} == {f"{key}/1", f"{key}/2"}  # round robin over both
        assert {(a.json()["script_name"], a.json()["path_info"]) for a in at_v1} == {(f"/serve/{key}/v/1", "/")}
        deep = session.get(f"{project}/v/2/a/b?x=1", timeout=10)
        assert answered(deep) == 2
        assert (deep.json()["script_name"], deep.json()["path_info"]) == (f"/serve/{key}/v/2", "/a/b")
        at_project = session.get(f"{project}/x", timeout=10).json()
        assert (at_project["script_name"], at_project["path_info"]) == (f"/serve/{key}", "/x")
    for unknown in ("/v/3", "/v/3/x", "/v/99"):
        answer = get(project + unknown)
        assert answer.status_code == 404 and answer.headers["Content-Type"] == "application/json", unknown
        assert answer.json()["error"] == "no such version", unknown

    # The app cannot claim another version: its own X-Mlserve-Version (in any case) never reaches the client.
    for url in (f"{project}/spoof", f"{project}/v/1/spoof", f"{project}/v/2/spoof"):
        for _ in range(3):
            answered(get(url))  # exactly one header, the real version
    for job in jobs:
        answer = get(f"{job['endpoint']}/spoof")
        assert answer.status_code == 200 and answer.raw.headers.getlist(HEADER) == [str(job["version"])], job
    # An app's own error answer says which version gave it too.
    for url, version in ((f"{project}/v/2/never-healthy", 2), (f"{project}/v/1/never-healthy", 1)):
        answer = get(url)
        assert (answer.status_code, answer.json()["version"]) == (503, version), answer.text
        assert answer.raw.headers.getlist(HEADER) == [str(version)], dict(answer.headers)

    # A known version without a serving job: 503 at its endpoint; the project endpoint goes on without it.
    mlserve("stop", second["job"])
    gone = get(f"{project}/v/2")
    assert gone.status_code == 503 and gone.headers["Retry-After"], gone.text
    assert gone.json()["error"] == "version has no serving job" and gone.json()["version"] == 2
    assert get(f"{project}/v/3").status_code == 404
    assert versions_of(project, 20) == {1: 20}
    assert [(v["version"], v["jobs"]) for v in mlserve.json("versions", cwd=folder)] == [(1, 2), (2, 0)]

    # Numbers are never reused: the next run is version 3, even though version 2 has no job.
    third = mlserve.json("run", "--mode", "serve", cwd=folder)
    assert third["version"] == 3
    assert versions_of(f"{project}/v/3", 5) == {3: 5}
    assert set(versions_of(project, 30)) == {1, 3}


# -- shares: canary, --to, sticky, --to-latest, --by-jobs, scale ---------------------------------


def test_canary_shares_sticky_cookie_and_scale_by_version(mlserve, tmp_path):
    folder = make_app(tmp_path / "vcanary", HEALTH_PATH)
    first = mlserve.json("run", "--mode", "serve", cwd=folder)
    project = first["project_endpoint"]
    canary = mlserve.json("run", "--mode", "serve", "--canary", "10", cwd=folder)
    assert canary["version"] == 2 and len(canary["jobs"]) == 1
    assert mlserve.json("traffic", "vcanary") == [
        {"version": 1, "percent": 90.0, "jobs": 1, "healthy": 1, "fallback": False, "now": 90.0},
        {"version": 2, "percent": 10.0, "jobs": 1, "healthy": 1, "fallback": False, "now": 10.0},
    ]
    counts = versions_in_parallel(project, 2400)
    assert sum(counts.values()) == 2400 and set(counts) == {1, 2}, counts
    assert 0.08 * 2400 <= counts[2] <= 0.12 * 2400, counts

    # --to: whole percents per version, live at once.
    shares = mlserve.json("traffic", "vcanary", "--to", "1=70", "--to", "2=30")
    assert [(v["version"], v["percent"], v["now"]) for v in shares] == [(1, 70.0, 70.0), (2, 30.0, 30.0)]
    counts = versions_in_parallel(project, 1000)
    assert 0.25 * 1000 <= counts[2] <= 0.35 * 1000, counts

    # Sticky: the first answer sets a cookie naming its version, and the client stays there.
    mlserve("traffic", "vcanary", "--to", "1=50", "--to", "2=50", "--sticky")
    with _session() as client:
        first_answer = client.get(project, timeout=10)
        version = answered(first_answer)
        cookie = first_answer.headers.get("Set-Cookie", "")
        assert cookie.startswith(f"mlserve_version={version};"), cookie
        assert "Path=/serve/tester/projects/vcanary" in cookie, cookie
        later = [client.get(project, timeout=10) for _ in range(30)]
        assert {answered(a) for a in later} == {version}
        assert not any("Set-Cookie" in a.headers for a in later)
        # Other clients (no cookie) are spread over both versions, each told its own.
        chosen = set()
        for _ in range(10):
            client.cookies.clear()
            fresh = client.get(project, timeout=10)
            assert fresh.headers["Set-Cookie"].startswith(f"mlserve_version={answered(fresh)};")
            chosen.add(answered(fresh))
        assert chosen == {1, 2}
    for wanted in (1, 2):
        with _session() as client:
            client.cookies.set("mlserve_version", str(wanted))
            assert versions_of(project, 20, client) == {wanted: 20}
    with _session() as client:  # a cookie naming no version that takes traffic: a new choice, and a new cookie
        client.cookies.set("mlserve_version", "7")
        answer = client.get(project, timeout=10)
        assert answer.headers["Set-Cookie"].startswith(f"mlserve_version={answered(answer)};")
    mlserve("traffic", "vcanary", "--no-sticky")
    with _session() as client:
        client.cookies.set("mlserve_version", "1")
        answers = [client.get(project, timeout=10) for _ in range(20)]
        assert {answered(a) for a in answers} == {1, 2}
        assert not any("Set-Cookie" in a.headers for a in answers)

    # --to-latest: all of it to version 2; version 1 (0%) keeps running and answers at its endpoint.
    assert mlserve.json("traffic", "vcanary", "--to-latest") == [
        {"version": 1, "percent": 0.0, "jobs": 1, "healthy": 1, "fallback": False, "now": 0.0},
        {"version": 2, "percent": 100.0, "jobs": 1, "healthy": 1, "fallback": False, "now": 100.0},
    ]
    assert versions_in_parallel(project, 200) == {2: 200}
    assert versions_of(f"{project}/v/1", 5) == {1: 5}
    assert [j["version"] for j in mlserve.json("status")] == [1, 2]

    # --by-jobs: equal turns per job again; scale --version scales that version alone.
    by_jobs = mlserve.json("traffic", "vcanary", "--by-jobs")
    assert [(v["version"], v["percent"]) for v in by_jobs] == [(1, 50.0), (2, 50.0)]
    out = mlserve("scale", "2", "--version", "1", cwd=folder).stdout
    assert "3 serving job(s)" in out
    assert sorted(j["version"] for j in mlserve.json("status")) == [1, 1, 2]
    assert [(v["version"], v["jobs"], v["percent"]) for v in mlserve.json("traffic", "vcanary")] == [
        (1, 2, 66.7), (2, 1, 33.3)]
    counts = versions_of(project, 300)
    assert 170 <= counts[1] <= 230, counts

    # Plain scale copies the version with the most traffic, and scales down the smallest share first.
    mlserve("traffic", "vcanary", "--to", "1=20", "--to", "2=80")
    mlserve("scale", "4", cwd=folder)
    assert sorted(j["version"] for j in mlserve.json("status")) == [1, 1, 2, 2]
    mlserve("scale", "2", cwd=folder)
    assert [j["version"] for j in mlserve.json("status")] == [2, 2]
    assert get(f"{project}/v/1").status_code == 503
    # Version 1 keeps its share with no job: its share goes to the others.
    assert [(v["version"], v["jobs"], v["percent"], v["now"]) for v in mlserve.json("traffic", "vcanary")] == [
        (1, 0, 20.0, 0.0), (2, 2, 80.0, 100.0)]
    assert versions_of(project, 50) == {2: 50}
    mlserve("scale", "1", "--version", "1", cwd=folder)
    counts = versions_of(project, 300)
    assert 40 <= counts[1] <= 80 and counts[1] + counts[2] == 300, counts

    # A version whose jobs are all unhealthy takes nothing: its share goes to the others.
    assert requests.post(f"{project}/v/1/sick", timeout=10).json()["version"] == 1
    assert wait_for(lambda: split_of(mlserve, "vcanary")[1]["healthy"] == 0, timeout=30), split_of(mlserve, "vcanary")
    # The record says so first, then the gateway is told (routes.json is written once it took the table).
    assert wait_for(lambda: [p["version"] for p in mlserve.routes()["projects"]["tester/projects/vcanary"]["pools"]]
                    == [2], timeout=10, ignore=(ValueError,)), mlserve.routes()
    split = split_of(mlserve, "vcanary")
    assert (split[1]["jobs"], split[1]["percent"], split[1]["now"]) == (1, 20.0, 0.0)
    assert (split[2]["percent"], split[2]["now"]) == (80.0, 100.0)
    assert versions_in_parallel(project, 200) == {2: 200}
    sick = get(f"{project}/v/1")
    assert sick.status_code == 503 and sick.json()["error"] == "version has no healthy job"


# -- run --replace -------------------------------------------------------------------------------


def test_replace_under_load_loses_no_request(mlserve, tmp_path, docker_client):
    folder = make_app(tmp_path / "vrepl")
    first = mlserve.json("run", "--mode", "serve", cwd=folder)
    mlserve("scale", "2", cwd=folder)
    old = {j["job"] for j in mlserve.json("status")}
    project = first["project_endpoint"]
    with CheckedVersionLoad(project, limit=120) as load, \
            CheckedVersionLoad(project, threads=2, retries=False, limit=120) as strict, maybe_wrk(project) as wrk:
        time.sleep(1)
        replaced = mlserve.json("run", "--mode", "serve", "--replace", cwd=folder)
        done = time.monotonic()
        time.sleep(1.5)
    assert load.failures == [], load.describe()
    assert strict.failures == [], strict.describe()
    assert load.ok > 50 and strict.ok > 20, (load.describe(), strict.describe())
    if wrk is not None:
        total, non_2xx, socket_errors = wrk.counts()
        assert (non_2xx, socket_errors) == (0, 0) and total > 50, wrk.output
    # Version 1 answered before, and only version 2 once the command returned.
    assert load.since(load.started)[1] > 0 and strict.since(strict.started)[1] > 0
    after = load.since(done) + strict.since(done)
    assert set(after) == {2} and after[2] > 10, after

    assert replaced["version"] == 2 and len(replaced["jobs"]) == 2 and set(replaced["replaced"]) == old
    jobs = mlserve.json("status")
    assert sorted((j["version"], j["healthy"]) for j in jobs) == [(2, True), (2, True)]
    assert {j["id"] for j in replaced["jobs"]} == {j["id"] for j in jobs}
    running = labelled_containers(docker_client, mlserve.home, stopped=False)
    assert len(running) == 2
    assert [(v["version"], v["jobs"]) for v in mlserve.json("versions", cwd=folder)] == [(1, 0), (2, 2)]
    assert {row["job"]: row["state"] for row in mlserve.json("status", "--all")} == {
        **{name: "stopped" for name in old}, **{j["job"]: "running" for j in jobs}}
    assert versions_of(project, 30) == {2: 30}
    assert get(f"{project}/v/1").status_code == 503


@pytest.mark.parametrize("config, start_timeout, expected", [
    # Its instances exit at once: the start timeout is never reached.
    ('env_vars:\n  VERAPP_BREAK: "1"\n', 120, ["it exited", "verapp: the model file is corrupt"]),
    # Its instances run, and their health path fails until the start timeout.
    ("health:\n  path: /never-healthy\n", 8, ["no answer in 8s", "GET /never-healthy -> 503"]),
], ids=["import-error", "never-healthy"])
def test_replace_by_a_version_that_never_gets_healthy_changes_nothing(mlserve, tmp_path, docker_client, config,
                                                                      start_timeout, expected):
    good = make_app(tmp_path / "vbroken")
    first = mlserve.json("run", "--mode", "serve", cwd=good)
    mlserve("scale", "2", cwd=good)
    before = picture(mlserve, docker_client, "vbroken")
    # The same app and image; only its configuration (outside the image) breaks the new version.
    broken = make_app(tmp_path / "broken", config)
    project = first["project_endpoint"]
    with CheckedVersionLoad(project, limit=120) as load:
        time.sleep(0.5)
        result = mlserve("run", "--mode", "serve", "--replace", "--project", "vbroken", cwd=broken, check=False,
                         env={"MLSERVE_START_TIMEOUT": str(start_timeout)})
        time.sleep(0.5)
    assert result.returncode != 0, result.stdout
    assert re.search(r"tester/projects/vbroken/[34] did not become healthy", result.stderr), result.stderr
    assert "Last log lines" in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("Last log lines")[0]

    # The old jobs served all along, untouched; no version, job, container or route of the new one is left.
    assert load.failures == [], load.describe()
    assert load.ok > 20 and set(load.since(load.started)) == {1}, load.describe()
    assert picture(mlserve, docker_client, "vbroken") == before
    assert [v["version"] for v in mlserve.json("versions", "vbroken")] == [1]
    assert get(f"{project}/v/2").status_code == 404
    assert versions_of(project, 20) == {1: 20}


def test_a_canary_that_never_gets_healthy_changes_nothing(mlserve, tmp_path, docker_client):
    good = make_app(tmp_path / "vcanfail")
    mlserve("run", "--mode", "serve", cwd=good)
    mlserve("traffic", "vcanfail", "--to-latest")  # shares set: the canary would change them
    before = picture(mlserve, docker_client, "vcanfail")
    broken = make_app(tmp_path / "broken", 'env_vars:\n  VERAPP_BREAK: "1"\n')
    result = mlserve("run", "--mode", "serve", "--canary", "30", "--project", "vcanfail", cwd=broken, check=False,
                     env={"MLSERVE_START_TIMEOUT": "20"})
    assert result.returncode != 0 and "verapp: the model file is corrupt" in result.stderr, result.stderr
    assert picture(mlserve, docker_client, "vcanfail") == before
    assert mlserve.json("traffic", "vcanfail")[0]["percent"] == 100.0


# -- fallback ----------------------------------------------------------------------------------


def test_fallback_takes_over_when_every_primary_dies_and_hands_back(mlserve, tmp_path, docker_client):
    folder = make_app(tmp_path / "vfall")
    first = mlserve.json("run", "--mode", "serve", cwd=folder)
    mlserve("scale", "2", cwd=folder)
    fallback = mlserve.json("run", "--mode", "serve", "--fallback", cwd=folder)
    project = first["project_endpoint"]
    assert fallback["version"] == 2
    jobs = mlserve.json("status")
    assert [(j["version"], j["fallback"]) for j in jobs] == [(1, False), (1, False), (2, True)]
    assert mlserve.json("traffic", "vfall") == [
        {"version": 1, "percent": 100.0, "jobs": 2, "healthy": 2, "fallback": False, "now": 100.0},
        {"version": 2, "percent": 0.0, "jobs": 1, "healthy": 1, "fallback": True, "now": 0.0},
    ]
    assert versions_in_parallel(project, 200) == {1: 200}
    assert versions_of(f"{project}/v/2", 5) == {2: 5}

    # kill -9 of every primary under load: nothing fails, the fallback answers, the primaries come back
    # (the supervisor restarts them) and take the traffic again.
    primaries = [j for j in jobs if j["version"] == 1]
    with CheckedVersionLoad(project, limit=120) as load:
        time.sleep(1)
        for job in primaries:
            job_container(docker_client, mlserve.home, job["id"]).kill(signal="SIGKILL")
        killed = time.monotonic()
        back = wait_for(lambda: all(j["healthy"] and j["restarts"] >= 1
                                    for j in mlserve.json("status") if j["version"] == 1), timeout=90, interval=0.5)
        assert back, mlserve("status").stdout
        returned = wait_for(lambda: versions_of(project, 20) == {1: 20}, timeout=30)
        assert returned, versions_of(project, 20)
        settled = time.monotonic()
        time.sleep(1)
    assert load.failures == [], load.describe()
    assert load.since(killed)[2] > 0, f"the fallback never answered: {load.since(killed)}"
    assert load.since(settled + 0.5) and set(load.since(settled + 0.5)) == {1}, load.since(settled)
    assert split_of(mlserve, "vfall")[2]["now"] == 0.0

    # No primary at all (stopped): the fallback serves, and says so; plain scale has nothing to copy.
    with CheckedVersionLoad(project, limit=120) as load:
        time.sleep(0.5)
        mlserve("stop", *[j["job"] for j in primaries])
        stopped = time.monotonic()
        time.sleep(1)
    assert load.failures == [], load.describe()
    assert set(load.since(stopped)) == {2}, load.since(stopped)
    assert mlserve.json("traffic", "vfall") == [
        {"version": 2, "percent": 0.0, "jobs": 1, "healthy": 1, "fallback": True, "now": 100.0}]
    assert "the fallback is serving" in mlserve("traffic", "vfall").stdout
    assert get(f"{project}/v/1").status_code == 503
    refused = mlserve("scale", "1", cwd=folder, check=False)
    assert refused.returncode != 0 and "--version 2" in refused.stderr, refused.stderr

    # Primaries back: the traffic returns to them.
    with CheckedVersionLoad(project, limit=120) as load:
        time.sleep(0.5)
        mlserve("scale", "2", "--version", "1", cwd=folder)
        scaled = time.monotonic()
        time.sleep(1)
    assert load.failures == [], load.describe()
    assert set(load.since(scaled)) == {1}, load.since(scaled)
    assert [(v["version"], v["healthy"], v["now"]) for v in mlserve.json("traffic", "vfall")] == [
        (1, 2, 100.0), (2, 1, 0.0)]


@pytest.mark.parametrize("split", ["equal-turns", "canary"])
def test_kill_9_of_a_versions_only_job_under_load_loses_no_request(mlserve, tmp_path, docker_client, split):
    """Two runs make two versions of one job each. A request whose instance cannot be reached is passed to
    another one (README, Retries), and a version whose jobs are all unhealthy takes nothing: so killing
    one version's only instance must lose no request, as killing one of two jobs of one version does."""
    folder = make_app(tmp_path / "vkill")
    first = mlserve.json("run", "--mode", "serve", cwd=folder)
    second = mlserve.json("run", "--mode", "serve", *(["--canary", "20"] if split == "canary" else []), cwd=folder)
    victim = second if split == "canary" else first  # the canary dies; or the older of two equal versions
    survivor = 1 if victim is second else 2
    project = first["project_endpoint"]
    assert set(versions_of(project, 20)) == {1, 2}
    with CheckedVersionLoad(project, limit=120) as load:
        time.sleep(1)
        job_container(docker_client, mlserve.home, victim["id"]).kill(signal="SIGKILL")
        killed = time.monotonic()
        back = wait_for(lambda: (j := mlserve.jobs()[victim["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
        time.sleep(1)
    assert back, mlserve("status").stdout
    assert load.failures == [], load.describe()
    assert load.since(killed)[survivor] > 0, load.since(killed)
    assert set(versions_of(project, 40)) == {1, 2}


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(mlserve_module, docker_client, tmp_path_factory):
    """Project vbad: version 1 (one primary job) and version 2 (a fallback); project vidle: one version,
    no running job. Every bad command must leave them alone."""
    ms = mlserve_module
    folder = make_app(tmp_path_factory.mktemp("bad") / "vbad")
    ms("run", "--mode", "serve", cwd=folder)
    ms("run", "--mode", "serve", "--fallback", cwd=folder)
    idle = make_app(tmp_path_factory.mktemp("idle") / "vidle")
    ms("run", "--mode", "serve", cwd=idle)
    ms("stop", "--project", "vidle")
    # Taken once: every bad command is compared with it, so one that changed anything fails its own test.
    return ms, folder, picture(ms, docker_client, "vbad"), ms.json("versions", "vidle")


@pytest.mark.parametrize("args, expected", [
    (["traffic", "vbad", "--to", "9=100"], "the project has no version 9"),
    (["traffic", "vbad", "--to", "1=60"], "the shares add up to 60%, not 100%"),
    (["traffic", "vbad", "--to", "1=60", "--to", "2=40"], "version 2 is the project's fallback"),
    (["traffic", "vbad", "--to", "x"], "is not VERSION=PERCENT"),
    (["traffic", "vbad", "--to", "1=150"], "a share is a percent from 0 to 100"),
    (["traffic", "vbad", "--to", "1=50", "--to", "1=50"], "names version 1 twice"),
    (["traffic", "vbad", "--to", "1=100", "--to-latest"], "give one of --to, --to-latest and --by-jobs"),
    (["traffic", "nosuch", "--to", "1=100"], "no project tester/projects/nosuch"),
    (["run", "--mode", "serve", "--canary", "10", "--replace"], "--canary cannot be combined with --replace"),
    (["run", "--mode", "serve", "--canary", "10", "--fallback"], "--canary cannot be combined"),
    (["scale", "1", "--version", "99"], "has no version 99"),
], ids=["unknown-version", "not-100", "fallback-share", "malformed", "over-100", "twice", "two-modes",
        "unknown-project", "canary-replace", "canary-fallback", "scale-unknown-version"])
def test_bad_input_says_why_and_changes_nothing(bad, docker_client, args, expected):
    ms, folder, before, _ = bad
    result = ms(*args, cwd=folder, check=False)
    assert result.returncode != 0, result.stdout
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "Building image" not in result.stdout + result.stderr
    assert picture(ms, docker_client, "vbad") == before


@pytest.mark.parametrize("project", ["vfresh", "vidle"], ids=["never-run", "all-stopped"])
def test_canary_without_a_running_primary_fails_before_building(bad, docker_client, project):
    ms, folder, before, idle_before = bad
    result = ms("run", "--mode", "serve", "--canary", "10", "--project", project, cwd=folder, check=False)
    assert result.returncode != 0
    assert "no primary job of the project is running" in result.stderr, result.stderr
    assert "Building image" not in result.stdout + result.stderr
    assert picture(ms, docker_client, "vbad") == before
    assert ms.json("versions", "vidle") == idle_before
    missing = ms("versions", "vfresh", check=False)
    assert missing.returncode != 0 and "no project tester/projects/vfresh" in missing.stderr
    assert get(f"{ms.url}/serve/tester/projects/{project}/v/2").status_code == 404
