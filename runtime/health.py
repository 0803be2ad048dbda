"""Ask an instance two questions: is it ready (take traffic?) and is it alive (restart?).

The same code runs on the host (mlserve's supervisor) and inside a pod (Kubernetes exec probes:
``python -m mlserve_runtime.health ready|live ...``), so it is standard library only and never
imports ``mlserve``.

Readiness is the probe, over the instance's uwsgi socket the way nginx talks to it: it sets the
uwsgi var MLSERVE_HEALTH, which nginx never forwards (and an HTTP client cannot set on uWSGI's
http-socket: its headers arrive as HTTP_* vars), so the runtime's wrapper answers it (app loaded,
a worker answers) or forwards it to the app's own health path. The probe waits in the same queue
as clients' requests, so when every worker is busy it times out.

Liveness is the uWSGI master's stats socket, next to the uwsgi socket: the master answers it even
when every worker is busy, with what each worker is doing. An instance whose workers are all in
requests inside the timeout is busy, not sick.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# mlserve's host side imports these from here (mlserve.constants): one definition for both sides.
HEALTH_VAR = "MLSERVE_HEALTH"  # uwsgi var only the probe sets; nginx never forwards it
HEALTH_TIMEOUT_S = 2.0  # a check slower than this fails (the supervisor's default; mlserve.yml `health:`)
STATS_TIMEOUT_S = 1.0  # for the master's stats answer (it answers even when every worker is busy)
LOAD_GRACE_S = 120.0  # a worker still loading the app after this long is stuck, not starting

STATS_MAX_BYTES = 8 << 20  # the instance writes this socket's folder: what answers is read with a bound


def printable(text: str) -> str:
    """Control characters (terminal escapes, newlines) become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


# -- readiness: the probe over the uwsgi socket --------------------------------------------------


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


# -- liveness: the master's stats ----------------------------------------------------------------


def read_stats(path: str, timeout: float = STATS_TIMEOUT_S) -> dict[str, Any]:
    """The uWSGI master's stats: JSON, sent whole, then the connection closed.

    Raises OSError when no master answers within ``timeout`` (in all), ValueError when the answer
    is not stats.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer in {timeout:g}s")
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > STATS_MAX_BYTES:
                raise ValueError(f"an answer over {STATS_MAX_BYTES} bytes")
            chunks.append(chunk)
    data = json.loads(b"".join(chunks))
    if not isinstance(data, dict):
        raise ValueError("an answer that is not a JSON object")
    return data


def _number(data: Mapping[str, Any], key: str) -> int:
    # The instance can write the socket's folder: every value is checked, nothing else is kept.
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class Worker:
    """One uWSGI worker as its master sees it."""

    id: int
    pid: int
    accepting: bool  # loaded the app and takes requests
    request: str  # "" (none), "client" or "probe" (the host's health probe)
    request_s: float  # seconds into the current request
    spawned_s: float  # seconds since it was (re)spawned
    respawns: int  # times the master spawned it again (killed, crashed, harakiri)

    @classmethod
    def parse(cls, data: Mapping[str, Any], now: float) -> Worker:
        request, started = "", 0
        for core in data.get("cores") or []:
            if isinstance(core, dict) and _number(core, "in_request"):
                names = [v.partition("=")[0] for v in core.get("vars") or [] if isinstance(v, str)]
                request = "probe" if HEALTH_VAR in names else "client"
                info = core.get("req_info")
                started = _number(info, "request_start") if isinstance(info, dict) else 0
        if not request and data.get("status") == "busy":
            request = "client"
        if started > 1e12:  # microseconds in some uWSGI versions
            started //= 1_000_000
        spawned = _number(data, "last_spawn")
        return cls(
            id=_number(data, "id"),
            pid=_number(data, "pid"),
            accepting=bool(_number(data, "accepting")),
            request=request,
            request_s=max(0.0, now - started) if started else 0.0,
            spawned_s=max(0.0, now - spawned) if spawned else 0.0,
            respawns=max(0, _number(data, "respawn_count") - 1),  # the first spawn counts 1
        )


@dataclass(frozen=True)
class Liveness:
    """The master's answer, judged: is the instance alive, and is it only busy?

    ``alive``: the master answers and has workers. ``busy``: every worker is in a client's request
    inside the timeout (or answering a probe, or loading the app after a respawn), none is free and
    none is stuck: a probe that timed out waited behind them, and the instance is busy, not sick.
    ``stuck``: a worker is past its limit (in a request, a health check, loading the app); ``detail``
    names it.
    """

    alive: bool
    busy: bool
    detail: str
    workers: tuple[Worker, ...] = ()
    stuck: bool = False

    @property
    def respawns(self) -> int:
        return sum(w.respawns for w in self.workers)


def _activity(worker: Worker, timeout_s: float, probe_timeout_s: float) -> tuple[str, float, float] | None:
    """What a worker is doing, for how many seconds, and for how many it may; None: it is free."""
    if worker.request == "client":
        return "in a request", worker.request_s, timeout_s
    if worker.request == "probe":  # a health path that never answers is sick, not busy
        return "in a health check", worker.request_s, probe_timeout_s
    if not worker.accepting:  # every worker imports the app itself (lazy apps), also after a respawn
        return "loading the app", worker.spawned_s, LOAD_GRACE_S
    return None


def judge(stats: Mapping[str, Any], now: float, timeout_s: float, probe_timeout_s: float) -> Liveness:
    """Judge a master's stats (read at ``now``) for an instance with request timeout ``timeout_s``,
    checked by probes that give up after ``probe_timeout_s``."""
    raw = stats.get("workers")
    workers = tuple(Worker.parse(w, now) for w in raw if isinstance(w, dict)) if isinstance(raw, list) else ()
    running = [w for w in workers if w.pid > 0]
    if not running:
        return Liveness(False, False, "the uWSGI master has no workers", workers)
    free, working = [], []
    for worker in running:
        activity = _activity(worker, timeout_s, probe_timeout_s)
        if activity is None:
            free.append(worker)
            continue
        what, seconds, limit = activity
        if seconds > limit:
            return Liveness(True, False, f"worker {worker.id} {what} for {seconds:.0f}s (limit {limit:g}s)", workers,
                            stuck=True)
        working.append(worker)
    if free:
        return Liveness(True, False, f"{len(free)} of {len(running)} workers idle", workers)
    longest = max(w.request_s for w in working)
    loading = sum(1 for w in working if not w.request)
    detail = (f"{len(working)} of {len(running)} workers busy" + (f", {loading} loading the app" if loading else "")
              + (f", the longest request for {longest:.0f}s" if longest else ""))
    return Liveness(True, True, detail, workers)


def liveness(stats_path: str, timeout_s: float, probe_timeout_s: float) -> Liveness:
    """Ask the master over its stats socket; never raises: a master that does not answer is not alive."""
    try:
        stats = read_stats(stats_path)
    except (OSError, ValueError) as exc:
        return Liveness(False, False, printable(f"the uWSGI master does not answer ({type(exc).__name__}: {exc})"))
    return judge(stats, time.time(), timeout_s, probe_timeout_s)


# -- the exec probes: python -m mlserve_runtime.health ready|live ... ------------------------------


def positive_seconds(text: str) -> float:
    value = float(text)  # argparse turns a ValueError into its usage error
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlserve_runtime.health",
        description="An instance's health, as the supervisor checks it: exit 0 when the check passes, else 1 "
                    "with one line saying why (2: bad arguments).")
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("ready", help="the readiness probe over the uwsgi socket")
    ready.add_argument("--socket", required=True, metavar="PATH", help="the instance's uwsgi socket")
    ready.add_argument("--timeout", type=positive_seconds, default=HEALTH_TIMEOUT_S, metavar="S",
                       help=f"give up after S seconds (default {HEALTH_TIMEOUT_S:g})")
    live = commands.add_parser(
        "live", help="the uWSGI master's stats judged: alive (idle or busy) passes; a master that does not "
                     "answer, has no workers or has a worker stuck past its limit fails")
    live.add_argument("--stats", required=True, metavar="PATH", help="the master's stats socket")
    live.add_argument("--timeout-s", type=positive_seconds, required=True, metavar="N",
                      help="the instance's request timeout (mlserve.yml timeout)")
    live.add_argument("--probe-timeout", type=positive_seconds, default=HEALTH_TIMEOUT_S, metavar="S",
                      help=f"the readiness probe's timeout (default {HEALTH_TIMEOUT_S:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """One check; 0 when it passes, else 1 after one line saying why."""
    args = _parser().parse_args(argv)
    if args.command == "ready":
        result = probe(args.socket, timeout=args.timeout)
        ok, why = result.ok, result.detail or f"status {result.status}"
    else:
        # As the supervisor asks: the instance's request timeout, and its health checks' timeout.
        life = liveness(args.stats, args.timeout_s, args.probe_timeout)
        ok, why = life.alive and not life.stuck, life.detail
    if not ok:
        print(printable(why)[:300] or "failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
