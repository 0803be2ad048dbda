"""What an instance can reach, tried from inside real instances: with the default `network: isolated`
not this host, private ranges or other instances; `network: open` reaches them (so the attempts
below can succeed, and their failure means something); `network: none` reaches nothing."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import free_port, job_container

pytestmark = pytest.mark.integration

# /reach tries a TCP connection from inside the instance; every instance also listens on port 9999
# itself, for the other instances to try.
APP = """
import socket, threading
from flask import Flask, jsonify, request

app = Flask(__name__)


def _listen():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("0.0.0.0", 9999))
    except OSError:
        return  # the other worker listens
    server.listen(16)
    while True:
        server.accept()[0].close()


threading.Thread(target=_listen, daemon=True).start()


@app.get("/reach")
def reach():
    try:
        socket.create_connection((request.args["host"], int(request.args["port"])), timeout=2).close()
        return jsonify(reached=True)
    except OSError as exc:
        return jsonify(reached=False, error=type(exc).__name__)


@app.get("/resolve")
def resolve():
    try:
        return jsonify(resolved=bool(socket.getaddrinfo(request.args["name"], 443)))
    except OSError:
        return jsonify(resolved=False)
"""


class Listener:
    """A TCP listener on every address of this host that counts the connections it accepted."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("0.0.0.0", free_port()))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.5)
        while not self.stop.is_set():
            try:
                self.server.accept()[0].close()
                self.accepted += 1
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.close()


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    found = Listener()
    yield found.port
    found.close()


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses but loopback: the docker0 bridge, the machine's own."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]


def _deploy(ms, tmp_path: Path, name: str, network: str | None) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "requirements.txt").write_text("flask\n")
    (folder / "mlserve.yml").write_text(f"project: {name}\n" + (f"network: {network}\n" if network else ""))
    flags = ["--network", "open"] if network == "open" else []  # mlserve.yml alone may not open it
    return ms.json("run", "--mode", "serve", *flags, cwd=folder)


def _reaches(job: dict, host: str, port: int) -> bool:
    answer = requests.get(f"{job['endpoint']}/reach", params={"host": host, "port": port}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["reached"]


def _resolves(job: dict, name: str) -> bool:
    return requests.get(f"{job['endpoint']}/resolve", params={"name": name}, timeout=30).json()["resolved"]


def _address(docker_client, ms, job: dict) -> str:
    container = job_container(docker_client, ms.home, job["id"])
    assert container is not None
    networks = container.attrs["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in networks.values() if n["IPAddress"])


def test_isolated_instances_reach_neither_the_host_nor_each_other(mlserve, docker_client, tmp_path, host_listener):
    isolated = _deploy(mlserve, tmp_path, "isolated", None)  # the default
    neighbour = _deploy(mlserve, tmp_path, "neighbour", "isolated")
    opened = _deploy(mlserve, tmp_path, "opened", "open")
    other_open = _deploy(mlserve, tmp_path, "other-open", "open")
    addresses = _host_addresses()
    assert addresses
    # The same attempts succeed from an open instance: the listener is there to be reached.
    assert all(_reaches(opened, address, host_listener) for address in addresses)
    assert _reaches(opened, _address(docker_client, mlserve, other_open), 9999)
    for address in addresses:
        assert not _reaches(isolated, address, host_listener), f"an isolated instance reached this host at {address}"
    assert not _reaches(isolated, _address(docker_client, mlserve, neighbour), 9999)  # another instance
    assert not _reaches(isolated, _address(docker_client, mlserve, opened), 9999)  # one on another network
    # Names still resolve (DNS to this host's resolvers is let through), so apps can download things.
    assert _resolves(isolated, "pypi.org")
    # No IPv6 (not even link-local) to go around the IPv4 rules.
    container = job_container(docker_client, mlserve.home, isolated["id"])
    assert container.exec_run("cat /proc/sys/net/ipv6/conf/all/disable_ipv6").output.strip() == b"1"


def test_a_flushed_firewall_is_restored_before_an_instance_starts(mlserve, tmp_path, host_listener):
    first = _deploy(mlserve, tmp_path, "first", None)
    subprocess.run(["iptables", "-w", "-D", "DOCKER-USER", "-i", "mlserve0", "-j", "MLSERVE-ISOLATION"], check=True)
    subprocess.run(["iptables", "-w", "-F", "MLSERVE-HOST"], check=True)
    mlserve("scale", "2", "--project", "first")
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout
    assert "-A DOCKER-USER -i mlserve0 -j MLSERVE-ISOLATION" in rules and "-A MLSERVE-HOST -j DROP" in rules
    for address in _host_addresses():
        assert not _reaches(first, address, host_listener)


def test_a_cloned_mlserve_yml_cannot_open_the_network(mlserve, tmp_path):
    folder = tmp_path / "cloned"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "mlserve.yml").write_text("network: open\n")
    result = mlserve("run", "--mode", "serve", cwd=folder, check=False)
    assert result.returncode != 0 and "--network open" in result.stderr
    assert mlserve.json("status", "--all") == []


def test_an_instance_without_a_network_reaches_nothing(mlserve, docker_client, tmp_path, host_listener):
    sealed = _deploy(mlserve, tmp_path, "sealed", "none")
    container = job_container(docker_client, mlserve.home, sealed["id"])
    assert container is not None and container.attrs["HostConfig"]["NetworkMode"] == "none"
    for address in _host_addresses():
        assert not _reaches(sealed, address, host_listener)
    assert not _resolves(sealed, "pypi.org")


def test_the_import_check_runs_as_the_instance_user_and_cannot_reach_this_host(mlserve, tmp_path, listener):
    # At import: refuse to be root, and try to reach this host (as a build step that runs as root on
    # the build's network could).
    folder = tmp_path / "check"
    folder.mkdir()
    targets = [(address, listener.port) for address in _host_addresses()]
    (folder / "app.py").write_text(
        "import os, socket\n"
        "if os.getuid() == 0:\n    raise RuntimeError('imported as root')\n"
        f"for target in {targets!r}:\n"
        "    try:\n        socket.create_connection(target, 1).close()\n    except OSError:\n        pass\n"
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n")
    out = mlserve.json("run", "--mode", "serve", cwd=folder)
    assert requests.get(out["endpoint"], timeout=10).text == "ok"
    assert listener.accepted == 0  # neither the check nor the instance reached this host
