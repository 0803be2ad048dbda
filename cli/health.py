"""Ask an instance whether it is alive, over its uwsgi socket, the way nginx talks to it.

The probe sets the uwsgi var MLSERVE_HEALTH, which nginx never forwards, so the runtime's
wrapper answers it (app loaded, a worker answers) or forwards it to the app's own health path.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from .constants import HEALTH_VAR


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None
    detail: str


def _uwsgi_packet(variables: dict[str, str]) -> bytes:
    body = b"".join(
        struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
        for k, v in ((key.encode(), value.encode()) for key, value in variables.items())
    )
    return struct.pack("<BHB", 0, len(body), 0) + body


def probe(socket_path: str, timeout: float = 3.0, script_name: str = "") -> ProbeResult:
    """One health request to the uwsgi socket; never raises, a failure is ``ok=False``."""
    packet = _uwsgi_packet(
        {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": script_name,
            "PATH_INFO": "/",
            "REQUEST_URI": "/_mlserve/health",
            "QUERY_STRING": "",
            "SERVER_NAME": "mlserve-probe",
            "SERVER_PORT": "0",
            "SERVER_PROTOCOL": "HTTP/1.0",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_LENGTH": "0",
            HEALTH_VAR: "1",
        }
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(socket_path)
            conn.sendall(packet)
            chunks = []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as exc:
        return ProbeResult(False, None, f"{type(exc).__name__}: {exc}")
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        return ProbeResult(False, None, f"unexpected answer: {printable(status_line[:80])!r}")
    return ProbeResult(status == 200, status, printable(body[:200].decode("utf-8", "replace")))


def printable(text: str) -> str:
    """Text an app sent, safe to store and show: control characters (terminal escapes, newlines) become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def wait_healthy(socket_path: str, deadline: float, alive: Callable[[], bool] | None = None) -> ProbeResult:
    """Probe until a pass or ``deadline`` (time.monotonic); stop early when ``alive()`` says the instance died."""
    result = ProbeResult(False, None, "not probed yet")
    while time.monotonic() < deadline:
        result = probe(socket_path, timeout=max(0.5, min(3.0, deadline - time.monotonic())))
        if result.ok:
            return result
        if alive is not None and not alive():
            return ProbeResult(False, result.status, "the instance exited")
        time.sleep(0.1)
    return result
