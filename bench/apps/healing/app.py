"""A test app for self-healing: a health path that can be made to hang, a locked counter, and
probes of what the locked-down instance may touch."""

import json
import os
import time

from flask import Flask, jsonify, request

from mlserve_runtime import locked

app = Flask(__name__)
SICK = "/tmp/sick"  # per instance: the tmpfs is new after a restart
COUNTER = os.path.join(os.environ.get("OUTPUT_DIR", "/tmp"), "counter.json")


@app.get("/")
def hello():
    return jsonify(job=os.environ.get("MLSERVE_JOB"), pid=os.getpid())


@app.get("/status")
def status():
    if os.path.exists(SICK):
        time.sleep(30)
    return jsonify(ok=True)


@app.post("/sick")
def sick():
    open(SICK, "w").close()
    return jsonify(sick=True)


@app.post("/inc")
def inc():
    with locked(COUNTER):
        try:
            with open(COUNTER) as handle:
                value = json.load(handle)["value"]
        except FileNotFoundError:
            value = 0
        time.sleep(0.001)  # widen the race the lock must close
        with open(COUNTER, "w") as handle:
            json.dump({"value": value + 1, "pid": os.getpid()}, handle)
    return jsonify(value=value + 1, pid=os.getpid())


@app.get("/count")
def count():
    with locked(COUNTER), open(COUNTER) as handle:
        return jsonify(json.load(handle))


@app.get("/write")
def write():
    path = request.args["path"]
    try:
        with open(path, "w") as handle:
            handle.write("x")
    except OSError as exc:
        return jsonify(ok=False, error=f"{type(exc).__name__}: {exc}")
    return jsonify(ok=True)


@app.get("/read")
def read():
    path = request.args["path"]
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return jsonify(ok=False, error=f"{type(exc).__name__}: {exc}")
    return jsonify(ok=True)


@app.get("/connect")
def connect():
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(request.args["path"])
    except OSError as exc:
        return jsonify(ok=False, error=f"{type(exc).__name__}: {exc}")
    return jsonify(ok=True)
