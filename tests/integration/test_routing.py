"""The routing plane against real nginx and its Lua router: a routing change is live at once and never
reloads nginx (so keep-alive clients lose nothing), endpoints match whole path segments only, a try that
never connected moves on, a request that reached an instance is never sent again, a chunked upload reaches
the app whole, and the control socket keeps its table when handed one it cannot serve.

Instances are the fake uwsgi instance of test_gateway.py and real `uwsgi` processes (started here, killed
in teardown: every one is in a process group of its own)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from mlserve.errors import GatewayError
from mlserve.gateway import CONTROL_SOCKET, Gateway, GatewaySettings, ProjectTraffic, Route, worker_processes
from mlserve.home import Home
from mlserve.privileges import share_sockets
from tests.harness import free_port, wait_for
from tests.integration.test_gateway import FakeInstance

pytestmark = pytest.mark.integration

BODY_LIMIT_MB = 8
PROJECT = "alice/projects/p"
F, G, H = "F" * 22, "G" * 22, "H" * 22
NUMBERS = {F: 1, G: 2, H: 3}  # each job's number in its project

# The app of the real instances: it names its instance (the folder it is in, the job's run dir), writes
# down every path it receives, exits its worker mid-request on /exit and reports what it got of a body.
APP = '''
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def app(environ, start_response):
    path = environ["PATH_INFO"]
    with open(os.path.join(HERE, "received"), "a") as received:
        received.write(path + "\\n")
    if path == "/exit":
        os._exit(1)  # the worker dies with the request: no answer, and uWSGI's master starts another
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    answer = json.dumps({
        "instance": os.path.basename(HERE), "path": path, "content_length": environ.get("CONTENT_LENGTH"),
        "transfer_encoding": environ.get("HTTP_TRANSFER_ENCODING"),
        "received": len(body), "sha256": hashlib.sha256(body).hexdigest(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]
'''


@pytest.fixture
def gateway(nginx_available) -> Iterator[Gateway]:
    # A short home under /tmp: unix socket paths must stay under 108 bytes.
    home = Home(Path(tempfile.mkdtemp(prefix="mlr", dir="/tmp")))
    gateway = Gateway(home, GatewaySettings("127.0.0.1", free_port(), BODY_LIMIT_MB, 60))
    yield gateway
    gateway.stop()
    shutil.rmtree(home.root, ignore_errors=True)


# -- instances ---------------------------------------------------------------------------------


class UwsgiInstance:
    """A real uWSGI (master and two workers) serving APP on a job's socket under the home."""

    def __init__(self, home: Home, job_id: str) -> None:
        self.job_id = job_id
        self.dir = home.run_dir(job_id)
        self.socket = home.socket(job_id)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        share_sockets(self.dir, self.socket.parent)  # as a job's folders are: the gateway's workers reach it
        (self.dir / "app.py").write_text(APP)
        pidfile = self.dir / "uwsgi.pid"
        subprocess.run(
            [_uwsgi(), "--master", "--processes", "2", "--uwsgi-socket", str(self.socket), "--chmod-socket=660",
             "--wsgi-file", str(self.dir / "app.py"), "--callable", "app", "--post-buffering", "65536",
             "--daemonize", str(self.dir / "uwsgi.log"), "--pidfile", str(pidfile)],
            check=True, timeout=30, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, 0.02), "uwsgi wrote no pidfile"
        # Daemonized, uWSGI is in a session (and process group) of its own: the group is all of it,
        # workers it starts later included.
        self.group = os.getpgid(int(pidfile.read_text()))
        assert self.group != os.getpgrp()
        assert wait_for(self._accepts, 10, 0.02), f"uwsgi does not listen on {self.socket}"

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def received(self) -> list[str]:
        """The paths (PATH_INFO) this instance received, in order."""
        path = self.dir / "received"
        return path.read_text().splitlines() if path.exists() else []

    def kill(self) -> None:
        """kill -9 every process of it; its socket file stays, with nothing listening."""
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            return
        assert wait_for(lambda: not _group_alive(self.group), 10, 0.02), f"uwsgi group {self.group} lives on"


def _uwsgi() -> str:
    # Beside this Python (mlserve depends on pyuwsgi), not a shim on PATH that would start a shell first.
    beside = Path(sys.executable).parent / "uwsgi"
    found = str(beside) if beside.exists() else shutil.which("uwsgi")
    assert found, "uwsgi is not installed (pyuwsgi is a dependency of mlserve)"
    return found


def _group_alive(group: int) -> bool:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, parent, process group, ...
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


class Instances:
    """Instances started for one test, all stopped at its end."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.started: list[FakeInstance | UwsgiInstance] = []

    def fake(self, job_id: str) -> FakeInstance:
        instance = FakeInstance(self.home.socket(job_id), job_id)
        self.started.append(instance)
        return instance

    def uwsgi(self, job_id: str) -> UwsgiInstance:
        instance = UwsgiInstance(self.home, job_id)
        self.started.append(instance)
        return instance

    def stop(self) -> None:
        for instance in self.started:
            if isinstance(instance, UwsgiInstance):
                instance.kill()
            else:
                instance.close()


@pytest.fixture
def instances(gateway) -> Iterator[Instances]:
    started = Instances(gateway.home)
    yield started
    started.stop()


# -- helpers -----------------------------------------------------------------------------------


def _routes(gateway: Gateway, ready: tuple[str, ...], sick: tuple[str, ...] = (), project: str = PROJECT) -> list[Route]:
    return [Route(job_id, f"{project}/{NUMBERS.get(job_id, 9)}", project, str(gateway.home.socket(job_id)),
                  job_id in ready) for job_id in (*ready, *sick)]


def _get(gateway: Gateway, path: str) -> tuple[int, dict[str, str], Any]:
    """GET on a fresh connection: status, headers and the JSON answer."""
    connection = http.client.HTTPConnection(gateway.settings.host, gateway.settings.port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read())
    finally:
        connection.close()


def _generation(gateway: Gateway) -> str:
    connection = http.client.HTTPConnection(gateway.settings.host, gateway.settings.port, timeout=10)
    try:
        connection.request("GET", "/_mlserve/generation")
        return connection.getresponse().read().decode().strip()
    finally:
        connection.close()


def _session() -> requests.Session:
    """One keep-alive connection that is never retried: every failure shows."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(max_retries=0))
    return session


def _children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text() if name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.add(int(name))
    return found


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _control(gateway: Gateway, method: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request to the gateway's control socket, as mlserve makes them."""
    connection = _UnixConnection(str(gateway.dir / CONTROL_SOCKET))
    try:
        connection.request(method, "/routes", body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# Who is in the project's pool, change after change: every non-empty choice of three, each unlike the last.
MEMBERSHIPS = [(F,), (F, G), (G,), (G, H), (H,), (F, H), (F, G, H)]


# -- a. a routing change is live at once, without a reload -------------------------------------


def test_a_routing_change_is_live_at_once_and_never_reloads_nginx(gateway, instances):
    for job_id in (F, G, H):
        instances.fake(job_id)
    gateway.apply(_routes(gateway, (F, G, H)))
    master = gateway.pid()
    assert master is not None
    assert wait_for(lambda: len(_children(master)) == worker_processes(), 10, 0.02)
    workers = _children(master)
    generation = _generation(gateway)
    for change in range(20):
        members = MEMBERSHIPS[change % len(MEMBERSHIPS)]
        gateway.apply(_routes(gateway, members))
        # Fresh connections, so spread over the workers: every one already serves the new table.
        seen = set()
        for _ in range(12):
            status, _, answer = _get(gateway, f"/serve/{PROJECT}")
            assert status == 200, (change, answer)
            seen.add(answer["instance"])
        assert seen == set(members), f"change {change}: the project answered from {seen}, not {members}"
        for job_id in (F, G, H):
            status, _, answer = _get(gateway, f"/serve/{job_id}")
            assert status == (200 if job_id in members else 404), (change, job_id, answer)
        # Not reloaded: the same master, the same workers, the same configuration.
        assert gateway.pid() == master and _children(master) == workers, f"change {change}: nginx was reloaded"
        assert _generation(gateway) == generation


# -- b. a keep-alive client loses nothing to routing changes -----------------------------------


def test_a_keep_alive_client_loses_no_request_across_routing_changes(gateway, instances):
    for job_id in (F, G, H):
        instances.fake(job_id)
    pools = [(F, G), (F, G, H), (G, H), (F, H), (H, F, G)]  # two or three instances, always
    gateway.apply(_routes(gateway, pools[0]))
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        # Under nginx's keepalive_requests (1000), so one connection could carry them all.
        with _session() as session:
            while not stop.is_set() and len(answers) + len(failures) < 900:
                try:
                    answer = session.get(f"{gateway.url}/serve/{PROJECT}/predict", timeout=10)
                    if answer.status_code == 200:
                        answers.append(answer.json())
                    else:
                        failures.append(f"{answer.status_code} {answer.text[:100]}")
                except requests.RequestException as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

    def sent() -> int:
        return len(answers) + len(failures)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        for change in range(30):
            gateway.apply(_routes(gateway, pools[change % len(pools)]))
            before = sent()
            # A few requests after each change, before the next one.
            wait_for(lambda: sent() >= before + 3 or not thread.is_alive(), 10, 0.002)  # noqa: B023
            assert failures == [], f"after change {change}: {len(failures)} of {sent()} requests failed: {failures[:3]}"
            # nginx never closed the client's connection: every answer came over the one it opened first.
            ports = {answer["remote_port"] for answer in list(answers)}
            assert len(ports) == 1, f"after change {change}: the client's connection was closed {len(ports) - 1} times"
            assert sent() >= before + 3, f"after change {change}: the client stalled, or reached its cap"
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert failures == [] and len(answers) >= 90
    assert len({answer["remote_port"] for answer in answers}) == 1
    assert {answer["instance"] for answer in answers} == {F, G, H}


# -- c. whole path segments only ---------------------------------------------------------------


def test_an_endpoint_matches_whole_path_segments_only(gateway, instances):
    project, sick = "alice/projects/types", "S" * 22
    no_such = {"error": "no such endpoint"}
    gateway.apply([], [ProjectTraffic(project)])  # known, no job: its own endpoint answers 503
    assert _get(gateway, f"/serve/{project}")[0] == 503
    # Names end where a segment does, whatever character follows: one a name may hold, or one it may not.
    for path in (f"/serve/{project}2", f"/serve/{project}2/x", f"/serve/{project}-x", f"/serve/{project}X",
                 f"/serve/{project}.json", "/serve/alice/projects/type"):
        assert _get(gateway, path)[::2] == (404, no_such), path

    instances.fake(F)
    gateway.apply(_routes(gateway, (F,), (sick,), project=project))
    for path, path_info in ((f"/serve/{project}", "/"), (f"/serve/{project}/x", "/x")):
        status, _, answer = _get(gateway, path)
        assert (status, answer["instance"], answer["script_name"], answer["path_info"]) == (200, F, f"/serve/{project}",
                                                                                          path_info)
    assert _get(gateway, f"/serve/{F}/x")[2]["path_info"] == "/x"
    assert _get(gateway, f"/serve/{sick}")[0] == 503
    assert _get(gateway, f"/serve/{sick}/x")[0] == 503
    for path in (f"/serve/{project}2", f"/serve/{project}2/x", f"/serve/{project}X/x", f"/serve/{project}.json",
                 f"/serve/{F}x", f"/serve/{F}x/y", f"/serve/{F}.json", f"/serve/{F}_x/y",
                 f"/serve/{sick}x", f"/serve/{sick}0/x", f"/serve/{sick}.json", f"/serve/{sick}-x"):
        assert _get(gateway, path)[::2] == (404, no_such), path


# -- d. a try that never connected moves on ----------------------------------------------------


def test_a_try_that_never_connected_moves_on_to_the_next_instance(gateway, instances):
    live, dead, missing = F, G, H
    instances.uwsgi(live)
    instances.uwsgi(dead).kill()  # its socket file stays, with nothing listening
    assert gateway.home.socket(dead).exists() and not gateway.home.socket(missing).exists()
    gateway.apply(_routes(gateway, (live, dead, missing)))
    for number in range(50):
        status, _, answer = _get(gateway, f"/serve/{PROJECT}/get-{number}")
        assert (status, answer["instance"]) == (200, live), (number, answer)

    # No memory of failures keeps an instance out: the routing table alone decides, so one that comes back
    # takes its turns at once (nginx's max_fails=1 kept it out for its fail_timeout, 5 s).
    instances.fake(missing)
    with _session() as session:  # one worker, so its round robin shows whole
        seen = [session.get(f"{gateway.url}/serve/{PROJECT}", timeout=10).json()["instance"] for _ in range(6)]
    assert missing in seen


# -- e. a request that reached an instance is never sent again ---------------------------------


def test_a_request_that_reached_an_instance_is_never_resent(gateway, instances):
    started = [instances.uwsgi(job_id) for job_id in (F, G)]
    gateway.apply(_routes(gateway, (F, G, H)))  # H has no socket: a try there never connects, and moves on
    with _session() as session:
        # Each starts at the next turn of the round robin: at F, at G, and at H (then F) in some order.
        for attempt in range(1, 4):
            answer = session.get(f"{gateway.url}/serve/{PROJECT}/exit", timeout=10)
            assert (answer.status_code, answer.headers["Content-Type"], answer.headers["Retry-After"]) == (
                502, "application/json", "2")
            assert answer.json() == {"error": "the serving instance did not answer"}
            received = [path for instance in started for path in instance.received()]
            # The worker that took it died; no other instance (with a worker to die too) got it again.
            assert received.count("/exit") == attempt, {instance.job_id: instance.received() for instance in started}

        # Both stay in rotation: the one whose worker died has another (and uWSGI starts a new one).
        answers = [session.get(f"{gateway.url}/serve/{PROJECT}/after", timeout=10) for _ in range(6)]
    assert [answer.status_code for answer in answers] == [200] * 6
    assert {answer.json()["instance"] for answer in answers} == {F, G}


# -- f. a chunked upload reaches the app whole -------------------------------------------------


def test_a_chunked_upload_reaches_the_app_whole(gateway, instances):
    instances.uwsgi(F)
    gateway.apply(_routes(gateway, (F,)))
    body = os.urandom(3 * 1024 * 1024)
    chunks = (body[at:at + 100_000] for at in range(0, len(body), 100_000))
    with _session() as session:
        answer = session.post(f"{gateway.url}/serve/{PROJECT}/upload", data=chunks, timeout=30)
    assert answer.request.headers["Transfer-Encoding"] == "chunked"
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "instance": F, "path": "/upload", "content_length": str(len(body)), "transfer_encoding": None,
        "received": len(body), "sha256": hashlib.sha256(body).hexdigest(),
    }


# -- g. the control socket keeps its table when handed one it cannot serve ---------------------


@pytest.mark.parametrize("table", [
    b"", b"not json", b"null", b"[1, 2]", b'"jobs projects"', b'{"jobs": {}}', b'{"projects": {}}',
    b'{"jobs": 1, "projects": {}}', b'{"jobs": {}, "projects": "alice/projects/p"}',
], ids=["empty", "not-json", "null", "list", "string", "no-projects", "no-jobs", "jobs-number", "projects-string"])
def test_the_control_socket_refuses_a_table_without_jobs_and_projects(gateway, instances, table):
    instances.fake(F)
    gateway.apply(_routes(gateway, (F,)))
    status, before = _control(gateway, "GET")
    assert status == 200 and json.loads(before) == gateway.routes()

    status, answer = _control(gateway, "PUT", table)
    assert status == 400 and "jobs and projects" in json.loads(answer)["error"]
    assert _control(gateway, "GET") == (200, before)
    for path in (f"/serve/{F}", f"/serve/{PROJECT}"):
        status, _, served = _get(gateway, path)
        assert (status, served["instance"]) == (200, F), path


def test_a_refused_table_is_an_error_of_mlserve(gateway, instances):
    instances.fake(F)
    gateway.apply(_routes(gateway, (F,)))
    pushed = gateway.routes()
    with pytest.raises(GatewayError, match="refused the routes"):
        gateway._push({"jobs": {}})
    assert gateway.routes() == pushed  # what `gateway status` counts is still what the router serves
    assert _get(gateway, f"/serve/{F}")[0] == 200
