"""The nginx gateway mlserve manages: configuration rendered from the state, checked, reloaded gracefully."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import requests

from mlserve.constants import ENDPOINT_ID_LENGTH
from mlserve.errors import GatewayError, GatewayPortInUseError, NginxNotInstalledError
from mlserve.home import Home
from mlserve.host import find_program
from mlserve.render import render

CONFIG_NAME = "nginx.conf"
RELOAD_WAIT_S = 10.0
INSTALL_HINT = "Install it with `apt-get install -y nginx-light` (or `mlserve setup` as root), or point MLSERVE_NGINX at an nginx binary."


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    body_limit_mb: int
    timeout_s: int


@dataclass(frozen=True)
class Route:
    """One job as the gateway sees it; only a healthy job takes traffic."""

    job_id: str
    name: str  # owner/projects/project/N
    project_key: str  # owner/projects/project
    socket: str
    healthy: bool  # healthy and running: it takes traffic
    reason: str | None = None  # why it takes no traffic


@dataclass(frozen=True)
class ProjectRoutes:
    key: str
    sockets: tuple[str, ...]  # of the healthy jobs, the round robin

    @property
    def slug(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GatewayStatus:
    running: bool
    pid: int | None
    url: str
    config: Path
    routes: int


class Gateway:
    """nginx under ``$MLSERVE_HOME/gateway``; every change re-renders the whole configuration."""

    def __init__(self, home: Home, settings: GatewaySettings) -> None:
        self.home = home
        self.settings = settings
        self.dir = home.gateway_dir
        self.config = self.dir / CONFIG_NAME
        self.pidfile = self.dir / "nginx.pid"

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    # -- finding nginx and the port ------------------------------------------------------------

    def nginx(self) -> str:
        """The nginx binary: MLSERVE_NGINX, else nginx on PATH or in sbin. Raises NginxNotInstalledError."""
        explicit = os.environ.get("MLSERVE_NGINX")
        found = explicit if explicit and os.access(explicit, os.X_OK) else None if explicit else find_program("nginx")
        if not found:
            where = f"MLSERVE_NGINX={explicit} is not an executable" if explicit else "nginx is not installed"
            raise NginxNotInstalledError(f"the gateway cannot start: {where}", INSTALL_HINT)
        return found

    def preflight(self) -> None:
        """Fail early, before any build, when the gateway could not start: nginx missing, port taken."""
        self.nginx()
        self._check_port()

    def _check_port(self) -> None:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.settings.host, self.settings.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise self._port_in_use() from None
                raise GatewayError(f"cannot listen on {self.settings.host}:{self.settings.port}: {exc}") from None

    def _port_in_use(self) -> GatewayPortInUseError:
        port = self.settings.port
        return GatewayPortInUseError(
            f"port {port} on {self.settings.host} is already in use, so the gateway cannot listen there",
            f"Stop what uses it (`ss -ltnp 'sport = :{port}'`), or pick another port: "
            f"`MLSERVE_GATEWAY_PORT={port + 1} mlserve ...` or `mlserve gateway start --port {port + 1}`.",
        )

    # -- running -------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The master's pid when our nginx runs."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"nginx" in cmdline and str(self.dir).encode() in cmdline else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def render(self, routes: Iterable[Route], projects: Iterable[str]) -> tuple[str, str]:
        """nginx.conf for ``routes`` and its generation (a hash of it); ``projects`` are all known projects."""
        routes = sorted(routes, key=lambda r: r.name)
        keys = sorted(set(projects) | {r.project_key for r in routes})
        project_routes = [
            ProjectRoutes(key, tuple(r.socket for r in routes if r.project_key == key and r.healthy)) for key in keys
        ]
        context = dict(
            dir=str(self.dir), host=self.settings.host, port=self.settings.port,
            body_limit_mb=self.settings.body_limit_mb, timeout_s=self.settings.timeout_s,
            worker_processes=min(os.cpu_count() or 1, 4), id_length=ENDPOINT_ID_LENGTH,
            user="root" if os.geteuid() == 0 else None, jobs=routes, projects=project_routes,
        )
        body = render("nginx.conf.j2", generation="GENERATION", **context)
        generation = hashlib.sha256(body.encode()).hexdigest()[:16]
        return body.replace("GENERATION", generation), generation

    def apply(self, routes: Iterable[Route], projects: Iterable[str] = ()) -> None:
        """Render, check with ``nginx -t``, then start nginx or reload it gracefully and wait until it serves.

        Raises NginxNotInstalledError, GatewayPortInUseError or GatewayError (with nginx's words).
        """
        nginx = self.nginx()
        text, generation = self.render(routes, projects)
        running = self.is_running()
        if running and self.config.exists() and self.config.read_text() == text:
            return
        for folder in ("tmp/body", "tmp/uwsgi", "tmp/proxy", "tmp/fastcgi", "tmp/scgi"):
            (self.dir / folder).mkdir(parents=True, exist_ok=True)
        candidate = self.dir / f"{CONFIG_NAME}.new"
        candidate.write_text(text)
        check = self._nginx(nginx, "-t", "-c", str(candidate))
        if check.returncode != 0:
            candidate.unlink(missing_ok=True)
            if "Address already in use" in check.stderr:
                raise self._port_in_use()
            raise GatewayError("the rendered gateway configuration is invalid", _tail(check.stderr))
        if running and f"listen {self.settings.host}:{self.settings.port} " not in self.config.read_text():
            self._check_port()  # a new port: nginx would fail to bind it only after the reload
        candidate.replace(self.config)
        if running:
            os.kill(self.pid() or 0, signal.SIGHUP)
        else:
            self._check_port()
            started = self._nginx(nginx, "-c", str(self.config))
            if started.returncode != 0:
                if "Address already in use" in started.stderr:
                    raise self._port_in_use()
                raise GatewayError("nginx failed to start", _tail(started.stderr))
        self._wait_for(generation)

    def _nginx(self, nginx: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"), *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )

    def _wait_for(self, generation: str) -> None:
        """Until nginx answers with this configuration (a reload takes effect asynchronously)."""
        deadline = time.monotonic() + RELOAD_WAIT_S
        url = f"{self.url}/_mlserve/generation"
        session = requests.Session()
        session.trust_env = False  # loopback: never through a proxy from the environment
        while True:
            try:
                if session.get(url, timeout=2).text.strip() == generation:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise GatewayError(
                    f"the gateway did not take its new configuration within {RELOAD_WAIT_S:g}s",
                    f"See {self.dir / 'error.log'}.",
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> bool:
        """Stop nginx gracefully (requests in flight finish); False when it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout
        while self.pid() == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid() == pid:
            os.kill(pid, signal.SIGTERM)
        return True

    def status(self) -> GatewayStatus:
        routes = self.config.read_text().count("upstream job_") if self.config.exists() else 0
        return GatewayStatus(self.is_running(), self.pid(), self.url, self.config, routes)


def _tail(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
