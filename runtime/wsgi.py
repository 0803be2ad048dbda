"""The WSGI entry uWSGI loads in every worker (``module = mlserve_runtime.wsgi:application``).

It imports the user's app and answers the health probe: a request carrying the uwsgi variable
MLSERVE_HEALTH, which no client can set. The gateway (nginx) never forwards it, and on uWSGI's
http-socket (Kubernetes) a client's headers arrive as HTTP_* variables: a header ``MLSERVE-HEALTH``
is HTTP_MLSERVE_HEALTH, which goes to the app like any other.

Behind the local gateway, nginx gives the app the endpoint's prefix as SCRIPT_NAME and the rest of
the path as PATH_INFO. On Kubernetes nothing strips the prefix, so with MLSERVE_PREFIXES set
(comma-separated path prefixes) the same split is made here (``split_prefix``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import logfile
from .health import HEALTH_VAR
from .loader import LoadedApp, load

StartResponse = Callable[..., Any]


def _worker_id() -> int:
    try:
        import uwsgi

        return int(uwsgi.worker_id())
    except ImportError:
        return 0


def parse_prefixes(value: str | None) -> tuple[str, ...]:
    """MLSERVE_PREFIXES (``/serve/AbC,/serve/o/projects/p``), longest first; empty entries and trailing
    slashes dropped. A prefix is an absolute path: anything else is a mistake of whoever set it."""
    prefixes = set()
    for entry in (value or "").split(","):
        prefix = entry.strip().rstrip("/")
        if not prefix:
            continue
        if not prefix.startswith("/"):
            raise ValueError(f"MLSERVE_PREFIXES: {prefix!r} is not a path starting with /")
        prefixes.add(prefix)
    return tuple(sorted(prefixes, key=lambda p: (-len(p), p)))


def split_prefix(script_name: str, path_info: str, prefixes: Sequence[str]) -> tuple[str, str]:
    """The (SCRIPT_NAME, PATH_INFO) the app gets behind the local gateway, for a request that came with
    the whole path in PATH_INFO: the longest of ``prefixes`` (longest first, see parse_prefixes) that
    is the path or a whole-segment start of it is SCRIPT_NAME, the rest PATH_INFO, "/" when nothing
    is left (the gateway's ``/serve/<id>`` and ``/serve/<id>/`` both reach the app's "/"). A request
    with a SCRIPT_NAME already, or under none of the prefixes, passes unchanged."""
    if script_name:
        return script_name, path_info
    for prefix in prefixes:
        if path_info.startswith(prefix):
            rest = path_info[len(prefix):]
            if not rest:
                return prefix, "/"
            if rest[0] == "/":
                return prefix, rest
    return script_name, path_info


class Instance:
    """The user's app behind the health check (and the prefix split, when the path still has it)."""

    def __init__(self, loaded: LoadedApp, health_path: str | None, health_method: str,
                 prefixes: Sequence[str] = ()) -> None:
        self.loaded = loaded
        self.health_path = health_path
        self.health_method = health_method.upper()
        self.prefixes = tuple(prefixes)  # longest first (parse_prefixes)

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get(HEALTH_VAR):
            return self.health(environ, start_response)
        if self.prefixes:
            # No gateway of mlserve's is in front (a cluster's ingress is): the token name the gateway
            # would set cannot be told from a client's header of that name, so the app never sees one;
            # and the app's answer cannot steer the proxy (X-Accel-*) or claim mlserve's own headers.
            environ.pop("HTTP_X_MLSERVE_TOKEN", None)
            if not environ.get("SCRIPT_NAME"):
                script_name, path_info = split_prefix("", environ.get("PATH_INFO", ""), self.prefixes)
                if script_name:
                    environ["SCRIPT_NAME"], environ["PATH_INFO"] = script_name, path_info
            return self.loaded.wsgi(environ, _without_proxy_headers(start_response))
        return self.loaded.wsgi(environ, start_response)

    def health(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """200 when the app loaded and this worker answers; with a health path, the app's own verdict."""
        status, detail = "200 OK", {"app": self.loaded.kind, "pid": os.getpid(), "worker": _worker_id()}
        if self.health_path:
            probe = {**environ, "REQUEST_METHOD": self.health_method, "PATH_INFO": self.health_path,
                     "QUERY_STRING": "", "CONTENT_LENGTH": "0"}
            probe.pop(HEALTH_VAR, None)
            seen: list[str] = []
            try:
                def record(app_status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
                    seen.append(app_status)
                    return lambda data: None

                body = self.loaded.wsgi(probe, record)
                try:
                    for _ in body:
                        pass
                finally:
                    getattr(body, "close", lambda: None)()
            except Exception as exc:  # noqa: BLE001 - a crashing health path is a failed check
                seen = [f"500 {type(exc).__name__}: {exc}"]
            app_status = seen[0] if seen else "500 no response"
            detail["health_path"] = f"{self.health_method} {self.health_path} -> {app_status}"
            if not app_status.startswith("200"):
                status = "503 Service Unavailable"
        data = json.dumps(detail).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


PROXY_HEADER_PREFIXES = ("x-accel-", "x-mlserve-")


def _without_proxy_headers(start_response: StartResponse) -> StartResponse:
    """start_response without the headers nginx acts on (X-Accel-Redirect, -Buffering, -Limit-Rate ...)
    or that mlserve sets itself."""
    def filtered(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        kept = [(k, v) for k, v in headers if not k.lower().startswith(PROXY_HEADER_PREFIXES)]
        return start_response(status, kept, exc_info) if exc_info is not None else start_response(status, kept)

    return filtered


def _make() -> Instance:
    loaded = load(os.environ.get("MLSERVE_APP_DIR") or os.getcwd())
    if _worker_id() <= 1:
        logfile.start_watcher(os.environ.get("LOG_FILE"),
                              int(os.environ.get("LOG_FILE_MAX_BYTES") or logfile.DEFAULT_MAX_BYTES))
    return Instance(loaded, os.environ.get("MLSERVE_HEALTH_PATH"), os.environ.get("MLSERVE_HEALTH_METHOD", "GET"),
                    parse_prefixes(os.environ.get("MLSERVE_PREFIXES")))


application = _make()
