"""A plain WSGI function, no framework: it streams large responses and counts visits safely.

``GET /stream?mb=50`` streams 50 MiB generated chunk by chunk, so a worker never holds the whole
body in memory. ``GET /predictions?rows=1000000`` streams a CSV of batch predictions the same way.

``POST /counter`` adds one to a counter in a file under OUTPUT_DIR. uWSGI runs two worker
processes, so two requests can read the same value and both write value + 1, losing one visit.
``mlserve_runtime.locked`` takes an inter-process file lock around the read-modify-write;
``POST /counter?lock=0`` skips it, to see the race for yourself.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs

from mlserve_runtime import locked

CHUNK = bytes(range(256)) * 4096  # 1 MiB; the stream is this block repeated
MAX_MB = 4096
COUNTER = Path(os.environ.get("OUTPUT_DIR") or tempfile.gettempdir()) / "counter.json"


def _json(start_response, status: str, payload: dict) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _query_int(environ, name: str, default: int, low: int, high: int) -> int:
    raw = parse_qs(environ.get("QUERY_STRING", "")).get(name, [str(default)])[0]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, not {value}")
    return value


def stream_bytes(size: int):
    full, rest = divmod(size, len(CHUNK))
    for _ in range(full):
        yield CHUNK
    if rest:
        yield CHUNK[:rest]


def stream_predictions(rows: int):
    """A toy linear model scored row by row; rows are batched into ~64 KiB chunks."""
    yield b"id,x,score,label\n"
    batch = []
    for i in range(rows):
        x = (i * 7919 % 10007) / 10007
        score = 1 / (1 + 2.718281828 ** (-(6 * x - 3)))
        batch.append(f"{i},{x:.5f},{score:.5f},{int(score > 0.5)}\n")
        if len(batch) == 2048:
            yield "".join(batch).encode()
            batch = []
    if batch:
        yield "".join(batch).encode()


def read_count() -> int:
    try:
        return int(json.loads(COUNTER.read_text())["count"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def write_count(value: int) -> None:
    partial = COUNTER.with_name(f"{COUNTER.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"count": value}))
    os.replace(partial, COUNTER)  # readers never see a half-written file


def increment(use_lock: bool) -> int:
    def read_modify_write() -> int:
        value = read_count() + 1
        time.sleep(0.002)  # the window in which another worker's increment would be lost
        write_count(value)
        return value

    if not use_lock:
        return read_modify_write()
    with locked(COUNTER):
        return read_modify_write()


def app(environ, start_response):
    path, method = environ.get("PATH_INFO") or "/", environ["REQUEST_METHOD"]
    try:
        if path == "/stream" and method == "GET":
            size = _query_int(environ, "mb", 50, 0, MAX_MB) * 2**20
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(size))])
            return stream_bytes(size)
        if path == "/predictions" and method == "GET":
            rows = _query_int(environ, "rows", 100_000, 0, 50_000_000)
            start_response("200 OK", [("Content-Type", "text/csv")])
            return stream_predictions(rows)
        if path == "/counter" and method == "POST":
            use_lock = _query_int(environ, "lock", 1, 0, 1) == 1
            return _json(start_response, "200 OK", {"count": increment(use_lock), "pid": os.getpid()})
        if path == "/counter" and method == "GET":
            return _json(start_response, "200 OK", {"count": read_count()})
        if path == "/counter" and method == "DELETE":
            with locked(COUNTER):
                write_count(0)
            return _json(start_response, "200 OK", {"count": 0})
    except ValueError as exc:
        return _json(start_response, "400 Bad Request", {"error": "bad_parameter", "message": str(exc)})
    if path == "/":
        root = environ.get("SCRIPT_NAME", "")
        return _json(start_response, "200 OK", {
            "stream": f"GET {root}/stream?mb=50", "predictions": f"GET {root}/predictions?rows=100000",
            "counter": f"POST {root}/counter (add one), GET it, DELETE it (reset)",
        })
    return _json(start_response, "404 Not Found", {"error": "not_found", "path": path})
