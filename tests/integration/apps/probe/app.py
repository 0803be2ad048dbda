"""A test app that reports what it sees, so tests can assert routing and the instance's environment."""

import json
import os
import time


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/slow":
        time.sleep(float(environ.get("QUERY_STRING", "").partition("=")[2] or 2))
    body = environ["wsgi.input"].read() if environ.get("CONTENT_LENGTH") else b""
    payload = {
        "job": os.environ.get("MLSERVE_JOB"),
        "pid": os.getpid(),
        "method": environ["REQUEST_METHOD"],
        "script_name": environ.get("SCRIPT_NAME"),
        "path_info": path,
        "body_bytes": len(body),
        "uid": os.getuid(),
        "manifest": os.environ.get("MANIFEST_FILE"),
        "version": 1,
        "environ": sorted(os.environ),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
    }
    data = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
