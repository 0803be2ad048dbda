"""apt packages of the host set-up: which count as missing, the apt commands, services held back;
with fakes for which/subprocess.run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlserve import apt
from mlserve.errors import SetupError

from .host_fakes import ALL_PROGRAMS, Install, make_machine

# The gateway router's packages are told by a file they install; these tests are about the others.
ROUTER = {p.program for p in apt.PACKAGES if p.program.startswith("/")}

@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Install:
    return make_machine(monkeypatch, tmp_path)


def test_missing_packages_look_in_sbin_too(machine):
    which, _ = machine({"dockerd", "debootstrap"} | ROUTER)
    assert [p.name for p in apt.missing_packages()] == ["nginx-light", "wrk"]
    assert all("/usr/sbin" in (path or "").split(os.pathsep) for path in which.paths)


def test_nothing_missing_runs_no_apt(machine):
    _, run = machine(ALL_PROGRAMS)
    messages: list[str] = []
    assert apt.ensure_packages(messages.append) == []
    assert run.calls == []
    assert ("docker.io, nginx-light, libnginx-mod-http-lua, lua-resty-core, lua-cjson, debootstrap, wrk ... ok"
            in messages[0])


def test_installs_only_what_is_missing_after_one_update(machine):
    _, run = machine({"dockerd", "debootstrap", "apt-get"} | ROUTER)
    assert apt.ensure_packages(lambda _: None) == ["nginx-light", "wrk"]
    commands = [command for command, _ in run.calls]
    assert commands == [["apt-get", "update"], apt.apt_install_command(["nginx-light", "wrk"])]
    assert commands[1][:3] == ["apt-get", "install", "-y"] and commands[1][-2:] == ["nginx-light", "wrk"]
    for _, kwargs in run.calls:
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        assert kwargs["stdin"] == subprocess.DEVNULL
    # apt may not start services (a default nginx on :80) while it installs; the policy goes away after.
    assert all(policy and "exit 101" in policy for policy in run.policy_during)
    assert not apt.POLICY_RC_D.exists()


def test_an_existing_service_policy_is_left_alone(machine):
    _, run = machine({"apt-get"})
    apt.POLICY_RC_D.write_text("#!/bin/sh\nexit 0\n")
    apt.ensure_packages(lambda _: None)
    assert run.policy_during == ["#!/bin/sh\nexit 0\n"] * 2
    assert apt.POLICY_RC_D.read_text() == "#!/bin/sh\nexit 0\n"


def test_not_root_names_the_exact_apt_command(machine, monkeypatch):
    _, run = machine({"dockerd", "debootstrap", "apt-get"} | ROUTER)
    monkeypatch.setattr(apt.os, "geteuid", lambda: 1000)
    with pytest.raises(SetupError) as caught:
        apt.ensure_packages(lambda _: None)
    assert "nginx-light (the gateway)" in caught.value.message
    assert "apt-get update && apt-get install -y nginx-light wrk" in caught.value.hint
    assert run.calls == []


def test_without_apt_get_names_the_programs(machine):
    machine({"dockerd"} | ROUTER)
    with pytest.raises(SetupError) as caught:
        apt.ensure_packages(lambda _: None)
    assert "apt-get is not available" in caught.value.message
    assert "nginx, debootstrap, wrk" in caught.value.hint


def test_apt_failure_shows_its_output(machine):
    _, run = machine({"apt-get"}, returncode=100, output="E: Unable to locate package wrk\n")
    with pytest.raises(SetupError) as caught:
        apt.ensure_packages(lambda _: None)
    assert caught.value.message == "`apt-get update` failed (exit 100)"
    assert "Unable to locate package wrk" in caught.value.hint
    assert len(run.calls) == 1 and not apt.POLICY_RC_D.exists()


def test_default_nginx_started_by_the_package_is_stopped(machine):
    machine({"apt-get"})
    # Stands in for the distribution's nginx master: quits gracefully on SIGQUIT, as nginx does.
    stray = subprocess.Popen(
        [sys.executable, "-c", ("import signal, sys, time\n"
                                "signal.signal(signal.SIGQUIT, lambda *_: sys.exit(3))\n"
                                "print('ready', flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert stray.stdout is not None and stray.stdout.readline() == "ready\n"
        apt.SYSTEM_NGINX_PIDFILE.write_text(f"{stray.pid}\n")
        messages: list[str] = []
        apt.ensure_packages(messages.append)
        assert stray.wait(timeout=5) == 3
        assert any("Stopping the default nginx" in m for m in messages)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_the_gateways_router_packages_are_installed_when_their_files_are_missing(machine):
    _, run = machine(ALL_PROGRAMS - ROUTER)
    assert apt.ensure_packages(lambda _: None) == ["libnginx-mod-http-lua", "lua-resty-core", "lua-cjson"]
    assert any("libnginx-mod-http-lua" in command for command, _ in run.calls)
