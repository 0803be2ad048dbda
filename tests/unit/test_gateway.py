"""The gateway's rendered nginx.conf (compared whole), what it refuses to render, and its reload logic."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import mlserve.gateway as gateway_module
from mlserve.errors import GatewayError
from mlserve.gateway import Gateway, GatewaySettings, Route
from mlserve.home import Home

HOME = Path("/srv/mlh")
A, B, C = "A" * 22, "B" * 22, "C" * 22

# The whole nginx.conf with no job; @@UPSTREAMS@@ and @@LOCATIONS@@ mark where jobs and projects go.
SKELETON = r'''# Rendered by mlserve from its state (GENERATION); do not edit, `mlserve gateway start` rewrites it.
user root;
worker_processes 2;
pid /srv/mlh/gateway/nginx.pid;
error_log /srv/mlh/gateway/error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log /srv/mlh/gateway/access.log combined buffer=64k flush=2s;
    server_tokens off;
    # Every answer of the gateway's own is JSON, whatever the path's extension looks like.
    types {}
    # A reload (every route change) closes idle keep-alive connections; a client that reuses one
    # just then retries on a new one, as HTTP allows for idempotent requests and curl and browsers do.
    keepalive_timeout 30s;
    default_type application/json;
    client_body_temp_path /srv/mlh/gateway/tmp/body;
    uwsgi_temp_path /srv/mlh/gateway/tmp/uwsgi;
    proxy_temp_path /srv/mlh/gateway/tmp/proxy;
    fastcgi_temp_path /srv/mlh/gateway/tmp/fastcgi;
    scgi_temp_path /srv/mlh/gateway/tmp/scgi;

    # One body limit and one timeout, the same as every instance's uWSGI.
    client_max_body_size 100m;
    # Bodies past this are spooled to disk before they reach an instance.
    client_body_buffer_size 128k;
    client_body_timeout 60s;
    uwsgi_read_timeout 60s;
    uwsgi_send_timeout 60s;
    uwsgi_connect_timeout 5s;
    # A failed connect moves on to another instance; a request already sent is never replayed.
    uwsgi_next_upstream error timeout;
    uwsgi_next_upstream_tries 3;

    # The endpoint prefix is the app's SCRIPT_NAME, the rest its PATH_INFO. Projects first:
    # an owner name could look like an endpoint id.
    map $uri $mlserve_script_name {
        "~^(?<prefix>/serve/[a-z0-9][a-z0-9_-]*/projects/[a-z0-9][a-z0-9_-]*)(/|$)" $prefix;
        "~^(?<prefix>/serve/[A-Za-z0-9]{22})(/|$)" $prefix;
        default "";
    }
    map $uri $mlserve_path_info {
        "~^/serve/[a-z0-9][a-z0-9_-]*/projects/[a-z0-9][a-z0-9_-]*(?<rest>/.*)$" $rest;
        "~^/serve/[A-Za-z0-9]{22}(?<rest>/.*)$" $rest;
        default /;
    }

    uwsgi_param QUERY_STRING $query_string;
    uwsgi_param REQUEST_METHOD $request_method;
    uwsgi_param CONTENT_TYPE $content_type;
    uwsgi_param CONTENT_LENGTH $content_length;
    uwsgi_param REQUEST_URI $request_uri;
    uwsgi_param SCRIPT_NAME $mlserve_script_name;
    uwsgi_param PATH_INFO $mlserve_path_info;
    uwsgi_param SERVER_PROTOCOL $server_protocol;
    uwsgi_param REQUEST_SCHEME $scheme;
    uwsgi_param REMOTE_ADDR $remote_addr;
    uwsgi_param REMOTE_PORT $remote_port;
    uwsgi_param SERVER_ADDR $server_addr;
    uwsgi_param SERVER_PORT $server_port;
    uwsgi_param SERVER_NAME $host;

@@UPSTREAMS@@    server {
        listen 127.0.0.1:8000 backlog=4096;
        server_name _;

        # nginx's own error answers are JSON like the rest (an app's errors pass through untouched).
        # Internal URIs, not named locations: nginx cannot redirect a request whose request line it
        # could not parse (400, 414, 505) to a named location and would answer 500 in HTML instead.
        error_page 400 /_mlserve/error/400;
        error_page 404 /_mlserve/error/404;
        error_page 405 /_mlserve/error/405;
        error_page 408 /_mlserve/error/408;
        error_page 411 /_mlserve/error/411;
        error_page 413 /_mlserve/error/413;
        error_page 414 /_mlserve/error/414;
        error_page 494 /_mlserve/error/494;
        error_page 500 /_mlserve/error/500;
        error_page 501 /_mlserve/error/501;
        error_page 502 /_mlserve/error/502;
        error_page 503 /_mlserve/error/503;
        error_page 504 /_mlserve/error/504;
        error_page 505 /_mlserve/error/505;

        # A path that tries to climb out of its endpoint never reaches another one.
        if ($request_uri ~* "^[^?]*(/\.\.?(/|\?|$)|%2e|%2f|%5c|//)") {
            return 400 '{"error": "bad path", "detail": "dot segments, encoded slashes and empty segments are refused"}\n';
        }

        location = /_mlserve/generation {
            access_log off;
            return 200 "GENERATION\n";
        }
@@LOCATIONS@@
        location / {
            return 404 '{"error": "no such endpoint"}\n';
        }

        # The status that goes out is the error's own; `return` gives the body. No body limit here, or a
        # request refused with 413 would be refused again on its way to its answer (and get HTML).
        location ^~ /_mlserve/error/ {
            internal;
            client_max_body_size 0;
            location = /_mlserve/error/400 { return 400 '{"error": "bad request", "detail": "the gateway could not parse the request"}\n'; }
            location = /_mlserve/error/404 { return 404 '{"error": "no such endpoint"}\n'; }
            location = /_mlserve/error/405 { return 405 '{"error": "method not allowed"}\n'; }
            # nginx closes the connection on a client timeout rather than answer; should it answer, JSON.
            location = /_mlserve/error/408 { return 408 '{"error": "the client stopped sending its request", "timeout_s": 60, "setting": "mlserve gateway start --timeout S"}\n'; }
            location = /_mlserve/error/411 { return 411 '{"error": "length required"}\n'; }
            location = /_mlserve/error/413 { return 413 '{"error": "request body too large", "limit_mb": 100, "setting": "mlserve gateway start --body-limit MB"}\n'; }
            location = /_mlserve/error/414 { return 414 '{"error": "request URI too long"}\n'; }
            # nginx sends its internal 494 as a 400.
            location = /_mlserve/error/494 { return 400 '{"error": "request headers too large"}\n'; }
            location = /_mlserve/error/500 { return 500 '{"error": "internal gateway error"}\n'; }
            location = /_mlserve/error/501 { return 501 '{"error": "not implemented", "detail": "the gateway does not support this method or Transfer-Encoding"}\n'; }
            location = /_mlserve/error/502 {
                add_header Retry-After 2 always;
                return 502 '{"error": "the serving instance did not answer"}\n';
            }
            location = /_mlserve/error/503 {
                add_header Retry-After 5 always;
                return 503 '{"error": "service unavailable"}\n';
            }
            location = /_mlserve/error/504 { return 504 '{"error": "request timed out", "timeout_s": 60, "setting": "mlserve gateway start --timeout S"}\n'; }
            location = /_mlserve/error/505 { return 505 '{"error": "HTTP version not supported"}\n'; }
        }
    }
}
'''

HELLO_SLUG = hashlib.sha256(b"alice/projects/hello").hexdigest()[:16]


@pytest.fixture
def fixed_host(monkeypatch):
    """The machine's parts of the configuration (cores, whether we are root) fixed."""
    monkeypatch.setattr(gateway_module, "worker_processes", lambda: 2)
    monkeypatch.setattr(gateway_module, "nginx_user", lambda: "root")


def _gateway(home: Path = HOME, port: int = 8000) -> Gateway:
    return Gateway(Home(home), GatewaySettings("127.0.0.1", port, 100, 60))


def _sock(job_id: str) -> str:
    return f"{HOME}/run/{job_id}/sock/uwsgi.sock"


def _rendered(routes: list[Route], projects: list[str]) -> str:
    text, generation = _gateway().render(routes, projects)
    # The generation is the hash of the text rendered with a placeholder in its place.
    unmarked = text.replace(generation, "GENERATION")
    assert generation == hashlib.sha256(unmarked.encode()).hexdigest()[:16]
    return unmarked


def _expected(upstreams: str = "", locations: str = "") -> str:
    return SKELETON.replace("@@UPSTREAMS@@", upstreams).replace("@@LOCATIONS@@", locations)


def test_rendered_config_without_jobs(fixed_host):
    assert _rendered([], []) == _expected()


def test_rendered_config_with_two_healthy_jobs_of_one_project(fixed_host):
    routes = [
        Route(B, "alice/projects/hello/2", "alice/projects/hello", _sock(B), True),
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True),
    ]
    upstreams = f"""    upstream job_{A} {{
        server unix:/srv/mlh/run/{A}/sock/uwsgi.sock;
    }}

    upstream job_{B} {{
        server unix:/srv/mlh/run/{B}/sock/uwsgi.sock;
    }}

    upstream project_{HELLO_SLUG} {{
        server unix:/srv/mlh/run/{A}/sock/uwsgi.sock max_fails=1 fail_timeout=5s;
        server unix:/srv/mlh/run/{B}/sock/uwsgi.sock max_fails=1 fail_timeout=5s;
    }}

"""
    locations = f"""
        # alice/projects/hello/1
        location = /serve/{A} {{
            uwsgi_pass job_{A};
        }}
        location ^~ /serve/{A}/ {{
            uwsgi_pass job_{A};
        }}

        # alice/projects/hello/2
        location = /serve/{B} {{
            uwsgi_pass job_{B};
        }}
        location ^~ /serve/{B}/ {{
            uwsgi_pass job_{B};
        }}

        # project alice/projects/hello: 2 healthy job(s)
        location = /serve/alice/projects/hello {{
            uwsgi_pass project_{HELLO_SLUG};
        }}
        location ^~ /serve/alice/projects/hello/ {{
            uwsgi_pass project_{HELLO_SLUG};
        }}
"""
    assert _rendered(routes, ["alice/projects/hello"]) == _expected(upstreams, locations)


def test_rendered_config_with_a_sick_job_and_a_stopped_project(fixed_host):
    routes = [
        Route(A, "alice/projects/hello/1", "alice/projects/hello", _sock(A), True),
        Route(C, "alice/projects/hello/2", "alice/projects/hello", _sock(C), False),
    ]
    upstreams = f"""    upstream job_{A} {{
        server unix:/srv/mlh/run/{A}/sock/uwsgi.sock;
    }}

    upstream project_{HELLO_SLUG} {{
        server unix:/srv/mlh/run/{A}/sock/uwsgi.sock max_fails=1 fail_timeout=5s;
    }}

"""
    locations = f"""
        # alice/projects/hello/1
        location = /serve/{A} {{
            uwsgi_pass job_{A};
        }}
        location ^~ /serve/{A}/ {{
            uwsgi_pass job_{A};
        }}

        # alice/projects/hello/2
        location ^~ /serve/{C} {{
            add_header Retry-After 5 always;
            return 503 '{{"error": "job not available", "job": "alice/projects/hello/2", "detail": "see `mlserve info alice/projects/hello/2`"}}\\n';
        }}

        # project alice/projects/hello: 1 healthy job(s)
        location = /serve/alice/projects/hello {{
            uwsgi_pass project_{HELLO_SLUG};
        }}
        location ^~ /serve/alice/projects/hello/ {{
            uwsgi_pass project_{HELLO_SLUG};
        }}

        # project bob/projects/idle: 0 healthy job(s)
        location ^~ /serve/bob/projects/idle {{
            add_header Retry-After 5 always;
            return 503 '{{"error": "no healthy serving job", "project": "bob/projects/idle"}}\\n';
        }}
"""
    assert _rendered(routes, ["bob/projects/idle"]) == _expected(upstreams, locations)


def test_a_route_carries_no_text_from_the_app():
    # Why a job is sick (an app's health answer) stays in the state: nothing of it reaches nginx.conf.
    assert [field.name for field in dataclasses.fields(Route)] == ["job_id", "name", "project_key", "socket", "healthy"]


@pytest.mark.parametrize("route", [
    Route(A, 'alice/projects/hello/1 price $x; } "quoted"\n', "alice/projects/hello", _sock(A), False),
    Route(A, "alice/projects/hello/1", "alice/projects/hello;", _sock(A), True),
    Route(A, "alice/projects/hello/1", "alice/projects/other", _sock(A), True),
    Route("A" * 21 + "$", "alice/projects/hello/1", "alice/projects/hello", _sock(A), True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", "/elsewhere/uwsgi.sock", True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", f"{HOME}/run/../../etc/uwsgi.sock", True),
    Route(A, "alice/projects/hello/1", "alice/projects/hello", f"{HOME}/run/{A}/uwsgi.sock; evil", True),
], ids=["name", "project", "name-outside-project", "job-id", "socket-outside-home", "socket-dotdot", "socket-chars"])
def test_render_refuses_text_that_nginx_conf_must_not_contain(route):
    with pytest.raises(GatewayError):
        _gateway().render([route], [])


@pytest.mark.parametrize("project", ["alice/projects/x y", "alice/projects/x}", "Alice/projects/x", "alice/x"])
def test_render_refuses_a_bad_project_key(project):
    with pytest.raises(GatewayError):
        _gateway().render([], [project])


def test_render_refuses_a_home_path_nginx_would_split(tmp_path):
    with pytest.raises(GatewayError):
        _gateway(tmp_path / "my home").render([], [])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fake_nginx(monkeypatch):
    """nginx that accepts every configuration and starts at once; the calls it got."""
    calls: list[tuple[str, ...]] = []

    def run(self, nginx, *args):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(Gateway, "nginx", lambda self: "/usr/sbin/nginx")
    monkeypatch.setattr(Gateway, "_nginx", run)
    monkeypatch.setattr(Gateway, "_wait_for", lambda self, *args: None)
    return calls


def _running_gateway(tmp_path: Path, monkeypatch, pids: list[int | None]) -> Gateway:
    """A gateway whose master's pid is read as ``pids`` say, one after another (the last one stays)."""
    gateway = _gateway(tmp_path, _free_port())
    gateway.dir.mkdir(parents=True)
    gateway.config.write_text(f"# an older configuration\nlisten 127.0.0.1:{gateway.settings.port} backlog=4096;\n")
    answers = iter(pids)
    last: list[int | None] = [None]

    def pid(self):
        last[0] = next(answers, last[0])
        return last[0]

    monkeypatch.setattr(Gateway, "pid", pid)
    return gateway


@pytest.mark.parametrize("reaped", [True, False], ids=["master-gone", "master-not-yet-reaped"])
def test_apply_starts_nginx_instead_of_signalling_pid_zero_when_the_master_died(tmp_path, monkeypatch, fake_nginx,
                                                                                 reaped):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000, None])  # it dies right after the first look
    signalled: list[tuple[int, int]] = []

    def kill(pid, sig):
        signalled.append((pid, sig))
        if pid != 0 and reaped:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", kill)
    gateway.apply([], ["alice/projects/hello"])
    assert all(pid > 0 for pid, _ in signalled), signalled
    assert ("-c", str(gateway.config)) in fake_nginx  # started instead


def test_apply_reloads_a_running_master(tmp_path, monkeypatch, fake_nginx):
    gateway = _running_gateway(tmp_path, monkeypatch, [4_000_000])
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    gateway.apply([], ["alice/projects/hello"])
    assert signalled == [(4_000_000, signal.SIGHUP)]
    assert [args[0] for args in fake_nginx] == ["-t"]  # checked, not started a second time


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


def test_cap_logs_empties_only_logs_past_the_limit(tmp_path):
    gateway = _gateway(tmp_path)
    gateway.dir.mkdir(parents=True)
    (gateway.dir / "access.log").write_bytes(b"x" * 2000)
    (gateway.dir / "error.log").write_bytes(b"y" * 500)
    assert gateway.cap_logs(1000) == [gateway.dir / "access.log"]
    assert (gateway.dir / "access.log").stat().st_size == 0
    assert (gateway.dir / "error.log").stat().st_size == 500
    assert gateway.cap_logs(1000) == []
