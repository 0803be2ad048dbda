"""Host set-up: which packages count as missing, the apt commands, when dockerd is started,
which base image is made; with fakes for which/subprocess. Two checks touch the real engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest

from mlserve import host
from mlserve.constants import LOCAL_BASE_IMAGE
from mlserve.errors import EngineUnavailableError, SetupError

DEFAULT_IMAGE = "python:3.11-slim"


# -- fakes -----------------------------------------------------------------------------------


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
        self.calls: list[tuple[list[str], dict]] = []
        self.policy_during: list[str | None] = []

    def __call__(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        self.calls.append((list(command), kwargs))
        self.policy_during.append(host.POLICY_RC_D.read_text() if host.POLICY_RC_D.exists() else None)
        if self.returncode == 0 and command[:2] == ["apt-get", "install"]:
            programs = {p.name: p.program for p in host.PACKAGES}
            self.which.installed |= {programs[name] for name in command if name in programs}
        return subprocess.CompletedProcess(command, self.returncode, self.output, "")


ALL_PROGRAMS = {p.program for p in host.PACKAGES} | {"apt-get"}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A root Debian machine whose system paths live under tmp_path; tests patch which/run on it."""
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    monkeypatch.setattr(host, "POLICY_RC_D", tmp_path / "policy-rc.d")
    monkeypatch.setattr(host, "SYSTEM_NGINX_PIDFILE", tmp_path / "nginx.pid")
    monkeypatch.setattr(host, "DOCKER_SOCKET", tmp_path / "docker.sock")
    monkeypatch.setattr(host, "DOCKER_PIDFILE", tmp_path / "docker.pid")
    monkeypatch.setattr(host, "DOCKERD_LOG", tmp_path / "dockerd.log")
    monkeypatch.delenv("DOCKER_HOST", raising=False)

    def install(installed: set[str], returncode: int = 0, output: str = "") -> tuple[FakeWhich, FakeRun]:
        which = FakeWhich(installed)
        run = FakeRun(which, returncode, output)
        monkeypatch.setattr(host.shutil, "which", which)
        monkeypatch.setattr(host.subprocess, "run", run)
        return which, run

    return install


# -- packages --------------------------------------------------------------------------------


def test_missing_packages_look_in_sbin_too(machine):
    which, _ = machine({"dockerd", "debootstrap"})
    assert [p.name for p in host.missing_packages()] == ["nginx-light", "wrk"]
    assert all("/usr/sbin" in (path or "").split(os.pathsep) for path in which.paths)


def test_nothing_missing_runs_no_apt(machine):
    _, run = machine(ALL_PROGRAMS)
    messages: list[str] = []
    assert host.ensure_packages(messages.append) == []
    assert run.calls == []
    assert "docker.io, nginx-light, debootstrap, wrk ... ok" in messages[0]


def test_installs_only_what_is_missing_after_one_update(machine):
    _, run = machine({"dockerd", "debootstrap", "apt-get"})
    assert host.ensure_packages(lambda _: None) == ["nginx-light", "wrk"]
    commands = [command for command, _ in run.calls]
    assert commands == [["apt-get", "update"], host.apt_install_command(["nginx-light", "wrk"])]
    assert commands[1][:3] == ["apt-get", "install", "-y"] and commands[1][-2:] == ["nginx-light", "wrk"]
    for _, kwargs in run.calls:
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        assert kwargs["stdin"] == subprocess.DEVNULL
    # apt may not start services (a default nginx on :80) while it installs; the policy goes away after.
    assert all(policy and "exit 101" in policy for policy in run.policy_during)
    assert not host.POLICY_RC_D.exists()


def test_an_existing_service_policy_is_left_alone(machine):
    _, run = machine({"apt-get"})
    host.POLICY_RC_D.write_text("#!/bin/sh\nexit 0\n")
    host.ensure_packages(lambda _: None)
    assert run.policy_during == ["#!/bin/sh\nexit 0\n"] * 2
    assert host.POLICY_RC_D.read_text() == "#!/bin/sh\nexit 0\n"


def test_not_root_names_the_exact_apt_command(machine, monkeypatch):
    _, run = machine({"dockerd", "debootstrap", "apt-get"})
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(SetupError) as caught:
        host.ensure_packages(lambda _: None)
    assert "nginx-light (the gateway)" in caught.value.message
    assert "apt-get update && apt-get install -y nginx-light wrk" in caught.value.hint
    assert run.calls == []


def test_without_apt_get_names_the_programs(machine):
    machine({"dockerd"})
    with pytest.raises(SetupError) as caught:
        host.ensure_packages(lambda _: None)
    assert "apt-get is not available" in caught.value.message
    assert "nginx, debootstrap, wrk" in caught.value.hint


def test_apt_failure_shows_its_output(machine):
    _, run = machine({"apt-get"}, returncode=100, output="E: Unable to locate package wrk\n")
    with pytest.raises(SetupError) as caught:
        host.ensure_packages(lambda _: None)
    assert caught.value.message == "`apt-get update` failed (exit 100)"
    assert "Unable to locate package wrk" in caught.value.hint
    assert len(run.calls) == 1 and not host.POLICY_RC_D.exists()


def test_default_nginx_started_by_the_package_is_stopped(machine):
    machine({"apt-get"})
    # Stands in for the distribution's nginx master: quits gracefully on SIGQUIT, as nginx does.
    stray = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGQUIT, lambda *_: sys.exit(3))\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert stray.stdout is not None and stray.stdout.readline() == "ready\n"
        host.SYSTEM_NGINX_PIDFILE.write_text(f"{stray.pid}\n")
        messages: list[str] = []
        host.ensure_packages(messages.append)
        assert stray.wait(timeout=5) == 3
        assert any("Stopping the default nginx" in m for m in messages)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


# -- the engine ------------------------------------------------------------------------------


class FakeDockerd:
    """subprocess.Popen for dockerd: 'starts' the engine (or exits at once with ``exit_code``)."""

    def __init__(self, state: dict, exit_code: int | None = None) -> None:
        self.state = state
        self.exit_code = exit_code
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, command: list[str], **kwargs):
        self.calls.append((command, kwargs))
        if self.exit_code is None:
            host.DOCKER_SOCKET.touch()
            self.state["up"] = True
        else:
            kwargs["stdout"].write(b"failed to start daemon: pid file found, ensure docker is not running\n")
        return SimpleNamespace(poll=lambda: self.exit_code, returncode=self.exit_code)


@pytest.fixture
def engine_down(machine, monkeypatch):
    """The engine does not answer until FakeDockerd starts it; engine.connect returns a token."""
    machine(ALL_PROGRAMS)
    state = {"up": False}
    monkeypatch.setattr(host, "engine_problem", lambda: None if state["up"] else "connection refused")
    monkeypatch.setattr(host.engine, "connect", lambda: "client")
    return state


def test_answering_engine_is_used_as_is(engine_down, monkeypatch):
    engine_down["up"] = True
    monkeypatch.setattr(host.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    assert host.ensure_engine(lambda _: None) == "client"


def test_starts_dockerd_detached_when_nothing_answers(engine_down, monkeypatch):
    dockerd = FakeDockerd(engine_down)
    monkeypatch.setattr(host.subprocess, "Popen", dockerd)
    messages: list[str] = []
    assert host.ensure_engine(messages.append, timeout=5) == "client"
    [(command, kwargs)] = dockerd.calls
    assert command == ["/usr/sbin/dockerd"]
    assert kwargs["start_new_session"] is True and kwargs["stdin"] == subprocess.DEVNULL
    assert kwargs["stdout"].name == str(host.DOCKERD_LOG) and kwargs["stderr"] == subprocess.STDOUT
    assert "/usr/sbin" in kwargs["env"]["PATH"].split(os.pathsep)
    assert any("Starting dockerd" in m for m in messages)


def test_a_running_dockerd_is_waited_for_not_started_twice(engine_down, monkeypatch):
    host.DOCKER_PIDFILE.write_text(str(os.getpid()))
    host.DOCKER_SOCKET.touch()
    monkeypatch.setattr(host.subprocess, "Popen", lambda *a, **k: pytest.fail("started a second dockerd"))
    threading.Timer(0.3, lambda: engine_down.update(up=True)).start()
    assert host.ensure_engine(lambda _: None, timeout=5) == "client"


def test_dockerd_that_exits_shows_its_log(engine_down, monkeypatch):
    monkeypatch.setattr(host.subprocess, "Popen", FakeDockerd(engine_down, exit_code=1))
    with pytest.raises(EngineUnavailableError) as caught:
        host.ensure_engine(lambda _: None, timeout=5)
    assert caught.value.message == "dockerd exited with code 1 while starting"
    assert "pid file found" in caught.value.hint


def test_dockerd_that_never_answers_times_out(engine_down, monkeypatch):
    monkeypatch.setattr(host.subprocess, "Popen", lambda *a, **k: SimpleNamespace(poll=lambda: None))
    with pytest.raises(EngineUnavailableError, match=r"did not answer .* within 0.5s"):
        host.ensure_engine(lambda _: None, timeout=0.5)


def test_docker_host_set_but_unreachable_is_not_papered_over(machine, monkeypatch):
    machine(ALL_PROGRAMS)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    monkeypatch.setattr(host.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    with pytest.raises(EngineUnavailableError) as caught:
        host.ensure_engine(lambda _: None)
    assert f"DOCKER_HOST=tcp://127.0.0.1:{port} does not answer" in caught.value.message
    assert "unset DOCKER_HOST" in caught.value.hint


def test_not_root_is_told_how_to_start_the_engine(engine_down, monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host.subprocess, "Popen", lambda *a, **k: pytest.fail("started dockerd"))
    with pytest.raises(EngineUnavailableError) as caught:
        host.ensure_engine(lambda _: None)
    assert "sudo mlserve setup" in caught.value.hint and "docker group" in caught.value.hint


def test_no_dockerd_installed_points_to_setup(machine, monkeypatch):
    machine({"nginx"})
    monkeypatch.setattr(host, "engine_problem", lambda: "connection refused")
    with pytest.raises(EngineUnavailableError) as caught:
        host.ensure_engine(lambda _: None)
    assert "dockerd is not installed" in caught.value.message and "docker.io" in caught.value.hint


# -- the base image --------------------------------------------------------------------------


class FakeImages:
    def __init__(self, present: set[str], pull_error: Exception | None = None, pull_blocks: bool = False) -> None:
        self.present = set(present)
        self.pull_error = pull_error
        self.pull_blocks = pull_blocks
        self.pulled: list[str] = []
        self.release = threading.Event()

    def get(self, ref: str):
        if ref not in self.present:
            raise docker.errors.ImageNotFound(ref)
        return ref

    def pull(self, ref: str):
        self.pulled.append(ref)
        if self.pull_blocks:
            self.release.wait(10)
        if self.pull_error:
            raise self.pull_error
        self.present.add(ref)


def fake_client(images: FakeImages):
    return SimpleNamespace(images=images)


@pytest.fixture
def builds(machine, monkeypatch):
    machine(ALL_PROGRAMS)
    built: list[str] = []
    monkeypatch.setattr(host, "build_local_base", lambda client, tag, report: built.append(tag))
    return built


UNREACHABLE = docker.errors.APIError("500", explanation='Get "https://registry-1.docker.io/v2/": no such host')


@pytest.mark.parametrize("present, expected", [
    ({DEFAULT_IMAGE}, DEFAULT_IMAGE),
    ({LOCAL_BASE_IMAGE}, LOCAL_BASE_IMAGE),
    ({DEFAULT_IMAGE, LOCAL_BASE_IMAGE}, DEFAULT_IMAGE),
])
def test_a_present_base_is_enough(builds, present, expected):
    images = FakeImages(present)
    assert host.ensure_base_image(lambda _: None, fake_client(images)) == expected
    assert images.pulled == [] and builds == []


def test_pulls_the_default_when_it_can(builds):
    images = FakeImages(set())
    assert host.ensure_base_image(lambda _: None, fake_client(images)) == DEFAULT_IMAGE
    assert images.pulled == [DEFAULT_IMAGE] and builds == []


def test_builds_the_local_base_when_nothing_can_be_pulled(builds):
    messages: list[str] = []
    images = FakeImages(set(), pull_error=UNREACHABLE)
    assert host.ensure_base_image(messages.append, fake_client(images), tag="mlserve/base:x") == "mlserve/base:x"
    assert builds == ["mlserve/base:x"]
    assert any("cannot pull (Get \"https://registry-1.docker.io/v2/\": no such host)" in m for m in messages)


def test_a_hanging_pull_is_given_up(builds, monkeypatch):
    monkeypatch.setattr(host, "PULL_TIMEOUT_S", 0.2)
    images = FakeImages(set(), pull_blocks=True, pull_error=UNREACHABLE)
    started = time.monotonic()
    try:
        assert host.pull(fake_client(images), DEFAULT_IMAGE, lambda _: None, timeout=0.2) is False
    finally:
        images.release.set()
    assert time.monotonic() - started < 2


def test_not_root_cannot_build_the_base(builds, monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(SetupError, match="cannot be pulled") as caught:
        host.ensure_base_image(lambda _: None, fake_client(FakeImages(set(), pull_error=UNREACHABLE)))
    assert "as root" in caught.value.hint and builds == []


def test_debootstrap_command_and_cleanup(machine, monkeypatch):
    _, run = machine(ALL_PROGRAMS)
    imported: list[tuple[Path, str, int]] = []

    def fake_import(client, root: Path, tag: str) -> None:
        (root / "etc").mkdir()  # what debootstrap would have left
        imported.append((root, tag, root.stat().st_mode & 0o777))

    monkeypatch.setattr(host, "import_tree", fake_import)
    host.build_local_base(object(), "mlserve/base:x", lambda _: None)
    [(command, _)] = run.calls
    root, tag, mode = imported[0]
    assert command == [
        "/usr/sbin/debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
        "bookworm", str(root), "http://deb.debian.org/debian",
    ]
    assert tag == "mlserve/base:x" and mode == 0o755  # the image's / must be traversable by uid 65534
    assert not root.exists()


def test_debootstrap_failure_is_reported_and_cleaned_up(machine, monkeypatch):
    _, run = machine(ALL_PROGRAMS, returncode=1, output="E: Failed getting release file http://deb.debian.org/...\n")
    monkeypatch.setattr(host, "import_tree", lambda *a: pytest.fail("imported a failed tree"))
    with pytest.raises(SetupError, match=r"debootstrap failed \(exit 1\)") as caught:
        host.build_local_base(object(), "mlserve/base:x", lambda _: None)
    assert "Failed getting release file" in caught.value.hint
    assert not Path(run.calls[0][0][4]).exists()


# -- against the real engine -----------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        reason = "host set-up needs root"
        if os.environ.get("MLSERVE_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.integration
def test_import_tree_makes_a_labelled_image(docker_client, tmp_path):
    (tmp_path / "hello.txt").write_text("hi\n")
    tag = f"mlserve/test-import:{uuid.uuid4().hex[:12]}"
    try:
        host.import_tree(docker_client, tmp_path, tag)
        config = docker_client.images.get(tag).attrs["Config"]
        assert config["Labels"] == {host.LABEL_BASE: "debootstrap-bookworm"}
        assert config["Cmd"] == ["python3"] and "LANG=C.UTF-8" in config["Env"]
    finally:
        try:
            docker_client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass


@pytest.mark.integration
def test_setup_on_this_machine_is_idempotent_and_fast():
    _require_root()
    messages: list[str] = []
    host.setup(messages.append)  # may install or build on a fresh machine
    started = time.monotonic()
    host.setup(messages.append)
    assert time.monotonic() - started < 2, messages
    assert host.engine_problem() is None
    client = host.engine.connect()
    try:
        assert any(host._image_exists(client, ref) for ref in (DEFAULT_IMAGE, LOCAL_BASE_IMAGE))
    finally:
        client.close()
