"""A Docker engine that answers: the one DOCKER_HOST names, else a local ``dockerd`` started in the background.

There is no systemd on the machines mlserve sets up, so ``dockerd`` runs in a session of its own,
logging to DOCKERD_LOG, and outlives the command that started it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import requests.exceptions

from .engine import Engine
from .errors import EngineUnavailableError, MlserveError
from .programs import SYSTEM_PATH, Report, find_program, live_pid, tail

DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKER_PIDFILE = Path("/var/run/docker.pid")
DOCKERD_LOG = Path("/var/log/mlserve-dockerd.log")
PROBE_TIMEOUT_S = 10


def ensure_engine(report: Report, timeout: float = 60) -> Engine:
    """Return an Engine connected to an answering engine, starting a local ``dockerd`` if none answers.

    dockerd is only started when DOCKER_HOST names no other engine, it is installed, and we
    are root. Raises EngineUnavailableError otherwise, or when it does not answer in ``timeout``.
    """
    problem = engine_problem()
    if problem is None:
        report(f"Docker engine at {_where()} ... ok")
        return Engine.connect()
    host = os.environ.get("DOCKER_HOST")
    if host and host not in (f"unix://{DOCKER_SOCKET}", f"unix://{DOCKER_SOCKET.resolve()}"):
        raise EngineUnavailableError(
            f"the Docker engine at DOCKER_HOST={host} does not answer ({problem})",
            "Start the engine DOCKER_HOST names, or unset DOCKER_HOST so that `mlserve setup` "
            "(as root) starts a local dockerd.",
        )
    dockerd = find_program("dockerd")
    if dockerd is None:
        raise EngineUnavailableError(
            f"no Docker engine answers at unix://{DOCKER_SOCKET} and dockerd is not installed",
            "Run `mlserve setup` as root (it installs docker.io), or set DOCKER_HOST to a running engine.",
        )
    if os.geteuid() != 0:
        raise EngineUnavailableError(
            f"no Docker engine answers at unix://{DOCKER_SOCKET} ({problem})",
            "Start it as root (`sudo mlserve setup`, or `sudo dockerd &`). If it runs already, "
            "join the docker group (`sudo usermod -aG docker $USER`, then log in again).",
        )
    process = None
    if live_pid(DOCKER_PIDFILE) is not None:
        report("dockerd runs but does not answer yet; waiting for it ...")
    else:
        report(f"Starting dockerd in the background (log: {DOCKERD_LOG}) ...")
        process = _start_dockerd(dockerd)
    started = time.monotonic()
    _wait_for_engine(process, timeout)
    report(f"Docker engine answering after {time.monotonic() - started:.1f}s")
    return Engine.connect()


def engine_problem() -> str | None:
    """None when the engine DOCKER_HOST (or the local socket) names answers a ping, else why not."""
    try:
        Engine.connect(timeout=PROBE_TIMEOUT_S).close()
    except MlserveError as exc:
        cause = exc.__cause__  # the SDK's own words; the wrapper's message would repeat ours
        return (str(cause) or type(cause).__name__) if cause is not None else exc.message
    except (requests.exceptions.RequestException, OSError) as exc:  # what the wrapper leaves alone
        return str(exc) or type(exc).__name__
    return None


def _where() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"


def _start_dockerd(dockerd: str) -> subprocess.Popen[bytes]:
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": os.pathsep.join([SYSTEM_PATH, os.environ.get("PATH", "")])}
    with DOCKERD_LOG.open("ab") as log:
        # A session of its own: it outlives this command and a Ctrl-C of the terminal.
        return subprocess.Popen(
            [dockerd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env,
        )


def _wait_for_engine(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise EngineUnavailableError(
                f"dockerd exited with code {process.returncode} while starting",
                f"The end of {DOCKERD_LOG}:\n{tail(_read(DOCKERD_LOG))}",
            )
        if DOCKER_SOCKET.exists() and engine_problem() is None:
            return
        if time.monotonic() > deadline:
            raise EngineUnavailableError(
                f"dockerd did not answer on {DOCKER_SOCKET} within {timeout:g}s",
                f"The end of {DOCKERD_LOG}:\n{tail(_read(DOCKERD_LOG))}",
            )
        time.sleep(0.25)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
