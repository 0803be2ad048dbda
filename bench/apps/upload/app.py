"""Counts an uploaded body in 1 MB chunks, keeping none of it (the benchmark measures the platform)."""

import json
import os


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def app(environ, start_response):
    stream, total = environ["wsgi.input"], 0
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    body = json.dumps({"bytes": total, "pid": os.getpid(), "peak_rss_kb": _rss_kb()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
