"""Shared fixtures. The integration tier drives the real Docker engine and nginx; with
MLSERVE_REQUIRE_ENGINE=1 (set by .ci/run) a missing engine or nginx fails instead of skipping."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def pytest_collection_modifyitems(config, items):
    # Restarting the Docker engine stops every container: those tests run last.
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


def _require(reason: str) -> None:
    if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
        pytest.fail(f"integration tier cannot run: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        _require(f"no Docker engine answers ({exc}); run `mlserve setup`")
    return client


@pytest.fixture(scope="session")
def nginx_available() -> None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        _require("nginx is not installed; run `mlserve setup`")


@dataclass
class Mlserve:
    """Runs the real `mlserve` command against an isolated home and gateway port."""

    home: Path
    port: int
    env: dict

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "mlserve", *args],
            cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mlserve {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str, cwd: Path | None = None):
        return json.loads(self(*args, "--json", cwd=cwd).stdout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_mlserve(owner: str = "tester") -> Mlserve:
    # Short paths: unix socket paths under the home must stay under 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="mls", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "MLSERVE_HOME": str(home), "MLSERVE_GATEWAY_PORT": str(port), "MLSERVE_OWNER": owner}
    return Mlserve(home, port, env)


def teardown_mlserve(ms: Mlserve, client=None) -> None:
    ms("stop", "--all", check=False, timeout=300)
    ms("gateway", "stop", check=False)
    if client is not None:
        for container in client.containers.list(all=True, filters={"label": f"io.mlserve.home={ms.home}"}):
            container.remove(force=True)
    shutil.rmtree(ms.home, ignore_errors=True)


@pytest.fixture
def mlserve(docker_client, nginx_available):
    ms = make_mlserve()
    yield ms
    teardown_mlserve(ms, docker_client)


@pytest.fixture(scope="module")
def mlserve_module(docker_client, nginx_available):
    ms = make_mlserve()
    yield ms
    teardown_mlserve(ms, docker_client)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of examples/hello to change freely."""
    target = tmp_path / "hello"
    shutil.copytree(EXAMPLES / "hello", target)
    return target
