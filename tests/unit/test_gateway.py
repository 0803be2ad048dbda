"""The gateway's rendered nginx.conf (compared whole), the routing table it pushes, what it refuses, and
when it reloads nginx (only for a settings change) and how.

To accept a deliberate change of nginx.conf, render again with MLSERVE_UPDATE_EXPECTED=1 and review the diff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import mlserve.gateway as gateway_module
from mlserve.errors import GatewayError
from mlserve.gateway import Gateway, GatewaySettings, ProjectTraffic, Route
from mlserve.home import Home
from mlserve.traffic import Traffic
from tests.harness import free_port

EXPECTED = Path(__file__).parent / "expected"
HOME = Path("/srv/mlh")
A, B, C = "A" * 22, "B" * 22, "C" * 22
SETTINGS = GatewaySettings("127.0.0.1", 8000, 100, 60)
PUBLIC = {"access": "public"}
EMPTY_PROJECT = {"pools": [], "fallback": [], "versions": {}, "latest": 0, "sticky": False, "guard": PUBLIC}
ROUTER = "@ROUTER@"  # stands for the router's folder, which is wherever mlserve is installed


@pytest.fixture
def fixed_host(monkeypatch):
    """The machine's parts of the configuration (cores, whether we are root, the Lua module) fixed."""
    monkeypatch.setattr(gateway_module, "worker_processes", lambda: 2)
    monkeypatch.setattr(gateway_module, "nginx_user", lambda: "mlserve-gateway mlserve-gateway")
    monkeypatch.setattr(gateway_module, "lua_modules", lambda: gateway_module.NGINX_MODULES)


def _gateway(home: Path = HOME, settings: GatewaySettings = SETTINGS) -> Gateway:
    return Gateway(Home(home), settings)


def _sock(job_id: str) -> str:
    return f"{HOME}/run/{job_id}/sock/uwsgi.sock"


def _router_code() -> bytes:
    return b"".join((resources.files("mlserve.templates") / "lua" / name).read_bytes() for name in gateway_module.LUA_MODULES)


def _rendered(gateway: Gateway) -> str:
    """nginx.conf with the generation and the router's folder as placeholders."""
    text, generation = gateway.render()
    # The generation hashes the text rendered with a placeholder in its place, and the router's code.
    unmarked = text.replace(generation, "GENERATION")
    assert generation == hashlib.sha256(unmarked.encode() + _router_code()).hexdigest()[:16]
    router = str(resources.files("mlserve.templates") / "lua")
    assert f'lua_package_path "{router}/?.lua;' in unmarked
    return unmarked.replace(router, ROUTER)


def _matches(name: str, text: str) -> None:
    path = EXPECTED / name
    if os.environ.get("MLSERVE_UPDATE_EXPECTED"):
        path.write_text(text)
    assert text == path.read_text()


# -- nginx.conf: the gateway's own settings only -----------------------------------------------


def test_rendered_config(fixed_host):
    _matches("nginx.default.conf", _rendered(_gateway()))


def test_rendered_config_with_other_settings(fixed_host, monkeypatch):
    monkeypatch.setattr(gateway_module, "worker_processes", lambda: 4)
    monkeypatch.setattr(gateway_module, "nginx_user", lambda: None)  # not root: nginx keeps its user
    settings = GatewaySettings("0.0.0.0", 9123, 7, 15)
    _matches("nginx.other.conf", _rendered(_gateway(Path("/home/ann/.mlserve"), settings)))


def test_rendered_config_with_tls(fixed_host, tmp_path):
    # TLS 1.2 and 1.3 only, the certificate mlserve keeps, plain HTTP redirected to the public URL.
    home = tmp_path / "h"
    (home / "gateway" / "tls").mkdir(parents=True)
    for name in ("cert.pem", "key.pem"):
        (home / "gateway" / "tls" / name).write_text("")
    settings = GatewaySettings("0.0.0.0", 8443, 100, 60, tls=True, public_url="https://models.example.com")
    text = _rendered(_gateway(home, settings)).replace(str(home), "/srv/mlh")
    _matches("nginx.tls.conf", text)
    assert settings.url == "https://models.example.com"
    plain = dataclasses.replace(settings, public_url=None)
    assert "error_page 497 =308 https://$host:$server_port$request_uri;" in _gateway(home, plain).render()[0]
    missing = _gateway(tmp_path / "nothing", plain)
    with pytest.raises(GatewayError, match="TLS certificate"):
        missing.render()


@pytest.mark.parametrize("host, tls, url", [("127.0.0.1", False, "http://127.0.0.1:8000"),
                                            ("10.1.2.3", True, "https://10.1.2.3:8000"),
                                            ("::1", False, "http://[::1]:8000")])
def test_the_url_clients_are_told(host, tls, url):
    assert GatewaySettings(host, 8000, 100, 60, tls=tls).url == url


def test_routes_never_reach_nginx_conf(fixed_host):
    # Whatever runs, nginx.conf (and so whether nginx reloads) depends on the settings alone.
    gateway = _gateway()
    table = gateway.routing_table([Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True)], [])
    assert table["jobs"]
    text = gateway.render()[0]
    assert A not in text and "alice" not in text


def test_a_new_router_is_a_new_generation(fixed_host, monkeypatch, tmp_path):
    # An upgraded router must be loaded: its code is part of the generation, so nginx.conf changes.
    (tmp_path / "lua").mkdir()
    monkeypatch.setattr(gateway_module, "resources", SimpleNamespace(files=lambda package: tmp_path))
    generations = []
    (tmp_path / "lua" / "mlserve_guard.lua").write_text("return {}\n")
    for code in ("return 1\n", "return 2\n"):
        (tmp_path / "lua" / "mlserve_router.lua").write_text(code)
        generations.append(_gateway().render()[1])
    (tmp_path / "lua" / "mlserve_guard.lua").write_text("return { guarded = true }\n")
    generations.append(_gateway().render()[1])
    assert len(set(generations)) == 3


# -- the routing table -------------------------------------------------------------------------


def test_routing_table_without_jobs():
    assert _gateway().routing_table([], []) == {"jobs": {}, "projects": {}}


def _job(job_id, number, ready, version):
    return {"name": f"alice/projects/hello/{number}", "project": "alice/projects/hello", "socket": f"/srv/mlh/run/{job_id}/sock/uwsgi.sock",
            "stats": f"/srv/mlh/run/{job_id}/sock/stats.sock", "ready": ready, "version": version}


def test_routing_table_with_two_healthy_jobs_of_one_project():
    routes = [
        Route(B, "alice/projects/hello/2", "alice/projects/hello", _sock(B), True, 1),
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True, 1),
    ]
    assert _gateway().routing_table(routes, [ProjectTraffic("alice/projects/hello", latest=1)]) == {
        "jobs": {A: _job(A, 1, True, 1), B: _job(B, 2, True, 1)},
        "projects": {"alice/projects/hello": {
            "pools": [{"version": 1, "weight": 2, "ready": [A, B], "spare": []}],  # in job order: the round robin
            "fallback": [], "versions": {"1": [A, B]}, "latest": 1, "sticky": False,
            "guard": PUBLIC,
        }},
    }


def test_routing_table_with_a_sick_job_and_a_stopped_project():
    routes = [
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True, 1),
        Route(C, "alice/projects/hello/2", "alice/projects/hello", _sock(C), False, 2),
    ]
    assert _gateway().routing_table(routes, [ProjectTraffic("bob/projects/idle", latest=3)]) == {
        # C is known (its endpoint answers 503), but in no pool.
        "jobs": {A: _job(A, 1, True, 1), C: _job(C, 2, False, 2)},
        "projects": {
            "alice/projects/hello": {"pools": [{"version": 1, "weight": 1, "ready": [A], "spare": []}], "fallback": [],
                                     "versions": {"1": [A], "2": []}, "latest": 2, "sticky": False, "guard": PUBLIC},
            "bob/projects/idle": {"pools": [], "fallback": [], "versions": {}, "latest": 3, "sticky": False,
                                  "guard": PUBLIC},
        },
    }


def test_equal_turns_per_job_weigh_each_version_by_its_ready_jobs():
    routes = [
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True, 1),
        Route(B, "alice/projects/hello/2", "alice/projects/hello", _sock(B), True, 2),
        Route(C, "alice/projects/hello/3", "alice/projects/hello", _sock(C), True, 2),
    ]
    pools = _gateway().routing_table(routes, [ProjectTraffic("alice/projects/hello")])["projects"]["alice/projects/hello"]["pools"]
    # A request whose pool cannot be reached moves on to the other version's instances.
    assert pools == [{"version": 1, "weight": 1, "ready": [A], "spare": [B, C]},
                     {"version": 2, "weight": 2, "ready": [B, C], "spare": [A]}]


def test_shares_leave_out_versions_without_a_ready_job_and_fallbacks_wait():
    routes = [
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True, 1),
        Route(B, "alice/projects/hello/2", "alice/projects/hello", _sock(B), False, 2),
        Route(C, "alice/projects/hello/3", "alice/projects/hello", _sock(C), True, 3, fallback=True),
    ]
    split = ProjectTraffic("alice/projects/hello", Traffic({1: 90, 2: 10}, sticky=True), latest=3)
    entry = _gateway().routing_table(routes, [split])["projects"]["alice/projects/hello"]
    assert entry == {"pools": [{"version": 1, "weight": 90, "ready": [A], "spare": [C]}], "fallback": [C],
                     "versions": {"1": [A], "2": [], "3": [C]}, "latest": 3, "sticky": True, "guard": PUBLIC}
    # With no primary ready, the pools are empty: the fallback's turn.
    routes[0] = Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), False, 1)
    assert _gateway().routing_table(routes, [split])["projects"]["alice/projects/hello"]["pools"] == []


def test_a_route_carries_no_text_from_the_app():
    # Why a job is sick (an app's health answer) stays in the state: nothing of it reaches the router.
    assert [field.name for field in dataclasses.fields(Route)] == ["job_id", "name", "project_key", "socket", "healthy",
                                                                  "version", "fallback"]


@pytest.mark.parametrize("route", [
    Route(A, 'alice/projects/hello/1 price $x; } "quoted"\n', "alice/projects/hello", _sock(A), False),
    Route(A, "alice/projects/hello/1", "alice/projects/hello;", _sock(A), True),
    Route(A, "alice/projects/hello/1", "alice/projects/other", _sock(A), True),
    Route("A" * 21 + "$", "alice/projects/hello/1", "alice/projects/hello", _sock(A), True),
    Route("A" * 21, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", "/elsewhere/uwsgi.sock", True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", f"{HOME}/run/../../etc/uwsgi.sock", True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", f"{HOME}/run/{A}/uwsgi.sock; evil", True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", f"{HOME}x/run/{A}/uwsgi.sock", True),
], ids=["name", "project", "name-outside-project", "job-id", "job-id-short", "socket-outside-home",
        "socket-dotdot", "socket-chars", "socket-beside-home"])
def test_routing_table_refuses_what_mlserve_does_not_make(route):
    with pytest.raises(GatewayError):
        _gateway().routing_table([route], [])


@pytest.mark.parametrize("project", ["alice/projects/x y", "alice/projects/x}", "Alice/projects/x", "alice/x",
                                     "alice/projects/x/1"])
def test_routing_table_refuses_a_bad_project_key(project):
    with pytest.raises(GatewayError):
        _gateway().routing_table([], [ProjectTraffic(project)])


# -- the settings nginx.conf is made of --------------------------------------------------------


def test_render_refuses_a_home_path_nginx_would_split(fixed_host, tmp_path):
    with pytest.raises(GatewayError, match="MLSERVE_HOME"):
        _gateway(tmp_path / "my home").render()


@pytest.mark.parametrize("settings", [
    GatewaySettings("127.0.0.1; evil", 8000, 100, 60),
    GatewaySettings("127.0.0.1", 8000, 100, 60, public_url="https://x.example;\n}"),
    GatewaySettings("", 8000, 100, 60),
    GatewaySettings("127.0.0.1", 0, 100, 60),
    GatewaySettings("127.0.0.1", 8000, -1, 60),
    GatewaySettings("127.0.0.1", 8000, 100, 0),
    GatewaySettings("127.0.0.1", 8000, 100, "60; evil"),  # type: ignore[arg-type]
    GatewaySettings("127.0.0.1", 8000, True, 60),
], ids=["host-chars", "public-url-chars", "host-empty", "port", "body-limit", "timeout", "timeout-text", "body-limit-bool"])
def test_render_refuses_a_setting_nginx_conf_must_not_contain(fixed_host, settings):
    with pytest.raises(GatewayError):
        _gateway(settings=settings).render()


# -- apply: a reload only for a settings change ------------------------------------------------


@pytest.fixture
def fake_nginx(monkeypatch):
    """nginx that accepts every configuration and starts at once, and a router that takes every table.

    What it was asked: ``calls`` (nginx's arguments) and ``pushed`` (the tables)."""
    fake = SimpleNamespace(calls=[], pushed=[])

    def run(self, nginx, *args):
        fake.calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(Gateway, "nginx", lambda self: "/usr/sbin/nginx")
    monkeypatch.setattr(Gateway, "_nginx", run)
    monkeypatch.setattr(Gateway, "_wait_for", lambda self, *args: None)
    monkeypatch.setattr(Gateway, "_push", lambda self, table: fake.pushed.append(table))
    return fake


def _running_gateway(tmp_path: Path, monkeypatch, pids: list[int | None], config: str | None = None) -> Gateway:
    """A gateway whose master's pid is read as ``pids`` say, one after another (the last one stays), and
    whose nginx.conf is ``config`` (by default an older one, of other settings)."""
    gateway = _gateway(tmp_path, dataclasses.replace(SETTINGS, port=free_port()))
    gateway.dir.mkdir(parents=True)
    gateway.config.write_text(config if config is not None else
                              f"# an older configuration\nlisten 127.0.0.1:{gateway.settings.port} backlog=4096;\n")
    answers = iter(pids)
    last: list[int | None] = [None]

    def pid(self):
        last[0] = next(answers, last[0])
        return last[0]

    monkeypatch.setattr(Gateway, "pid", pid)
    return gateway


def _signals(monkeypatch) -> list[tuple[int, int]]:
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    return signalled


@pytest.mark.parametrize("reaped", [True, False], ids=["master-gone", "master-not-yet-reaped"])
def test_apply_starts_nginx_instead_of_signalling_pid_zero_when_the_master_died(tmp_path, monkeypatch, fixed_host,
                                                                                 fake_nginx, reaped):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000, None])  # it dies right after the first look
    signalled: list[tuple[int, int]] = []

    def kill(pid, sig):
        signalled.append((pid, sig))
        if pid != 0 and reaped:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", kill)
    gateway.apply([], [ProjectTraffic("alice/projects/hello")])
    assert all(pid > 0 for pid, _ in signalled), signalled
    assert ("-c", str(gateway.config)) in fake_nginx.calls  # started instead
    assert fake_nginx.pushed == [{"jobs": {}, "projects": {"alice/projects/hello": EMPTY_PROJECT}}]


def test_apply_reloads_a_running_master_when_its_settings_changed(tmp_path, monkeypatch, fixed_host, fake_nginx):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000])
    signalled = _signals(monkeypatch)
    gateway.apply([], [ProjectTraffic("alice/projects/hello")])
    assert signalled == [(4_000_000, signal.SIGHUP)]
    assert [args[0] for args in fake_nginx.calls] == ["-t"]  # checked, not started a second time
    assert gateway.config.read_text() == gateway.render()[0]
    assert fake_nginx.pushed == [{"jobs": {}, "projects": {"alice/projects/hello": EMPTY_PROJECT}}]


def test_apply_with_the_same_settings_only_pushes_the_routes(tmp_path, monkeypatch, fixed_host, fake_nginx):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000], config="")
    gateway.config.write_text(gateway.render()[0])  # what the running master was started with
    signalled = _signals(monkeypatch)
    tables: list[dict[str, Any]] = []
    for members in ([A], [A, B], [B], []):
        routes = [Route(job_id, f"alice/projects/hello/{n}", "alice/projects/hello", str(gateway.home.socket(job_id)),
                        True) for n, job_id in enumerate(members, 1)]
        gateway.apply(routes, [ProjectTraffic("alice/projects/hello")])
        tables.append(gateway.routing_table(routes, [ProjectTraffic("alice/projects/hello")]))
    assert signalled == [] and fake_nginx.calls == []  # no check, no start, no reload
    assert fake_nginx.pushed == tables


def test_apply_refuses_a_bad_route_before_it_touches_nginx(tmp_path, monkeypatch, fixed_host, fake_nginx):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000])
    signalled = _signals(monkeypatch)
    with pytest.raises(GatewayError):
        gateway.apply([Route(A, "alice/projects/hello/1", "alice/projects/hello", "/elsewhere/uwsgi.sock", True)])
    assert signalled == [] and fake_nginx.calls == [] and fake_nginx.pushed == []


def test_wait_for_returns_only_once_old_workers_stopped_accepting(tmp_path, monkeypatch):
    gateway = _gateway(tmp_path)
    holding = [{11, 12}, {12}, {12}, set()]  # what _listening finds, poll after poll
    polls: list[set[int]] = []

    def listening(pids):
        polls.append(set(pids))
        return holding[min(len(polls), len(holding)) - 1]

    monkeypatch.setattr(gateway_module, "_listening", listening)
    monkeypatch.setattr(Gateway, "_generation", lambda self: "new")  # new workers answer at once
    monkeypatch.setattr(gateway_module, "POLL_S", 0)
    gateway._wait_for("new", {11, 12})
    assert len(polls) == 4


def test_wait_for_gives_up_when_an_old_worker_keeps_accepting(tmp_path, monkeypatch):
    gateway = _gateway(tmp_path)
    monkeypatch.setattr(gateway_module, "_listening", lambda pids: {11})
    monkeypatch.setattr(Gateway, "_generation", lambda self: "new")
    monkeypatch.setattr(gateway_module, "RELOAD_WAIT_S", 0.1)
    with pytest.raises(GatewayError, match=r"workers \[11\]"):
        gateway._wait_for("new", {11})


# -- what the gateway reports ------------------------------------------------------------------


def test_routes_is_the_last_table_pushed_and_empty_before_any(tmp_path):
    gateway = _gateway(tmp_path)
    assert gateway.routes() == {"jobs": {}, "projects": {}}
    gateway.dir.mkdir(parents=True)
    (gateway.dir / "routes.json").write_text("not json")
    assert gateway.routes() == {"jobs": {}, "projects": {}}


def test_cap_logs_empties_only_logs_past_the_limit(tmp_path):
    gateway = _gateway(tmp_path)
    gateway.dir.mkdir(parents=True)
    (gateway.dir / "access.log").write_bytes(b"x" * 2000)
    (gateway.dir / "error.log").write_bytes(b"y" * 500)
    assert gateway.cap_logs(1000) == [gateway.dir / "access.log"]
    assert (gateway.dir / "access.log").stat().st_size == 0
    assert (gateway.dir / "error.log").stat().st_size == 500
    assert gateway.cap_logs(1000) == []
