"""The Debian packages mlserve needs on the host, installed with apt-get when they are missing.

apt must not start the services it installs: mlserve runs its own nginx instances and starts
``dockerd`` itself (there is no systemd), so a policy-rc.d holds them back while apt runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError
from .programs import Report, alive, find_program, live_pid, tail


@dataclass(frozen=True)
class Package:
    name: str  # apt package
    program: str  # what tells us it is installed: a program on PATH, or the absolute path of a file it installs
    purpose: str

    @property
    def installed(self) -> bool:
        if self.program.startswith("/"):
            return file_exists(self.program)
        return find_program(self.program) is not None


def file_exists(path: str) -> bool:
    return Path(path).exists()


PACKAGES = (
    Package("docker.io", "dockerd", "the Docker engine"),
    Package("nginx-light", "nginx", "the gateway"),
    Package("libnginx-mod-http-lua", "/usr/lib/nginx/modules/ngx_http_lua_module.so", "the gateway's router"),
    Package("lua-resty-core", "/usr/share/lua/5.1/resty/core.lua", "the gateway's router"),
    Package("lua-cjson", "/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so", "the gateway's router"),
    Package("debootstrap", "debootstrap", "building the local base image"),
    Package("wrk", "wrk", "the benchmarks"),
)
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
SYSTEM_NGINX_PIDFILE = Path("/run/nginx.pid")


def missing_packages() -> list[Package]:
    return [package for package in PACKAGES if not package.installed]


def apt_install_command(names: list[str]) -> list[str]:
    return [
        "apt-get", "install", "-y",
        "-o", "DPkg::Lock::Timeout=300",  # wait for another apt run rather than fail
        "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
        *names,
    ]


def ensure_packages(report: Report) -> list[str]:
    """apt-get install whatever of PACKAGES is missing; returns the names installed.

    Raises SetupError when something is missing and we are not root, apt-get is absent,
    or apt-get fails.
    """
    missing = missing_packages()
    if not missing:
        report(f"Packages: {', '.join(p.name for p in PACKAGES)} ... ok")
        return []
    names = [p.name for p in missing]
    what = ", ".join(f"{p.name} ({p.purpose})" for p in missing)
    if os.geteuid() != 0:
        raise SetupError(
            f"missing packages: {what}",
            f"Install them as root: `apt-get update && apt-get install -y {' '.join(names)}`, "
            "or run `mlserve setup` as root.",
        )
    if find_program("apt-get") is None:
        raise SetupError(
            f"missing packages: {what}, and apt-get is not available",
            "mlserve setup knows Debian and Ubuntu; elsewhere install "
            + ", ".join(p.program for p in missing) + " with your package manager.",
        )
    report(f"Installing {' '.join(names)} with apt-get (a minute or two) ...")
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _services_held_back():
        for command in (["apt-get", "update"], apt_install_command(names)):
            result = subprocess.run(
                command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                raise SetupError(
                    f"`{' '.join(command)}` failed (exit {result.returncode})",
                    tail(result.stdout + result.stderr) + "\nFix the apt problem above, then run `mlserve setup` again.",
                )
    still = missing_packages()
    if still:
        raise SetupError(
            f"apt-get installed {' '.join(names)} but {', '.join(p.program for p in still)} is still not found",
            f"Check `dpkg -L {still[0].name}`.",
        )
    if "nginx-light" in names:
        _stop_system_nginx(report)
    report(f"Installed {' '.join(names)} in {time.monotonic() - started:.0f}s")
    return names


@contextmanager
def _services_held_back() -> Iterator[None]:
    """Keep apt from starting services: a default nginx on port 80, a dockerd we did not start."""
    if POLICY_RC_D.exists():  # the machine already has a policy; respect it
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# mlserve setup: no service starts while it installs packages\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def _stop_system_nginx(report: Report) -> None:
    """Stop the distribution's default nginx if installing it started one anyway."""
    pid = live_pid(SYSTEM_NGINX_PIDFILE)
    if pid is None:
        return
    report(f"Stopping the default nginx the package started (pid {pid}); mlserve runs its own.")
    os.kill(pid, signal.SIGQUIT)  # what `nginx -s quit` sends: finish requests, then exit
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
