"""`mlserve setup` as a whole: the order of its steps (apt, dockerd, base image) and what it reports.
The steps themselves are tested in test_apt.py, test_dockerd.py and test_base_image.py; one check
runs the real set-up on this machine."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest

from mlserve import dockerd, host
from mlserve.constants import LOCAL_BASE_IMAGE
from mlserve.engine import Engine
from mlserve.errors import EngineUnavailableError

DEFAULT_IMAGE = "python:3.11-slim"
CLI = Path(host.__file__).parent
SPLIT = ("host.py", "apt.py", "dockerd.py", "base_image.py", "programs.py")


class FakeEngine:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture
def steps(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(host, "ensure_packages", lambda report: calls.append("packages") or [])
    monkeypatch.setattr(host, "gateway_account", lambda report: calls.append("user"))
    monkeypatch.setattr(host, "ensure_engine", lambda report: calls.append("engine") or FakeEngine(calls))

    def base(report, engine: FakeEngine) -> str:
        calls.append("base")
        return "mlserve/base:bookworm"

    monkeypatch.setattr(host, "ensure_base_image", base)
    return calls


def test_setup_runs_packages_user_engine_base_in_order_and_closes_the_engine(steps):
    messages: list[str] = []
    host.setup(messages.append)
    assert steps == ["packages", "user", "engine", "base", "close"]
    assert messages[-1].startswith("Ready in ") and messages[-1].endswith("builds start from mlserve/base:bookworm.")


def test_setup_closes_the_engine_when_the_base_fails(steps, monkeypatch):
    def broken(report, engine):
        raise EngineUnavailableError("the engine went away")

    monkeypatch.setattr(host, "ensure_base_image", broken)
    with pytest.raises(EngineUnavailableError):
        host.setup(lambda _: None)
    assert steps == ["packages", "user", "engine", "close"]


def test_what_other_modules_import_from_host_is_still_there():
    from mlserve.host import ensure_engine, find_program, setup

    assert callable(setup) and ensure_engine is dockerd.ensure_engine
    assert find_program("sh") is not None and find_program("no-such-program-mlserve") is None


@pytest.mark.parametrize("name", SPLIT)
def test_split_modules_import_their_siblings_relatively(name):
    tree = ast.parse((CLI / name).read_text())
    absolute = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
                and (n.module or "").split(".")[0] == "mlserve"]
    absolute += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                 if a.name.split(".")[0] == "mlserve"]
    assert absolute == []


def test_each_step_module_stays_small():
    assert all(len((CLI / name).read_text().splitlines()) < 250 for name in SPLIT)


@pytest.mark.integration
def test_setup_on_this_machine_is_idempotent_and_fast():
    if os.geteuid() != 0:
        reason = "host set-up needs root"
        if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)
    messages: list[str] = []
    host.setup(messages.append)  # may install or build on a fresh machine
    started = time.monotonic()
    host.setup(messages.append)
    assert time.monotonic() - started < 2, messages
    assert dockerd.engine_problem() is None
    engine = Engine.connect()
    try:
        assert any(engine.image_exists(ref) for ref in (DEFAULT_IMAGE, LOCAL_BASE_IMAGE))
    finally:
        engine.close()
