"""The gateway against the real nginx binary: reloads (for a settings change) that reach every worker,
leftovers of a killed master, JSON for nginx's and the router's own errors, capped logs, and routing over
the uwsgi protocol (to a fake instance that speaks just enough of it).

How routing changes behave without a reload is in test_routing.py."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mlserve.gateway import Gateway, GatewaySettings, ProjectTraffic, Route
from mlserve.home import Home
from mlserve.privileges import share_sockets
from tests.harness import free_port

pytestmark = pytest.mark.integration

BODY_LIMIT_MB = 1


@pytest.fixture
def gateway(nginx_available):
    # A short home under /tmp: unix socket paths must stay under 108 bytes.
    home = Home(Path(tempfile.mkdtemp(prefix="mlg", dir="/tmp")))
    gateway = Gateway(home, GatewaySettings("127.0.0.1", free_port(), BODY_LIMIT_MB, 60))
    yield gateway
    gateway.stop()
    shutil.rmtree(home.root, ignore_errors=True)


# -- processes, as /proc shows them ------------------------------------------------------------


def _proc_state(pid: int) -> tuple[str, int]:
    """State letter and parent pid; ("", 0) when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    return _proc_state(pid)[0] not in ("", "Z")  # a zombie has exited; only its parent has not reaped it


def _children(pid: int) -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit() and _proc_state(int(name))[1] == pid}


def _wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- HTTP on fresh connections -----------------------------------------------------------------


def _get(gateway: Gateway, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(gateway.settings.host, gateway.settings.port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def _generations(gateway: Gateway, count: int) -> list[str]:
    return [_get(gateway, "/_mlserve/generation")[2].decode().strip() for _ in range(count)]


def _raw(gateway: Gateway, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (requests would refuse to send most of these) and parse the answer."""
    with socket.create_connection((gateway.settings.host, gateway.settings.port), timeout=10) as conn:
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


# -- 1. a reload reaches every worker before apply returns -------------------------------------


def test_after_a_settings_change_every_fresh_connection_sees_the_new_configuration(gateway, monkeypatch):
    # Only a settings change reloads nginx (a routing change never does): each round here is a new
    # timeout, as `mlserve gateway start --timeout S` makes, on the same home.
    # On a reload nginx starts the new workers and tells the old ones to quit only 100 ms later, so one
    # answer from a new worker proves nothing: an apply that stopped there left about one reload in ten
    # with the old configuration on fresh connections for a while. Forty reloads make that a near-certain
    # failure.
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # four workers: more old ones that could linger
    gateway.apply([], [ProjectTraffic("alice/projects/p0")])
    master = gateway.pid()
    _wait_until(lambda: len(_children(master)) == 4)
    for reload in range(1, 41):
        changed = Gateway(gateway.home, dataclasses.replace(gateway.settings, timeout_s=60 + reload))
        projects = [f"alice/projects/p{reload}"]
        changed.apply([], [ProjectTraffic(key) for key in projects])
        assert changed.pid() == master  # reloaded, not restarted
        expected = changed.render()[1]
        seen = _generations(gateway, 200)
        assert seen.count(expected) == len(seen), f"reload {reload}: {len(seen) - seen.count(expected)} stale answers"
        assert _get(gateway, f"/serve/{projects[0]}")[0] == 503  # the table pushed after it: known, no job yet


def test_a_reload_keeps_the_routing_table(gateway, monkeypatch):
    # Between a reload and mlserve's next push, the new workers serve the table from before it.
    gateway.apply([], [ProjectTraffic("alice/projects/kept")])
    changed = Gateway(gateway.home, dataclasses.replace(gateway.settings, timeout_s=61))
    monkeypatch.setattr(changed, "_push", lambda table: None)  # the reload alone
    changed.apply([], [])
    assert set(_generations(gateway, 50)) == {changed.render()[1]}
    assert {_get(gateway, "/serve/alice/projects/kept")[0] for _ in range(10)} == {503}


# -- 3. leftovers of a master killed with -9 ---------------------------------------------------


def _kill_master(gateway: Gateway) -> set[int]:
    """kill -9 the master; its workers, which live on holding the port."""
    master = gateway.pid()
    assert master is not None
    workers = _children(master)
    assert workers
    os.kill(master, signal.SIGKILL)
    _wait_until(lambda: not _alive(master))
    assert not gateway.is_running()
    assert all(_alive(worker) for worker in workers)
    return workers


def test_apply_after_the_master_was_killed_replaces_its_orphan_workers(gateway):
    gateway.apply([], [ProjectTraffic("alice/projects/old")])
    orphans = _kill_master(gateway)
    assert set(gateway.status().orphans) == orphans
    gateway.preflight()  # the port is held by the gateway's own leftovers: not a reason to refuse

    gateway.apply([], [ProjectTraffic("alice/projects/new")])
    assert not any(_alive(pid) for pid in orphans)
    assert _children(gateway.pid()).isdisjoint(orphans)
    assert set(_generations(gateway, 50)) == {gateway.render()[1]}
    assert gateway.status().orphans == ()
    # The new nginx serves the table pushed to it (the orphans' table went with them).
    assert {_get(gateway, "/serve/alice/projects/new")[0] for _ in range(10)} == {503}
    assert {_get(gateway, "/serve/alice/projects/old")[0] for _ in range(10)} == {404}


def test_stop_removes_orphan_workers_and_frees_the_port(gateway):
    gateway.apply([], [])
    orphans = _kill_master(gateway)
    assert gateway.stop() is True
    assert not any(_alive(pid) for pid in orphans)
    with socket.socket() as probe:
        probe.bind((gateway.settings.host, gateway.settings.port))  # free again
    gateway.apply([], [ProjectTraffic("alice/projects/again")])  # and the gateway starts again
    assert _get(gateway, "/serve/alice/projects/again")[0] == 503


# -- 4 and 5. every answer of nginx's own is JSON; a sick job's names only mlserve's words ------

LONG_URI = b"/" + b"a" * 20_000
NGINX_ERRORS = {
    "400 no Host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "400 bad request line": (b"GET /x HTTP/1.1 junk\r\nHost: a\r\n\r\n", 400),
    "400 headers too large": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 400),
    "405 TRACE": (b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    "413 body": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n", 413),
    "414 URI": (b"GET " + LONG_URI + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "501 Transfer-Encoding": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "505 version": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "404 .html": (b"GET /x.html HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 404),
    "404 internal": (b"GET /_mlserve/error/400 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 404),
}


@pytest.mark.parametrize("request_bytes,status", NGINX_ERRORS.values(), ids=NGINX_ERRORS.keys())
def test_nginx_errors_are_json(gateway, request_bytes, status):
    gateway.apply([], [])
    got, headers, body = _raw(gateway, request_bytes)
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(body)["error"], str)


def test_a_sick_job_and_a_dead_instance_answer_json(gateway):
    sick, dead = "S" * 22, "D" * 22
    gateway.apply([
        Route(sick, "alice/projects/p/1", "alice/projects/p", str(gateway.home.socket(sick)), False),
        Route(dead, "alice/projects/p/2", "alice/projects/p", str(gateway.home.socket(dead)), True),  # no socket
    ], [ProjectTraffic("bob/projects/idle")])
    status, headers, body = _get(gateway, f"/serve/{sick}/predict")
    assert (status, headers["Content-Type"], headers["Retry-After"]) == (503, "application/json", "5")
    assert json.loads(body) == {"error": "job not available", "job": "alice/projects/p/1",
                                "detail": "see `mlserve info alice/projects/p/1`"}
    for path in (f"/serve/{dead}", "/serve/alice/projects/p/predict"):
        status, headers, body = _get(gateway, path)
        assert (status, headers["Content-Type"], headers["Retry-After"]) == (502, "application/json", "2"), path
        assert json.loads(body) == {"error": "the serving instance did not answer"}
    status, headers, body = _get(gateway, "/serve/bob/projects/idle")
    assert (status, headers["Content-Type"], headers["Retry-After"]) == (503, "application/json", "5")
    assert json.loads(body) == {"error": "no healthy serving job", "project": "bob/projects/idle"}
    for path in ("/serve/bob/projects/nothing", f"/serve/{'N' * 22}/predict", "/serve/", "/serve/x.html"):
        status, headers, body = _get(gateway, path)
        assert (status, headers["Content-Type"]) == (404, "application/json"), path
        assert json.loads(body) == {"error": "no such endpoint"}


def test_a_request_over_the_timeout_answers_json_naming_the_setting(gateway):
    silent = "T" * 22
    path = gateway.home.socket(silent)
    path.parent.mkdir(parents=True)
    share_sockets(path.parent.parent, path.parent)
    with socket.socket(socket.AF_UNIX) as listener:  # connections are taken (backlog), never answered
        listener.bind(str(path))
        path.chmod(0o660)
        listener.listen(8)
        impatient = Gateway(gateway.home, dataclasses.replace(gateway.settings, timeout_s=1))
        impatient.apply([Route(silent, "alice/projects/p/1", "alice/projects/p", str(path), True)], [])
        status, headers, body = _get(impatient, f"/serve/{silent}")
    assert (status, headers["Content-Type"]) == (504, "application/json")
    assert json.loads(body) == {"error": "request timed out", "timeout_s": 1, "setting": "mlserve gateway start --timeout S"}


# -- 6. capped logs ----------------------------------------------------------------------------


def test_cap_logs_truncates_and_nginx_logs_on_at_the_start(gateway):
    gateway.apply([], [])
    access_log = gateway.dir / "access.log"
    for number in range(200):
        _get(gateway, f"/before-cap-{number}")
    # Each worker buffers its lines for up to 2 s: wait for all of them, or some land after the cap.
    _wait_until(lambda: access_log.read_bytes().count(b"/before-cap-") == 200)
    assert access_log.stat().st_size > 8_000
    assert gateway.cap_logs(8_000) == [access_log]
    assert access_log.stat().st_size == 0

    for number in range(20):
        _get(gateway, f"/after-cap-{number}")
    _wait_until(lambda: access_log.read_bytes().count(b"/after-cap-") == 20)
    lines = access_log.read_bytes().splitlines()
    # Appended at the new end: no hole of zeros where the old lines were, nothing else in the file.
    assert len(lines) == 20 and all(line.startswith(b"127.0.0.1 ") for line in lines)


# -- routing over the uwsgi protocol -----------------------------------------------------------


class FakeInstance:
    """A unix socket that answers every uwsgi request with its name and the CGI variables it got."""

    def __init__(self, path: Path, name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        share_sockets(path.parent.parent, path.parent)  # as a job's folders are: the gateway's workers reach it
        self.name = name
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        path.chmod(0o660)  # as uWSGI's chmod-socket makes it
        self.listener.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    continue  # the gateway gave up on this one: serve the next

    def _answer(self, conn: socket.socket) -> None:
        header = _read_exactly(conn, 4)  # modifier1, size of the variables (little-endian), modifier2
        variables = _uwsgi_vars(_read_exactly(conn, int.from_bytes(header[1:3], "little")))
        body = json.dumps({"instance": self.name, "script_name": variables["SCRIPT_NAME"],
                           "path_info": variables["PATH_INFO"], "remote_port": variables["REMOTE_PORT"]}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("uwsgi request cut short")
        data += chunk
    return data


def _uwsgi_vars(data: bytes) -> dict[str, str]:
    variables, at = {}, 0
    while at < len(data):
        key_size = int.from_bytes(data[at:at + 2], "little")
        key = data[at + 2:at + 2 + key_size].decode()
        at += 2 + key_size
        value_size = int.from_bytes(data[at:at + 2], "little")
        variables[key] = data[at + 2:at + 2 + value_size].decode()
        at += 2 + value_size
    return variables


def test_routes_reach_instances_over_the_uwsgi_protocol(gateway):
    first, second = "F" * 22, "G" * 22
    instances = [FakeInstance(gateway.home.socket(job_id), job_id) for job_id in (first, second)]
    try:
        gateway.apply([
            Route(first, "alice/projects/p/1", "alice/projects/p", str(gateway.home.socket(first)), True),
            Route(second, "alice/projects/p/2", "alice/projects/p", str(gateway.home.socket(second)), True),
        ], [])
        status, _, body = _get(gateway, f"/serve/{first}/a/b?x=1")
        assert status == 200
        answer = json.loads(body)
        assert (answer["instance"], answer["script_name"], answer["path_info"]) == (first, f"/serve/{first}", "/a/b")
        answers = [json.loads(_get(gateway, "/serve/alice/projects/p")[2]) for _ in range(4)]
        assert {answer["instance"] for answer in answers} == {first, second}  # round robin
        assert {(a["script_name"], a["path_info"]) for a in answers} == {("/serve/alice/projects/p", "/")}
    finally:
        for instance in instances:
            instance.close()
