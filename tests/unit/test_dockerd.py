"""Starting the Docker engine: when dockerd is started, waited for, or not touched; with fakes for
Popen, the engine's ping and Engine.connect."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from mlserve import dockerd
from mlserve.errors import EngineUnavailableError

from .host_fakes import ALL_PROGRAMS, Install, make_machine


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Install:
    return make_machine(monkeypatch, tmp_path)


class FakeDockerd:
    """subprocess.Popen for dockerd: 'starts' the engine (or exits at once with ``exit_code``)."""

    def __init__(self, state: dict[str, bool], exit_code: int | None = None) -> None:
        self.state = state
        self.exit_code = exit_code
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, command: list[str], **kwargs: Any) -> SimpleNamespace:
        self.calls.append((command, kwargs))
        if self.exit_code is None:
            dockerd.DOCKER_SOCKET.touch()
            self.state["up"] = True
        else:
            kwargs["stdout"].write(b"failed to start daemon: pid file found, ensure docker is not running\n")
        return SimpleNamespace(poll=lambda: self.exit_code, returncode=self.exit_code)


@pytest.fixture
def engine_down(machine, monkeypatch):
    """The engine does not answer until FakeDockerd starts it; Engine.connect() returns a token."""
    machine(ALL_PROGRAMS)
    state = {"up": False}
    monkeypatch.setattr(dockerd, "engine_problem", lambda: None if state["up"] else "connection refused")
    monkeypatch.setattr(dockerd, "Engine", SimpleNamespace(connect=lambda timeout=120: "client"))
    return state


def test_answering_engine_is_used_as_is(engine_down, monkeypatch):
    engine_down["up"] = True
    monkeypatch.setattr(dockerd.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    assert dockerd.ensure_engine(lambda _: None) == "client"


def test_starts_dockerd_detached_when_nothing_answers(engine_down, monkeypatch):
    fake = FakeDockerd(engine_down)
    monkeypatch.setattr(dockerd.subprocess, "Popen", fake)
    messages: list[str] = []
    assert dockerd.ensure_engine(messages.append, timeout=5) == "client"
    [(command, kwargs)] = fake.calls
    assert command == ["/usr/sbin/dockerd"]
    assert kwargs["start_new_session"] is True and kwargs["stdin"] == subprocess.DEVNULL
    assert kwargs["stdout"].name == str(dockerd.DOCKERD_LOG) and kwargs["stderr"] == subprocess.STDOUT
    assert "/usr/sbin" in kwargs["env"]["PATH"].split(os.pathsep)
    assert any("Starting dockerd" in m for m in messages)


def test_a_running_dockerd_is_waited_for_not_started_twice(engine_down, monkeypatch):
    dockerd.DOCKER_PIDFILE.write_text(str(os.getpid()))
    dockerd.DOCKER_SOCKET.touch()
    monkeypatch.setattr(dockerd.subprocess, "Popen", lambda *a, **k: pytest.fail("started a second dockerd"))
    threading.Timer(0.3, lambda: engine_down.update(up=True)).start()
    assert dockerd.ensure_engine(lambda _: None, timeout=5) == "client"


def test_dockerd_that_exits_shows_its_log(engine_down, monkeypatch):
    monkeypatch.setattr(dockerd.subprocess, "Popen", FakeDockerd(engine_down, exit_code=1))
    with pytest.raises(EngineUnavailableError) as caught:
        dockerd.ensure_engine(lambda _: None, timeout=5)
    assert caught.value.message == "dockerd exited with code 1 while starting"
    assert "pid file found" in caught.value.hint


def test_dockerd_that_never_answers_times_out(engine_down, monkeypatch):
    monkeypatch.setattr(dockerd.subprocess, "Popen", lambda *a, **k: SimpleNamespace(poll=lambda: None))
    with pytest.raises(EngineUnavailableError, match=r"did not answer .* within 0.5s"):
        dockerd.ensure_engine(lambda _: None, timeout=0.5)


def test_docker_host_set_but_unreachable_is_not_papered_over(machine, monkeypatch):
    machine(ALL_PROGRAMS)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    monkeypatch.setattr(dockerd.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    with pytest.raises(EngineUnavailableError) as caught:
        dockerd.ensure_engine(lambda _: None)
    assert f"DOCKER_HOST=tcp://127.0.0.1:{port} does not answer" in caught.value.message
    assert "unset DOCKER_HOST" in caught.value.hint


def test_not_root_is_told_how_to_start_the_engine(engine_down, monkeypatch):
    monkeypatch.setattr(dockerd.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(dockerd.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    with pytest.raises(EngineUnavailableError) as caught:
        dockerd.ensure_engine(lambda _: None)
    assert "sudo mlserve setup" in caught.value.hint and "docker group" in caught.value.hint


def test_no_dockerd_installed_points_to_setup(machine, monkeypatch):
    machine({"nginx"})
    monkeypatch.setattr(dockerd, "engine_problem", lambda: "connection refused")
    with pytest.raises(EngineUnavailableError) as caught:
        dockerd.ensure_engine(lambda _: None)
    assert "dockerd is not installed" in caught.value.message and "docker.io" in caught.value.hint


def test_engine_problem_gives_the_sdks_reason_not_an_exception(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    problem = dockerd.engine_problem()
    assert problem is not None and "No such file or directory" in problem
    monkeypatch.setenv("DOCKER_HOST", "garbage://x")
    assert "garbage://x" in (dockerd.engine_problem() or "")
