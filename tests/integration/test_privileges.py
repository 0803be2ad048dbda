"""On a real deploy (Docker, uWSGI, nginx) by root: the gateway's nginx workers run as their own user,
which reaches the instances' sockets and nothing else of the home, and no other user enters the home
(cli/privileges.py).

The home lies in a folder only root may enter, as the default ~/.mlserve lies in /root."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mlserve.constants import GATEWAY_USER
from mlserve.gateway import CONTROL_SOCKET
from tests.harness import EXAMPLES, Mlserve, make_mlserve, teardown_mlserve

pytestmark = pytest.mark.integration

STRANGER = ("--reuid", "12345", "--regid", "12345", "--clear-groups")  # a user with no business here
WORKER = ("--reuid", GATEWAY_USER, "--regid", GATEWAY_USER, "--init-groups")  # as nginx's workers are
# The system's python: another user could not run the one in /root that the tests may run with.
CONNECT = ("/usr/bin/python3", "-c", "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])")


@dataclasses.dataclass(frozen=True)
class Deployed:
    ms: Mlserve
    job: str  # its endpoint id

    @property
    def run(self) -> Path:
        return self.ms.home / "run" / self.job

    @property
    def private_files(self) -> list[Path]:
        home, gateway = self.ms.home, self.ms.home / "gateway"
        return [home / "state.db", home / "state.db-wal", gateway / "access.log", gateway / "error.log",
                gateway / "nginx.conf", gateway / "routes.json", gateway / "supervisor.log",
                self.run / "uwsgi.ini", self.run / "manifest.json"]

    @property
    def sockets(self) -> list[Path]:
        return [self.run / "sock" / "uwsgi.sock", self.run / "sock" / "stats.sock"]


@pytest.fixture(scope="module")
def deployed(docker_client, nginx_available, tmp_path_factory) -> Iterator[Deployed]:
    if os.geteuid() != 0:
        reason = "the gateway's own user is for mlserve run as root"
        if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)
    closed = Path(tempfile.mkdtemp(prefix="mlp", dir="/tmp"))  # 0700, as /root is
    fresh = make_mlserve()
    fresh.home.rmdir()
    home = closed / "h"
    ms = dataclasses.replace(fresh, home=home, env={**fresh.env, "MLSERVE_HOME": str(home)})
    project = tmp_path_factory.mktemp("privileges") / "hello"
    shutil.copytree(EXAMPLES / "hello", project)
    try:
        ms("run", "--mode", "serve", cwd=project)
        (job,) = ms.routes()["jobs"]
        yield Deployed(ms, job)
    finally:
        teardown_mlserve(ms, docker_client)
        shutil.rmtree(closed, ignore_errors=True)


def _as(who: tuple[str, ...], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", *who, *command], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def _denied(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "Permission denied" in result.stderr


def _ids(pid: int, key: str) -> set[int]:
    """The real, effective, saved and file-system ids (``key``: Uid or Gid) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return {int(value) for value in line.split()[1:]}
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _children(pid: int) -> list[int]:
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:  # the command may contain spaces and parentheses
            children.append(int(name))
    return children


def test_every_worker_of_the_gateway_runs_as_its_own_user(deployed):
    master = int((deployed.ms.home / "gateway" / "nginx.pid").read_text())
    workers = _children(master)
    assert workers, "the gateway's master has no workers"
    user = pwd.getpwnam(GATEWAY_USER)
    for pid in workers:
        assert _ids(pid, "Uid") == {user.pw_uid} and user.pw_uid != 0, pid
        assert _ids(pid, "Gid") == {user.pw_gid} and user.pw_gid != 0, pid
    assert _ids(master, "Uid") == {0}  # the master binds the port and opens the logs


def test_the_workers_reach_the_instance_through_a_folder_only_root_may_enter(deployed):
    closed = deployed.ms.home.parent
    assert closed.stat().st_mode & 0o007 == 0 and _denied(_as(STRANGER, "ls", str(closed)))
    for path in ("/serve/tester/projects/hello", f"/serve/{deployed.job}"):
        assert requests.get(deployed.ms.url + path, timeout=10).status_code == 200, path


def test_another_user_reads_nothing_of_the_home(deployed):
    for path in (deployed.ms.home, deployed.run):
        assert _denied(_as(STRANGER, "ls", str(path))), path
    for path in deployed.private_files:
        assert path.exists(), path
        assert _denied(_as(STRANGER, "cat", str(path))), path


def test_another_user_connects_to_no_socket_of_the_home(deployed):
    for path in [*deployed.sockets, deployed.ms.home / "gateway" / CONTROL_SOCKET]:
        assert path.is_socket(), path
        assert _denied(_as(STRANGER, *CONNECT, str(path))), path


def test_the_gateways_user_reaches_the_instances_sockets_and_reads_nothing(deployed):
    for path in deployed.sockets:
        connected = _as(WORKER, *CONNECT, str(path))
        assert connected.returncode == 0, (path, connected.stderr)
    home = deployed.ms.home
    for path in (home, home / "run", deployed.run, home / "gateway", home / "output" / deployed.job):
        assert path.is_dir(), path
        assert _denied(_as(WORKER, "ls", str(path))), path  # it passes through on its way, never lists
    for path in [*deployed.private_files, deployed.run / "instance.log"]:
        assert path.exists(), path
        assert _denied(_as(WORKER, "cat", str(path))), path
    # Only mlserve pushes routes: the workers serve the control socket but cannot call it.
    assert _denied(_as(WORKER, *CONNECT, str(home / "gateway" / CONTROL_SOCKET)))
