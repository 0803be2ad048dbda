"""The nginx gateway mlserve manages.

Two planes: nginx.conf holds only the gateway's own settings (port, limits) and is reloaded only when
they change; who takes traffic is a routing table pushed to nginx's Lua router over a control socket
(templates/lua/mlserve_router.lua), live on every worker without a reload, so no keep-alive client
ever loses a connection to a routing change.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mlserve_runtime.logfile import truncate_if_large

from . import tls
from .constants import ENDPOINT_ID_LENGTH, GATEWAY_USER, STATS_SOCKET_NAME
from .errors import GatewayError, GatewayPortInUseError, MlserveError, NginxNotInstalledError
from .home import Home
from .privileges import prepare_gateway
from .programs import find_program
from .render import render
from .traffic import Traffic, weights

CONFIG_NAME = "nginx.conf"
LUA_MODULES = ("mlserve_router.lua", "mlserve_guard.lua")  # templates/lua: the router and what it guards with
STATS_NAME = Path(STATS_SOCKET_NAME).name  # beside each instance's socket: its uWSGI master's alone
ROUTES_NAME = "routes.json"  # the last routing table pushed (what `gateway status` counts)
# In a folder of root's alone: nginx makes the socket 0666, and only mlserve may push routes.
CONTROL_SOCKET = "control/control.sock"
LOG_NAMES = ("access.log", "error.log")
RELOAD_WAIT_S = 10.0  # for a reload or a start to take effect on every worker
ORPHAN_WAIT_S = 5.0  # for killed leftovers of an earlier nginx to be gone
POLL_S = 0.02
INSTALL_HINT = "Install it with `apt-get install -y nginx-light` (or `mlserve setup` as root), or point MLSERVE_NGINX at an nginx binary."
# nginx's Lua router: Debian's libnginx-mod-http-lua (with its NDK module), lua-resty-core and lua-cjson.
NGINX_MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so")
LUA_PATH = "/usr/share/lua/5.1"
LUA_HINT = ("Install it with `apt-get install -y libnginx-mod-http-lua lua-resty-core lua-cjson` "
            "(or `mlserve setup` as root).")

# Only text of these shapes goes into nginx.conf: nothing an app or a user writes can end a string or a
# directive there (the names are validated where they are made; this is defence in depth).
PROJECT_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]*/projects/[a-z0-9][a-z0-9_-]*")
JOB_NAME_RE = re.compile(rf"{PROJECT_KEY_RE.pattern}/[0-9]+")
JOB_ID_RE = re.compile(rf"[A-Za-z0-9]{{{ENDPOINT_ID_LENGTH}}}")
PATH_RE = re.compile(r"(/[A-Za-z0-9_.@+~-]+)+")
# scheme://host[:port][/path], nothing nginx.conf could read as the end of a string or directive.
PUBLIC_URL_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~-]+)*")


@dataclass(frozen=True)
class GatewaySettings:
    host: str  # an IP address; 0.0.0.0 or :: for all of this machine's
    port: int
    body_limit_mb: int
    timeout_s: int
    tls: bool = False  # serve HTTPS with the certificate in gateway/tls (plain HTTP is redirected)
    public_url: str | None = None  # how clients reach the gateway (a proxy, a DNS name), if not host:port

    @property
    def loopback(self) -> bool:
        """Whether only this machine can call the gateway: it listens on loopback and no public URL says
        that something (a proxy) brings others to it."""
        if not ipaddress.ip_address(self.host).is_loopback:
            return False
        public = urllib.parse.urlsplit(self.public_url).hostname if self.public_url else None
        return public is None or public == "localhost" or _is_loopback_address(public)

    @property
    def url(self) -> str:
        """The base of every endpoint mlserve prints."""
        if self.public_url:
            return self.public_url
        address = ipaddress.ip_address(self.host)
        name = socket.getfqdn() if address.is_unspecified else self.host
        return f"{'https' if self.tls else 'http'}://{f'[{name}]' if ':' in name else name}:{self.port}"

    @property
    def local_address(self) -> str:
        """Where mlserve itself reaches the gateway on this machine."""
        address = ipaddress.ip_address(self.host)
        if address.is_unspecified:
            return "::1" if address.version == 6 else "127.0.0.1"
        return self.host


@dataclass(frozen=True)
class Route:
    """One job as the gateway sees it; only a healthy job takes traffic.

    No free text: everything here is rendered into nginx.conf, so why a job is sick stays in the state.
    """

    job_id: str
    name: str  # owner/projects/project/N
    project_key: str  # owner/projects/project
    socket: str
    healthy: bool  # healthy and running: it takes traffic
    version: int = 0
    fallback: bool = False  # its version takes traffic only when no primary version can


@dataclass(frozen=True)
class ProjectTraffic:
    """How one project's endpoint splits its traffic (see traffic.py)."""

    key: str  # owner/projects/project
    traffic: Traffic = Traffic()
    latest: int = 0  # the newest version number: a higher one is unknown (404), a lower one may return
    guard: Mapping[str, Any] = field(default_factory=lambda: {"access": "public"})  # guard.guard_table()


@dataclass(frozen=True)
class GatewayStatus:
    running: bool
    pid: int | None
    url: str
    config: Path
    routes: int
    orphans: tuple[int, ...] = ()  # nginx processes of this gateway left without their master


def worker_processes() -> int:
    return min(os.cpu_count() or 1, 4)


def nginx_user() -> str | None:
    # Started as root, nginx runs its workers, which face the network, as the gateway's own user and
    # group: they reach the instances' sockets and nothing else (privileges.py). Not root, the caller's.
    return f"{GATEWAY_USER} {GATEWAY_USER}" if os.geteuid() == 0 else None


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
        return self.settings.url

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
        """Fail early, before any build, when the gateway could not start: nginx missing, port taken.

        Leftovers of this gateway holding the port do not count: starting it removes them.
        """
        self.nginx()
        lua_modules()
        if not self._orphans():
            self._check_port()

    def _check_port(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.settings.host, self.settings.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise self._port_in_use() from None
                hint = ("Listen on one of this machine's addresses (`ip -br addr`), or 0.0.0.0 for all of them."
                        if exc.errno == errno.EADDRNOTAVAIL else None)
                raise GatewayError(f"cannot listen on {self._address}: {exc.strerror or exc}", hint) from None

    @property
    def _address(self) -> str:
        """host:port as nginx writes it (an IPv6 address in brackets)."""
        host = self.settings.host
        return f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"

    def _port_taken(self, nginx_stderr: str) -> bool:
        """Whether nginx failed to bind our TCP port (not, say, the control socket)."""
        return any("Address already in use" in line and self._address in line for line in nginx_stderr.splitlines())

    def _port_in_use(self) -> GatewayPortInUseError:
        port = self.settings.port
        return GatewayPortInUseError(
            f"port {port} on {self.settings.host} is already in use, so the gateway cannot listen there",
            f"Stop what uses it (`ss -ltnp 'sport = :{port}'`), or pick another port: "
            f"`MLSERVE_GATEWAY_PORT={port + 1} mlserve ...` or `mlserve gateway start --port {port + 1}`.",
        )

    # -- rendering -----------------------------------------------------------------------------

    def render(self) -> tuple[str, str]:
        """nginx.conf (the gateway's own settings, no routes) and its generation (a hash of it, and of the
        router's code, so that an upgraded router is loaded).

        Raises GatewayError when a path or setting has a shape nginx.conf must not contain, and
        NginxNotInstalledError when nginx's Lua module is missing.
        """
        self._check_settings()
        router = resources.files("mlserve.templates") / "lua"
        context = dict(
            dir=str(self.dir), listen=self._address, tls=self._tls_context(),
            body_limit_mb=self.settings.body_limit_mb, timeout_s=self.settings.timeout_s,
            worker_processes=worker_processes(), user=nginx_user(), modules=lua_modules(),
            lua_path=f"{router}/?.lua;{LUA_PATH}/?.lua;;", control=str(self.dir / CONTROL_SOCKET),
        )
        _require(PATH_RE, str(router), "router folder")
        body = render("nginx.conf.j2", generation="GENERATION", **context)
        code = b"".join((router / name).read_bytes() for name in LUA_MODULES)
        generation = hashlib.sha256(body.encode() + code).hexdigest()[:16]
        return body.replace("GENERATION", generation), generation

    def routing_table(self, routes: Iterable[Route], projects: Iterable[ProjectTraffic]) -> dict[str, Any]:
        """The table the Lua router serves from: every active job; for each project, the pools of its
        primary versions that take traffic now (with their weights, and the spare instances a request
        moves on to when its pool's cannot be reached: the other pools', then the fallback's), its
        fallback jobs, and each version's ready jobs (the version endpoints).

        Raises GatewayError when a name or socket path is not of the shape mlserve makes (defence in
        depth: nothing else may steer the router).
        """
        routes = sorted(routes, key=lambda r: r.name)
        known = {p.key: p for p in projects}
        keys = sorted(set(known) | {r.project_key for r in routes})
        self._check_routes(routes, keys)
        table: dict[str, Any] = {
            "jobs": {r.job_id: {"name": r.name, "project": r.project_key, "socket": r.socket,
                                "stats": str(Path(r.socket).parent / STATS_NAME), "ready": r.healthy,
                                "version": r.version} for r in routes},
            "projects": {},
        }
        for key in keys:
            project = known.get(key) or ProjectTraffic(key)
            mine = [r for r in routes if r.project_key == key]
            versions: dict[int, list[str]] = {}
            for route in mine:
                versions.setdefault(route.version, [])
                if route.healthy:
                    versions[route.version].append(route.job_id)
            fallback_versions = {r.version for r in mine if r.fallback}
            primary = {v: len(ids) for v, ids in versions.items() if v not in fallback_versions}
            fallback = [r.job_id for r in mine if r.fallback and r.healthy]
            pools: list[dict[str, Any]] = [{"version": v, "weight": w, "ready": versions[v]}
                                           for v, w in weights(project.traffic, primary).items()]
            for pool in pools:  # where a request goes when its pool's instances cannot be reached
                pool["spare"] = [i for other in pools if other is not pool for i in other["ready"]] + fallback
            table["projects"][key] = {
                "pools": pools,
                "fallback": fallback,
                "versions": {str(v): ids for v, ids in versions.items()},
                "latest": max([project.latest, *versions]),
                "sticky": project.traffic.sticky,
                "guard": dict(project.guard),
            }
        return table

    def _check_settings(self) -> None:
        _require(PATH_RE, str(self.dir), "gateway directory (MLSERVE_HOME)")
        try:
            ipaddress.ip_address(self.settings.host)
        except ValueError:
            raise GatewayError(f"refusing to render the gateway: host {self.settings.host!r:.100} is not an IP address") from None
        if self.settings.public_url is not None:
            _require(PUBLIC_URL_RE, self.settings.public_url, "public URL")
        for value, what in ((self.settings.port, "port"), (self.settings.body_limit_mb, "body limit"),
                            (self.settings.timeout_s, "timeout")):
            if type(value) is not int or value < 1:
                raise GatewayError(f"refusing to render the gateway: {what} {value!r} is not a positive integer")

    def _check_routes(self, routes: list[Route], keys: list[str]) -> None:
        for key in keys:
            _require(PROJECT_KEY_RE, key, "project")
        for route in routes:
            _require(JOB_ID_RE, route.job_id, "job id")
            _require(JOB_NAME_RE, route.name, "job name")
            if not route.name.startswith(f"{route.project_key}/"):
                raise GatewayError(f"refusing to render the gateway: job {route.name} is not in project {route.project_key}")
            self._require_socket(route.socket)

    def _require_socket(self, path: str) -> None:
        _require(PATH_RE, path, "socket path")
        if not path.startswith(f"{self.home.root}/") or ".." in path.split("/"):
            raise GatewayError(f"refusing to render the gateway: socket {path} is not under {self.home.root}")

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

    def apply(self, routes: Iterable[Route], projects: Iterable[ProjectTraffic] = ()) -> None:
        """Start nginx, or reload it if its settings changed, then push the routing table.

        A routing change alone never reloads: it is live on every worker when this returns. A reload
        returns once every worker that accepts connections serves the new configuration.
        Raises NginxNotInstalledError, GatewayPortInUseError or GatewayError (with nginx's words).
        """
        nginx = self.nginx()
        table = self.routing_table(routes, projects)
        text, generation = self.render()
        master = self.pid()
        if master is None or not self.config.exists() or self.config.read_text() != text:
            if master is not None and not self.settings.loopback:
                # Opening to the network: the table of the open gateway (tokens required) goes first, so
                # no request from the network is ever guarded by the table of the loopback gateway.
                self._push(table)
            self._configure(nginx, text, generation, master)
        self._push(table)

    def push(self, routes: Iterable[Route], projects: Iterable[ProjectTraffic] = ()) -> None:
        """Hand the running gateway a routing table, its configuration untouched. Raises GatewayError."""
        self._push(self.routing_table(routes, projects))

    def _configure(self, nginx: str, text: str, generation: str, master: int | None) -> None:
        if master is not None and self._listen_line() not in self.config.read_text():
            old = _listen_address(self.config.read_text())
            if old is not None and old[1] == self.settings.port:
                self._rebind(nginx, text, generation)
                return
            self._check_port()  # a new port: nginx would fail to bind it only after the reload
        candidate = self._checked(nginx, text)
        candidate.replace(self.config)
        old_workers = self._reload(master) if master is not None else None
        if old_workers is None:
            self._start(nginx)
        self._wait_for(generation, old_workers or set())

    def _rebind(self, nginx: str, text: str, generation: str) -> None:
        """Another address on the same port: the running nginx holds the port (127.0.0.1:P and 0.0.0.0:P
        overlap), so it stops (requests in flight finish) and starts on the new address; if that fails,
        it starts again where it was."""
        try:
            self._check_port()  # an address this machine does not have fails here, before any stop
        except GatewayPortInUseError:
            pass  # this gateway itself, perhaps, on the old address: known once it has stopped
        before = self.config.read_text()
        self.stop()
        try:
            self._checked(nginx, text).replace(self.config)
            self._start(nginx)
            self._wait_for(generation, set())
        except MlserveError:
            self.config.write_text(before)
            try:
                self._start(nginx)
            except MlserveError:
                pass  # the error to show is the new address's; the supervisor brings the gateway back
            raise

    def _push(self, table: dict[str, Any]) -> None:
        """Hand the routing table to the router (shared by all workers); raises GatewayError if refused."""
        body = json.dumps(table, sort_keys=True)
        connection = _UnixHTTPConnection(str(self.dir / CONTROL_SOCKET), timeout=10)
        try:
            connection.request("PUT", "/routes", body=body, headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            detail = answer.read().decode(errors="replace").strip()
        except (OSError, http.client.HTTPException) as exc:
            raise GatewayError(f"the gateway's router did not take the routes: {exc}",
                               f"See {self.dir / 'error.log'}.") from None
        finally:
            connection.close()
        if answer.status != 200:
            raise GatewayError(f"the gateway's router refused the routes ({answer.status}): {detail[:200]}")
        (self.dir / ROUTES_NAME).write_text(body)

    def routes(self) -> dict[str, Any]:
        """The routing table last pushed (empty before the first push)."""
        try:
            table = json.loads((self.dir / ROUTES_NAME).read_text())
        except (OSError, ValueError):
            return {"jobs": {}, "projects": {}}
        return table if isinstance(table, dict) else {"jobs": {}, "projects": {}}

    def _listen_line(self) -> str:
        return f"listen {self._address} "

    def _tls_context(self) -> dict[str, str] | None:
        """The certificate nginx serves and where plain HTTP is sent instead; None without TLS."""
        if not self.settings.tls:
            return None
        files = tls.installed(self.dir)
        for path, what in ((files.cert, "TLS certificate"), (files.key, "TLS key")):
            _require(PATH_RE, str(path), what)
            if not path.exists():
                raise GatewayError(f"the gateway's {what} {path} is missing",
                                   "Start it again with `mlserve gateway start --tls self-signed` or --tls-cert/--tls-key.")
        # A plain-HTTP request is sent to the same path over HTTPS: at the public URL when there is one,
        # else at the name the client used (nginx has checked it is a host name) on this port.
        base = self.settings.public_url or "https://$host:$server_port"
        return {"cert": str(files.cert), "key": str(files.key), "redirect": base}

    def _checked(self, nginx: str, text: str) -> Path:
        """``text`` written beside the configuration once ``nginx -t`` accepts it."""
        candidate = self.dir / f"{CONFIG_NAME}.new"
        # The workers' own folders to spool in; what nginx and mlserve write here is root's alone.
        prepare_gateway(self.home.root, self.dir, ("tmp/body", "tmp/uwsgi", "tmp/proxy", "tmp/fastcgi", "tmp/scgi"),
                        private_files=(*LOG_NAMES, ROUTES_NAME, candidate.name))
        candidate.write_text(text)
        control = (self.dir / CONTROL_SOCKET).parent
        control.mkdir(exist_ok=True)
        control.chmod(0o700)
        check = self._nginx(nginx, "-t", "-c", str(candidate))
        if check.returncode != 0:
            candidate.unlink(missing_ok=True)
            if self._port_taken(check.stderr):
                raise self._port_in_use()
            raise GatewayError("the rendered gateway configuration is invalid", _tail(check.stderr))
        return candidate

    def _reload(self, master: int) -> set[int] | None:
        """SIGHUP the master; the workers it had before (they must stop accepting), or None when it is gone."""
        workers = _children(master)
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            return None  # died since we looked: its workers are orphans now, _start removes them
        return workers if self.pid() == master else None  # a dead master not yet reaped takes signals too

    def _start(self, nginx: str) -> None:
        self._kill_orphans()
        # A master killed with -9 leaves its control socket behind, and nginx would not bind over it.
        (self.dir / CONTROL_SOCKET).unlink(missing_ok=True)
        self._check_port()
        started = self._nginx(nginx, "-c", str(self.config))
        if started.returncode != 0:
            if self._port_taken(started.stderr):
                raise self._port_in_use()
            raise GatewayError("nginx failed to start", _tail(started.stderr))

    def _nginx(self, nginx: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"), *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )

    def _wait_for(self, generation: str, old_workers: set[int]) -> None:
        """Until nginx answers with this configuration and no worker from before the reload still accepts.

        A reload takes effect asynchronously: the master starts new workers, then asks the old ones to
        quit; until an old worker closes its listening socket it may take new connections with old routes.
        """
        deadline = time.monotonic() + RELOAD_WAIT_S
        while True:
            stale = _listening(old_workers)
            if not stale and self._generation() == generation:
                return
            if time.monotonic() > deadline:
                still = f"; workers {sorted(stale)} from before it still accept connections" if stale else ""
                raise GatewayError(
                    f"the gateway did not take its new configuration within {RELOAD_WAIT_S:g}s{still}",
                    f"See {self.dir / 'error.log'}.",
                )
            time.sleep(POLL_S)

    def _generation(self) -> str | None:
        """What a fresh connection is answered; None when nothing answers. No proxy: it is loopback."""
        host, port = self.settings.local_address, self.settings.port
        connection = (http.client.HTTPSConnection(host, port, timeout=2, context=_UNVERIFIED)
                      if self.settings.tls else http.client.HTTPConnection(host, port, timeout=2))
        try:
            connection.request("GET", "/_mlserve/generation")
            return connection.getresponse().read().decode(errors="replace").strip()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def stop(self, timeout: float = 30) -> bool:
        """Stop nginx gracefully (requests in flight finish) and any leftovers of an earlier one.

        False when nothing of the gateway was running.
        """
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + timeout
            while self.pid() == pid and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.pid() == pid:
                os.kill(pid, signal.SIGTERM)
        return bool(self._kill_orphans()) or pid is not None

    def status(self) -> GatewayStatus:
        routes = sum(1 for job in self.routes().get("jobs", {}).values() if job.get("ready"))
        return GatewayStatus(self.is_running(), self.pid(), self.url, self.config, routes, tuple(self._orphans()))

    def cap_logs(self, max_bytes: int) -> list[Path]:
        """Empty the gateway's logs that grew past ``max_bytes``; the ones it emptied.

        nginx opens them for appending, so it writes on at the new end: no restart, no reopen.
        """
        return [path for path in (self.dir / name for name in LOG_NAMES) if truncate_if_large(str(path), max_bytes)]

    # -- leftovers -----------------------------------------------------------------------------

    def _orphans(self) -> list[int]:
        """nginx processes holding this gateway's files that its running master does not own.

        A master killed with -9 leaves its workers running, re-parented, on the port with old routes.
        """
        master = self.pid()
        prefix = f"{self.dir}/"
        found = []
        for pid in _pids():
            if pid == master or _comm(pid) != "nginx":
                continue
            state, parent = _state(pid)
            if state in ("", "Z") or (master is not None and parent == master):
                continue
            if any(target.startswith(prefix) for target in _fd_targets(pid)):
                found.append(pid)
        return found

    def _kill_orphans(self) -> list[int]:
        """Kill the leftovers (their routes are stale, their master gone) and wait until they are."""
        orphans = self._orphans()
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise GatewayError(f"an earlier nginx of this gateway (pid {pid}) cannot be stopped",
                                   f"Stop it as its owner: `kill {pid}`.") from None
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while any(_state(pid)[0] not in ("", "Z") for pid in orphans):
            if time.monotonic() > deadline:
                raise GatewayError(f"earlier nginx processes of this gateway ({orphans}) did not exit")
            time.sleep(POLL_S)
        return orphans


def lua_modules() -> tuple[str, ...]:
    """The nginx modules the router needs; raises NginxNotInstalledError when one is missing."""
    missing = [path for path in NGINX_MODULES if not os.path.exists(path)]
    if missing or not os.path.exists(f"{LUA_PATH}/resty/core.lua"):
        raise NginxNotInstalledError("the gateway needs nginx's Lua module (its router)", LUA_HINT)
    return NGINX_MODULES


# Only for reading the generation from our own nginx, on this machine: no secret goes over it.
_UNVERIFIED = ssl._create_unverified_context()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the gateway's control socket (a unix socket only this home's owner can reach)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


# -- /proc -------------------------------------------------------------------------------------


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> tuple[str, int]:
    """A process's state letter and parent pid; ("", 0) when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[1])


def _children(pid: int) -> set[int]:
    return {child for child in _pids() if _state(child)[1] == pid}


def _fd_targets(pid: int) -> list[str]:
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return []
    for name in names:
        try:
            targets.append(os.readlink(f"{fd_dir}/{name}"))
        except OSError:
            continue  # closed meanwhile
    return targets


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def _listening(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still hold a listening TCP socket (any port: after a port change, the old one too)."""
    if not pids:
        return set()
    listening = {f"socket:[{inode}]" for inode in _listening_inodes()}
    return {pid for pid in pids if listening.intersection(_fd_targets(pid))}


def _is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _listen_address(config: str) -> tuple[str, int] | None:
    """The address and port a rendered nginx.conf listens on."""
    found = re.search(r"^\s*listen \[?([0-9A-Fa-f.:]+)\]?:([0-9]+) ", config, re.MULTILINE)
    return (found.group(1), int(found.group(2))) if found else None


def _require(pattern: re.Pattern[str], value: str, what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise GatewayError(f"refusing to render the gateway: {what} {value!r:.200} has characters nginx.conf must not contain")


def _tail(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
