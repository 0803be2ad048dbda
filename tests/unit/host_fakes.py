"""Fakes for the host set-up tests (apt, dockerd, base image): a root Debian machine whose
system paths live under tmp_path, with which/subprocess.run that record what they were asked."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlserve import apt, dockerd


class FakeWhich:
    """shutil.which over a set of installed programs; records the search path it was given."""

    def __init__(self, installed: set[str]) -> None:
        self.installed = set(installed)
        self.paths: list[str | None] = []

    def __call__(self, name: str, mode: int = os.F_OK | os.X_OK, path: str | None = None) -> str | None:
        self.paths.append(path)
        return f"/usr/sbin/{name}" if name in self.installed else None


class FakeRun:
    """subprocess.run that records commands; apt-get install 'installs' the packages' programs."""

    def __init__(self, which: FakeWhich, returncode: int = 0, output: str = "") -> None:
        self.which = which
        self.returncode = returncode
        self.output = output
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.policy_during: list[str | None] = []

    def __call__(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(command), kwargs))
        self.policy_during.append(apt.POLICY_RC_D.read_text() if apt.POLICY_RC_D.exists() else None)
        if self.returncode == 0 and command[:2] == ["apt-get", "install"]:
            programs = {p.name: p.program for p in apt.PACKAGES}
            self.which.installed |= {programs[name] for name in command if name in programs}
        return subprocess.CompletedProcess(command, self.returncode, self.output, "")


ALL_PROGRAMS = {p.program for p in apt.PACKAGES} | {"apt-get"}

Install = Callable[..., tuple[FakeWhich, FakeRun]]


def make_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Install:
    """A root Debian machine whose system paths live under tmp_path; returns install(programs, returncode, output)
    which patches which/run so that exactly ``programs`` are installed."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(apt, "POLICY_RC_D", tmp_path / "policy-rc.d")
    monkeypatch.setattr(apt, "SYSTEM_NGINX_PIDFILE", tmp_path / "nginx.pid")
    monkeypatch.setattr(dockerd, "DOCKER_SOCKET", tmp_path / "docker.sock")
    monkeypatch.setattr(dockerd, "DOCKER_PIDFILE", tmp_path / "docker.pid")
    monkeypatch.setattr(dockerd, "DOCKERD_LOG", tmp_path / "dockerd.log")
    monkeypatch.delenv("DOCKER_HOST", raising=False)

    def install(installed: set[str], returncode: int = 0, output: str = "") -> tuple[FakeWhich, FakeRun]:
        which = FakeWhich(installed)
        run = FakeRun(which, returncode, output)
        monkeypatch.setattr(shutil, "which", which)
        monkeypatch.setattr(apt, "file_exists", lambda path: path in which.installed)
        monkeypatch.setattr(subprocess, "run", run)
        return which, run

    return install
