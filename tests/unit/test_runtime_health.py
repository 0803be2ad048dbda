"""The in-instance health answer (mlserve_runtime.wsgi.Instance), run on the host as uWSGI would call it."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest

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
