"""A test app that fills its output folder on request and says what happened, so tests can assert the
output limit: /write?mb=N&name=F writes N MiB to $OUTPUT_DIR/F, /space is statvfs of $OUTPUT_DIR,
/read?path=P says whether the instance can read P, / names the job and the user it runs as."""

import errno
import json
import os
from urllib.parse import parse_qs

CHUNK = os.urandom(1 << 20)  # random: nothing on the way compresses or dedupes it


def write(name, mb):
    path = os.path.join(os.environ["OUTPUT_DIR"], name)
    written, error = 0, None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mb):
            written += os.write(fd, CHUNK)
        os.fsync(fd)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        os.close(fd)
    return {"written": written, "error": error}


def space():
    info = os.statvfs(os.environ["OUTPUT_DIR"])
    return {"total": info.f_blocks * info.f_frsize, "free": info.f_bavail * info.f_frsize}


def read(path):
    try:
        with open(path, "rb") as handle:
            return {"read": len(handle.read(64))}
    except OSError as exc:
        return {"error": errno.errorcode.get(exc.errno, str(exc.errno))}


def app(environ, start_response):
    query = {key: values[0] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "")
    if path == "/write":
        payload = write(query.get("name", "blob"), int(query.get("mb", "1")))
    elif path == "/space":
        payload = space()
    elif path == "/read":
        payload = read(query["path"])
    else:
        payload = {"job": os.environ.get("MLSERVE_JOB"), "uid": os.getuid(), "gid": os.getgid(),
                   "groups": os.getgroups(), "pid": os.getpid()}
    data = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
