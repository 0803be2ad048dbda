"""On Kubernetes nothing strips the endpoint's prefix: with MLSERVE_PREFIXES, mlserve_runtime.wsgi gives the app
the SCRIPT_NAME and PATH_INFO it gets behind the local gateway (templates/lua/mlserve_router.lua, route())."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest

from mlserve_runtime.health import HEALTH_VAR
from mlserve_runtime.loader import LoadedApp

JOB, PROJECT = "/serve/AbC123", "/serve/alice/projects/hello"
VERSION = f"{PROJECT}/v/3"
ECHO = ("def app(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [(environ['SCRIPT_NAME'] + ' ' + environ['PATH_INFO']).encode()]\n")


@pytest.fixture(scope="module")
def wsgi(tmp_path_factory):
    """The module uWSGI loads, imported as in a pod: it loads the app in MLSERVE_APP_DIR, and reads MLSERVE_PREFIXES."""
    app_dir = tmp_path_factory.mktemp("app")
    (app_dir / "app.py").write_text(ECHO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLSERVE_APP_DIR", str(app_dir))
        patch.setenv("MLSERVE_PREFIXES", f"{JOB},{PROJECT}")
        patch.delenv("LOG_FILE", raising=False)
        sys.modules.pop("mlserve_runtime.wsgi", None)
        try:
            module = importlib.import_module("mlserve_runtime.wsgi")
        finally:
            sys.modules.pop("app", None)
    return module


@pytest.fixture(scope="module")
def split(wsgi):
    prefixes = wsgi.parse_prefixes(f"{JOB},{VERSION},{PROJECT}")
    return lambda script_name, path: wsgi.split_prefix(script_name, path, prefixes)


def test_prefixes_are_parsed_longest_first(wsgi):
    parse_prefixes = wsgi.parse_prefixes
    assert parse_prefixes(f"{JOB},{VERSION},{PROJECT}") == (VERSION, PROJECT, JOB)
    assert parse_prefixes(f" {JOB}/ ,,{PROJECT},{JOB}") == (PROJECT, JOB)  # blanks, trailing slashes, repeats
    assert parse_prefixes(None) == parse_prefixes("") == parse_prefixes(" , /") == ()
    with pytest.raises(ValueError, match="serve/x"):
        parse_prefixes("serve/x")


@pytest.mark.parametrize("path, expected", [
    # The gateway: SCRIPT_NAME the prefix, PATH_INFO the rest, and "/" when nothing is left
    # (`ngx.var.mlserve_path_info = (rest ~= "" and rest) or "/"`): with or without the slash, the app's "/".
    (JOB, (JOB, "/")),
    (f"{JOB}/", (JOB, "/")),
    (f"{JOB}/predict", (JOB, "/predict")),
    (f"{JOB}/a/b/", (JOB, "/a/b/")),
    (PROJECT, (PROJECT, "/")),
    (f"{PROJECT}/x", (PROJECT, "/x")),
    # The longest prefix: a version's endpoint under its project's.
    (VERSION, (VERSION, "/")),
    (f"{VERSION}/a/b", (VERSION, "/a/b")),
    (f"{PROJECT}/v/30", (PROJECT, "/v/30")),  # whole segments only: not version 3's
    (f"{PROJECT}/v/", (PROJECT, "/v/")),
    # Whole segments only: none of these is under a prefix, and passes unchanged.
    (f"{JOB}4/x", ("", f"{JOB}4/x")),
    (f"{PROJECT}-2", ("", f"{PROJECT}-2")),
    ("/serve/AbC12", ("", "/serve/AbC12")),
    ("/serve", ("", "/serve")),
    ("/", ("", "/")),
    ("", ("", "")),
])
def test_a_path_under_a_prefix_is_split_as_the_gateway_splits_it(split, path, expected):
    assert split("", path) == expected


def test_a_request_with_a_script_name_or_without_prefixes_passes_unchanged(wsgi, split):
    assert split("/mounted", f"{JOB}/x") == ("/mounted", f"{JOB}/x")
    assert wsgi.split_prefix("", f"{JOB}/x", ()) == ("", f"{JOB}/x")


def _seen(environ: dict, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [f"{environ.get('SCRIPT_NAME')!r} {environ.get('PATH_INFO')!r}".encode()]


def _call(instance: Any, environ: dict) -> tuple[str, bytes]:
    answered: list[str] = []
    body = instance(environ, lambda status, headers, exc_info=None: answered.append(status))
    return answered[0], b"".join(body)


def test_the_instance_splits_every_request_before_the_app_sees_it(wsgi):
    Instance = wsgi.Instance
    instance = Instance(LoadedApp(_seen, "function", False), None, "GET", wsgi.parse_prefixes(f"{JOB},{VERSION},{PROJECT}"))
    assert _call(instance, {"SCRIPT_NAME": "", "PATH_INFO": f"{VERSION}/a", "QUERY_STRING": "x=1"}) == (
        "200 OK", f"'{VERSION}' '/a'".encode())
    assert _call(instance, {"PATH_INFO": JOB}) == ("200 OK", f"'{JOB}' '/'".encode())  # uWSGI may leave SCRIPT_NAME out
    # Behind the local gateway SCRIPT_NAME is set already: nothing changes.
    assert _call(instance, {"SCRIPT_NAME": JOB, "PATH_INFO": "/serve/AbC123/x"})[1] == f"'{JOB}' '{JOB}/x'".encode()
    # No prefix: untouched, not even a SCRIPT_NAME added.
    assert _call(instance, {"PATH_INFO": "/elsewhere"})[1] == b"None '/elsewhere'"
    # Without prefixes, the app gets the whole path.
    plain = Instance(LoadedApp(_seen, "function", False), None, "GET")
    assert _call(plain, {"SCRIPT_NAME": "", "PATH_INFO": f"{JOB}/x"})[1] == f"'' '{JOB}/x'".encode()


def test_the_health_check_is_not_split(wsgi):
    seen: list[tuple[str, str]] = []

    def app(environ: dict, start_response: Any) -> list[bytes]:
        seen.append((environ["SCRIPT_NAME"], environ["PATH_INFO"]))
        start_response("200 OK", [])
        return []

    instance = wsgi.Instance(LoadedApp(app, "function", False), f"{JOB}/health", "GET", (JOB,))
    status, _ = _call(instance, {HEALTH_VAR: "1", "SCRIPT_NAME": "", "PATH_INFO": "/"})
    assert status == "200 OK" and seen == [("", f"{JOB}/health")]  # the app's health path, as configured


def test_the_module_uwsgi_loads_reads_mlserve_prefixes_once(wsgi, monkeypatch):
    assert wsgi.application.prefixes == (PROJECT, JOB)
    monkeypatch.setenv("MLSERVE_PREFIXES", "/changed")  # read at import, not per request
    assert _call(wsgi.application, {"SCRIPT_NAME": "", "PATH_INFO": f"{PROJECT}/a"}) == ("200 OK", f"{PROJECT} /a".encode())
    assert _call(wsgi.application, {"SCRIPT_NAME": "", "PATH_INFO": JOB}) == ("200 OK", f"{JOB} /".encode())


def test_on_a_cluster_a_client_cannot_name_a_token(wsgi):
    """Behind a cluster's ingress no gateway of mlserve's sets X-Mlserve-Token: a client's own header
    of that name never reaches the app; behind the local gateway (no prefixes) it is the gateway's."""
    seen: list[object] = []

    def app(environ: dict, start_response: Any) -> list[bytes]:
        seen.append(environ.get("HTTP_X_MLSERVE_TOKEN"))
        start_response("200 OK", [])
        return []

    on_cluster = wsgi.Instance(LoadedApp(app, "function", False), None, "GET", (JOB,))
    _call(on_cluster, {"PATH_INFO": f"{JOB}/x", "HTTP_X_MLSERVE_TOKEN": "admin"})
    local = wsgi.Instance(LoadedApp(app, "function", False), None, "GET")
    _call(local, {"SCRIPT_NAME": JOB, "PATH_INFO": "/x", "HTTP_X_MLSERVE_TOKEN": "ci"})
    assert seen == [None, "ci"]


def test_on_a_cluster_the_app_cannot_steer_the_proxy(wsgi):
    """ingress-nginx acts on X-Accel-* from a backend; the local gateway ignores them: on a cluster
    the instance drops them (and mlserve's own X-Mlserve-* names) from every answer."""
    def app(environ: dict, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Accel-Redirect", "/serve/other/projects/secret"), ("Content-Type", "text/plain"),
                                  ("X-Mlserve-Version", "99"), ("x-accel-buffering", "no")])
        return [b"ok"]

    seen: list[list[tuple[str, str]]] = []
    on_cluster = wsgi.Instance(LoadedApp(app, "function", False), None, "GET", (JOB,))
    on_cluster({"PATH_INFO": f"{JOB}/x"}, lambda status, headers, exc_info=None: seen.append(headers))
    assert seen == [[("Content-Type", "text/plain")]]
