"""The in-instance health answer (mlserve_runtime.wsgi.Instance), run on the host as uWSGI would call it."""

from __future__ import annotations

import importlib
import io
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlserve_runtime.health import main, probe
from mlserve_runtime.loader import LoadedApp


@pytest.fixture(scope="module")
def wsgi(tmp_path_factory):
    """The module uWSGI loads; importing it loads the app in MLSERVE_APP_DIR, as in an instance."""
    app_dir = tmp_path_factory.mktemp("app")
    (app_dir / "app.py").write_text("def app(environ, start_response):\n    return []\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLSERVE_APP_DIR", str(app_dir))
        patch.delenv("LOG_FILE", raising=False)
        sys.modules.pop("mlserve_runtime.wsgi", None)
        module = importlib.import_module("mlserve_runtime.wsgi")
    sys.modules.pop("app", None)
    return module


def _app(status: str):
    def app(environ: dict, start_response: Any) -> list[bytes]:
        start_response(status if environ["PATH_INFO"] == "/health" else "200 OK", [])
        return [b"body"]

    return app


def _call(instance: Any, environ: dict) -> tuple[str, bytes]:
    answered: list[str] = []
    body = instance(environ, lambda status, headers, exc_info=None: answered.append(status))
    assert len(answered) == 1, "start_response must be called exactly once"
    return answered[0], b"".join(body)


def test_without_a_health_path_a_loaded_app_is_healthy(wsgi):
    Instance, HEALTH_VAR = wsgi.Instance, wsgi.HEALTH_VAR
    status, body = _call(Instance(LoadedApp(_app("500 X"), "function", False), None, "GET"), {HEALTH_VAR: "1"})
    assert status == "200 OK" and b'"app": "function"' in body


def test_the_apps_own_health_path_decides(wsgi):
    Instance, HEALTH_VAR = wsgi.Instance, wsgi.HEALTH_VAR
    ok = Instance(LoadedApp(_app("200 OK"), "function", False), "/health", "GET")
    sick = Instance(LoadedApp(_app("500 price $x"), "function", False), "/health", "GET")
    assert _call(ok, {HEALTH_VAR: "1", "PATH_INFO": "/"})[0] == "200 OK"
    status, body = _call(sick, {HEALTH_VAR: "1", "PATH_INFO": "/"})
    assert status == "503 Service Unavailable" and b"GET /health -> 500 price $x" in body


def test_requests_without_the_probe_variable_reach_the_app(wsgi):
    instance = wsgi.Instance(LoadedApp(_app("500 X"), "function", False), "/health", "GET")
    assert _call(instance, {"PATH_INFO": "/"}) == ("200 OK", b"body")


def test_a_clients_mlserve_health_header_reaches_the_app(wsgi):
    # On uWSGI's http-socket (Kubernetes) a client's header `MLSERVE-HEALTH: 1` is the variable
    # HTTP_MLSERVE_HEALTH, as every header is HTTP_*: only the uwsgi socket's own MLSERVE_HEALTH asks for health.
    instance = wsgi.Instance(LoadedApp(_app("500 X"), "function", False), "/health", "GET")
    assert _call(instance, {"HTTP_MLSERVE_HEALTH": "1", "PATH_INFO": "/"}) == ("200 OK", b"body")


# -- the probe over a uwsgi socket, and the exec probe in a pod: python -m mlserve_runtime.health ready --


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    path = Path(tempfile.mkdtemp(prefix="mlrh", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _uwsgi_vars(conn: socket.socket) -> dict[str, str]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    _, size, _ = struct.unpack("<BHB", exactly(4))
    body, variables = exactly(size), {}
    while body:
        (klen,), body = struct.unpack("<H", body[:2]), body[2:]
        key, body = body[:klen].decode(), body[klen:]
        (vlen,), body = struct.unpack("<H", body[:2]), body[2:]
        variables[key], body = body[:vlen].decode(), body[vlen:]
    return variables


def _http_answer(app: Any, environ: dict[str, Any]) -> bytes:
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started.append((status, headers))

    body = b"".join(app(environ, start_response))
    status, headers = started[0]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode("latin-1") + body


@pytest.fixture
def serve_uwsgi(short_dir) -> Iterator[Any]:
    """A stand-in for uWSGI's uwsgi socket: each request's vars become the environ of ``app`` (a WSGI
    callable), whose answer goes back as uWSGI sends it; or ``raw`` bytes go back whatever was asked."""
    servers: list[socket.socket] = []

    def start(app: Any = None, raw: bytes | None = None) -> Path:
        path = short_dir / f"u{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        servers.append(server)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    environ: dict[str, Any] = {**_uwsgi_vars(conn), "wsgi.input": io.BytesIO()}
                    if raw is not None:
                        conn.sendall(raw)
                        continue
                    conn.sendall(_http_answer(app, environ))

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield start
    for server in servers:
        server.close()


def test_the_probe_asks_the_instance_over_its_uwsgi_socket(wsgi, serve_uwsgi):
    healthy = serve_uwsgi(wsgi.Instance(LoadedApp(_app("500 X"), "function", False), None, "GET"))
    result = probe(str(healthy), timeout=2)
    assert result.ok and result.status == 200 and '"app": "function"' in result.detail
    sick = serve_uwsgi(wsgi.Instance(LoadedApp(_app("500 X"), "function", False), "/health", "GET"))
    result = probe(str(sick), timeout=2)
    assert not result.ok and result.status == 503 and "GET /health -> 500 X" in result.detail


def test_ready_exits_0_on_a_pass_and_1_with_one_printable_line_otherwise(wsgi, serve_uwsgi, short_dir, capsys):
    healthy = serve_uwsgi(wsgi.Instance(LoadedApp(_app("500 X"), "function", False), None, "GET"))
    assert main(["ready", "--socket", str(healthy)]) == 0
    assert main(["ready", "--socket", str(healthy), "--timeout", "0.5"]) == 0
    assert capsys.readouterr().out == ""
    sick = serve_uwsgi(wsgi.Instance(LoadedApp(_app("500 X"), "function", False), "/health", "GET"))
    assert main(["ready", "--socket", str(sick)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "GET /health -> 500 X" in out
    assert main(["ready", "--socket", str(short_dir / "gone.sock")]) == 1
    assert capsys.readouterr().out.startswith("FileNotFoundError: ")
    odd = serve_uwsgi(raw=b"HTTP/1.1 503 X\r\n\r\n\x1b[2Jdown\nfor\rnow")
    assert main(["ready", "--socket", str(odd)]) == 1
    assert capsys.readouterr().out == "?[2Jdown?for?now\n"
    silent = serve_uwsgi(raw=b"")
    assert main(["ready", "--socket", str(silent)]) == 1
    assert capsys.readouterr().out == "unexpected answer: ''\n"


def test_the_probe_command_runs_without_mlserve(short_dir):
    """As the kubelet runs it in a pod: a module of mlserve_runtime (standard library only), not mlserve."""
    code = ("import runpy, sys; sys.argv = ['health', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mlserve_runtime.health', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in sys.modules if m.split('.')[0] == 'mlserve'))\n")
    done = subprocess.run([sys.executable, "-c", code, "ready", "--socket", str(short_dir / "gone.sock")],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.splitlines()[-1] == "1 []", done
    assert done.stdout.startswith("FileNotFoundError: ")
    done = subprocess.run([sys.executable, "-m", "mlserve_runtime.health", "live", "--stats",
                           str(short_dir / "gone.sock"), "--timeout-s", "60"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1 and done.stdout.startswith("the uWSGI master does not answer"), done
    assert done.stderr == ""
