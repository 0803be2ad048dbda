"""The WSGI entry uWSGI loads in every worker (``module = mlserve_runtime.wsgi:application``).

It imports the user's app and answers the host's health probe: a request carrying the uwsgi
variable MLSERVE_HEALTH, which the gateway never forwards, so no client can reach it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from . import logfile
from .loader import LoadedApp, load

HEALTH_VAR = "MLSERVE_HEALTH"

StartResponse = Callable[..., Any]


def _worker_id() -> int:
    try:
        import uwsgi

        return int(uwsgi.worker_id())
    except ImportError:
        return 0


class Instance:
    """The user's app behind the health check."""

    def __init__(self, loaded: LoadedApp, health_path: str | None, health_method: str) -> None:
        self.loaded = loaded
        self.health_path = health_path
        self.health_method = health_method.upper()

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get(HEALTH_VAR):
            return self.health(environ, start_response)
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


def _make() -> Instance:
    loaded = load(os.environ.get("MLSERVE_APP_DIR") or os.getcwd())
    if _worker_id() <= 1:
        logfile.start_watcher(os.environ.get("LOG_FILE"),
                              int(os.environ.get("LOG_FILE_MAX_BYTES") or logfile.DEFAULT_MAX_BYTES))
    return Instance(loaded, os.environ.get("MLSERVE_HEALTH_PATH"), os.environ.get("MLSERVE_HEALTH_METHOD", "GET"))


application = _make()
