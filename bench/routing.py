"""Routing without reloads (issue 8): no failed request through routing changes, for two clients that
never retry, each measured alone (wrk on keep-alive connections, and a requests.Session with
max_retries=0); how soon after the command that made it a routing change is live for fresh connections;
and scaling 1 -> 30 -> 1 with instances started and stopped in parallel.

Every scenario runs on a fresh mlserve (bench/sandbox.py); loads go to loopback only and are bounded in
time. What the gateway logged meanwhile (the statuses in its access.log, its error.log lines by kind) is
printed and kept in the row's notes before the sandbox is deleted."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import docker
import requests
from faults import deploy
from results import BenchError, Result, run_scenarios
from sandbox import sandbox

from tests.harness import (
    REPO,
    Load,
    Mlserve,
    job_container,
    labelled_containers,
    project_pools,
    project_ready,
    seconds_until,
)

HELLO_APP = REPO / "bench" / "apps" / "hello"
NAMING_APP = REPO / "tests" / "integration" / "apps" / "healing"  # answers {"job": ...} at /; hello does not
WRK_SECONDS = int(os.environ.get("BENCH_ROUTING_WRK_SECONDS", "25"))  # covers a whole scenario
WRK_CONNECTIONS = 8
SESSION_THREADS = 4
LOAD_LIMIT_S = 90  # no load runs longer than this, whatever happens
REQUEST_TIMEOUT_S = 30
FRESH_CONNECTIONS = 50  # per batch, when checking that a change is live
FRESH_THREADS = 10
LIVE_WAIT_S = 10  # a change not live after this is an error
LIVE_TARGET_S = 0.2
CHANGES = [2, 3, 2, 1, 2, 3, 1]  # replicas, change after change, from 1: every one changes the membership
SCALE_UP_TO = 30
SCALE_TARGET_S = 5

Disturbance = Callable[[docker.DockerClient, Mlserve, dict[str, Any], Path], str]


# -- clients -----------------------------------------------------------------------------------


class Wrk:
    """`wrk -t2 -c8 -dNs` in the background: keep-alive connections, and no request is ever retried."""

    def __init__(self, url: str, seconds: int = WRK_SECONDS) -> None:
        self.url, self.seconds = url, seconds
        self.process: subprocess.Popen[str] | None = None
        self.output = ""

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{self.seconds}s", self.url],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        try:
            self.output, _ = self.process.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """Requests wrk completed, its "Non-2xx or 3xx responses" and its "Socket errors" by kind."""
        total = re.search(r"(\d+) requests in", self.output)
        if total is None:
            raise BenchError(f"wrk against {self.url} printed no request count:\n{self.output}")
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", self.output)
        sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", self.output)
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups()), strict=True)) \
            if sockets else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
        return int(total.group(1)), int(non_2xx.group(1)) if non_2xx else 0, errors


class GatewayLogs:
    """What the gateway wrote to its error.log and access.log since this was made."""

    def __init__(self, ms: Mlserve) -> None:
        self.dir = ms.home / "gateway"
        self.offsets = {name: self._size(name) for name in ("error.log", "access.log")}

    def _size(self, name: str) -> int:
        try:
            return (self.dir / name).stat().st_size
        except OSError:
            return 0

    def new_lines(self, name: str) -> list[str]:
        try:
            with open(self.dir / name, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(self.offsets[name] if size >= self.offsets[name] else 0)  # a capped log starts over
                return handle.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def errors(self) -> Counter[str]:
        """New error.log lines by kind (without time, process, connection, client and socket ids), the
        commonest printed; the sandbox deletes the file afterwards."""
        kinds = Counter(_error_kind(line) for line in self.new_lines("error.log"))
        for kind, n in kinds.most_common(5):
            print(f"   gateway error.log, {n}x: {kind[:300]}", flush=True)
        return kinds

    def statuses(self) -> Counter[str]:
        """The statuses of the access.log lines written since (nginx flushes that log every 2 s)."""
        time.sleep(2.5)
        found = (re.search(r'" (\d{3}) ', line) for line in self.new_lines("access.log"))
        return Counter(match.group(1) for match in found if match)


def _error_kind(line: str) -> str:
    """An error.log line without its time, process, connection, job, home and request details."""
    line = re.sub(r"^\S+ \S+ (\[\w+\]) \d+#\d+: (\*\d+ )?", r"\1 ", line)
    line = re.sub(r"/run/[A-Za-z0-9]+/", "/run/{job}/", line)
    line = re.sub(r"/tmp/mls\w+/", "{home}/", line)
    return line.split(", client: ")[0]  # the rest: client, server, request, upstream, host


def _log_note(logs: GatewayLogs, failed: bool) -> str:
    """The statuses the gateway answered with, and the commonest kinds of its new error.log lines."""
    statuses = logs.statuses()
    others = {status: n for status, n in statuses.items() if status != "200"}
    text = f"access.log: {sum(statuses.values())} answers" + (
        ", " + ", ".join(f"{n}x {status}" for status, n in sorted(others.items())) if others else ", all 200")
    return text + _error_note(logs.errors(), 3 if failed else 2)


def _error_note(kinds: Counter[str], shown: int) -> str:
    if not kinds:
        return "; error.log: no new lines"
    return (f"; error.log: {sum(kinds.values())} new lines, "
            + "; ".join(f"{n}x {kind[:160]}" for kind, n in kinds.most_common(shown)))


# -- deploying ---------------------------------------------------------------------------------


def _copy(app: Path, work: Path) -> Path:
    """The app in a folder of its own name under ``work`` (the folder names the project)."""
    target = work / app.name
    if not target.exists():
        shutil.copytree(app, target)
    return target


def _project(out: dict[str, Any]) -> str:
    return out["job"].rsplit("/", 1)[0]


# -- 1. no failed request through routing changes ----------------------------------------------


def kill_9_one_of_three(client: docker.DockerClient, ms: Mlserve, out: dict[str, Any], app: Path) -> str:
    """`docker kill` (SIGKILL) of the first job's container; until it is healthy again, and 2 s more."""
    time.sleep(2)
    container = job_container(client, ms.home, out["id"])
    if container is None:
        raise BenchError(f"no container labelled with job {out['id']}")
    container.kill(signal="SIGKILL")
    back = seconds_until(lambda: (j := ms.jobs()[out["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
    time.sleep(2)
    return "killed job healthy again after " + (f"{back:.1f} s" if back is not None else "NOT within 60 s")


def scale_3_5_3(client: docker.DockerClient, ms: Mlserve, out: dict[str, Any], app: Path) -> str:
    """`scale 5`, then `scale 3` (which stops the oldest, 1 and 2), 2 s apart."""
    time.sleep(2)
    up, _ = ms.timed("scale", "5", cwd=app)
    time.sleep(2)
    down, _ = ms.timed("scale", "3", cwd=app)
    time.sleep(2)
    table = ms.routes()
    pool = {table["jobs"][i]["name"].rsplit("/", 1)[1] for i in project_pools(table)}
    return f"scale 3 -> 5 took {up:.1f} s, 5 -> 3 {down:.1f} s; jobs {', '.join(sorted(pool))} routed after"


def under_wrk(client: docker.DockerClient, work: Path, label: str, disturb: Disturbance) -> Result:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 3)
        logs = GatewayLogs(ms)
        with Wrk(out["project_endpoint"]) as wrk:
            started = time.monotonic()
            what = disturb(client, ms, out, app)
            took = time.monotonic() - started
            covered = wrk.running()
        total, non_2xx, sockets = wrk.counts()
        failed = non_2xx + sum(sockets.values())
        ok = failed == 0 and covered
        note = (f"{total} requests in {WRK_SECONDS} s; non-2xx or 3xx: {non_2xx}; socket errors: "
                + ", ".join(f"{kind} {n}" for kind, n in sockets.items()) + f"; {what}"
                + ("" if covered else f"; the change took {took:.1f} s, LONGER than wrk ran")
                + "; " + _log_note(logs, not ok))
    print(f"   {label}, wrk: {note}", flush=True)
    return Result(f"{label}, wrk -t2 -c{WRK_CONNECTIONS} keep-alive, no retries: failed requests", failed,
                  "requests", "0", ok, note)


def under_session(client: docker.DockerClient, work: Path, label: str, disturb: Disturbance) -> Result:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 3)
        logs = GatewayLogs(ms)
        with Load(out["project_endpoint"], threads=SESSION_THREADS, limit=LOAD_LIMIT_S, retries=False) as load:
            what = disturb(client, ms, out, app)
        ok = not load.failures
        note = f"{load.describe()}; {what}; {_log_note(logs, not ok)}"
    print(f"   {label}, requests.Session: {note}", flush=True)
    return Result(f"{label}, requests.Session x{SESSION_THREADS} threads, max_retries=0: failed requests",
                  len(load.failures), "requests", "0", ok, note)


# -- 2. a routing change is live when the command returns --------------------------------------


def _fresh_get(host: str, port: int, path: str) -> str:
    """The job that answered a GET on a new connection, or what went wrong."""
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            return f"HTTP {answer.status} {body[:80].decode(errors='replace').strip()}"
        return str(json.loads(body)["job"])
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def _live_after(url: str, expected: set[str], returned: float) -> tuple[float | None, list[float], Counter[str]]:
    """Seconds from ``returned`` until a batch of fresh connections all answer from ``expected`` and
    between them name every job in it: 0 when the first batch does. Also the seconds each batch took,
    and the answers of the batches that did not pass."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    wrong: Counter[str] = Counter()
    batches: list[float] = []
    with ThreadPoolExecutor(max_workers=FRESH_THREADS) as pool:
        while time.monotonic() - returned < LIVE_WAIT_S:
            began = time.monotonic() - returned
            names = list(pool.map(lambda _: _fresh_get(host, port, parts.path), range(FRESH_CONNECTIONS)))
            batches.append(time.monotonic() - returned - began)
            if set(names) == expected:
                return (0.0 if len(batches) == 1 else began), batches, wrong
            wrong.update(name for name in names if name not in expected)
            wrong.update(f"(missing {name})" for name in expected - set(names))
    return None, batches, wrong


def change_is_live(client: docker.DockerClient, work: Path) -> list[Result]:
    app = _copy(NAMING_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 1)
        project = _project(out)
        logs = GatewayLogs(ms)
        samples: list[float | None] = []
        notes: list[str] = []
        first_batches: list[float] = []
        current = 1
        for replicas in CHANGES:
            result = ms("scale", str(replicas), cwd=app)
            returned = time.monotonic()
            table = ms.routes()
            expected = {table["jobs"][i]["name"] for i in project_ready(table, project)}
            listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
            live, batches, wrong = _live_after(out["project_endpoint"], expected, returned)
            samples.append(live)
            numbers = ",".join(sorted(name.rsplit("/", 1)[1] for name in expected))
            text = f"{current}->{replicas} {{{numbers}}}: " + ("not live" if live is None else f"{live:.2f}")
            if listed != expected:
                text += f" (scale listed {sorted(listed)})"
            if wrong:
                text += f" (before: {dict(wrong.most_common(3))})"
            notes.append(text)
            print(f"   live after change {text}; batches took {', '.join(f'{b:.2f}' for b in batches)} s", flush=True)
            first_batches.append(batches[0])
            current = replicas
        errors = _error_note(logs.errors(), 2)
    measured = [s for s in samples if s is not None]
    median = statistics.median(measured) if len(measured) == len(samples) else None
    ok = median is not None and median <= LIVE_TARGET_S
    note = (f"{FRESH_CONNECTIONS} fresh connections a batch ({FRESH_THREADS} threads; a batch took "
            f"{statistics.median(first_batches):.2f} s), the first begun when `scale` returned; per change: "
            + "; ".join(notes) + (f"; max {max(measured):.2f} s" if measured else "")
            + errors)
    return [Result(f"routing change live for fresh connections after `scale` returns (median of {len(CHANGES)})",
                   median, "s", f"<= {LIVE_TARGET_S}", ok, note)]


# -- 3. parallel scaling -----------------------------------------------------------------------


class _CpuBusy:
    """The share of all cores' time that was not idle since this was made (/proc/stat)."""

    def __init__(self) -> None:
        self.start = self._times()

    @staticmethod
    def _times() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(n) for n in stat.readline().split()[1:]]

    def busy(self) -> float:
        spent = [b - a for a, b in zip(self.start, self._times(), strict=True)]
        return 1 - (spent[3] + spent[4]) / max(1, sum(spent))  # idle and iowait


def parallel_scaling(client: docker.DockerClient, work: Path) -> list[Result]:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 1)
        project = _project(out)
        cpu = _CpuBusy()
        up, result = ms.timed("scale", str(SCALE_UP_TO), cwd=app)
        up_cpu = cpu.busy()
        notice = next((line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Notice:")), "")
        jobs = ms.jobs()
        routed = len(project_ready(ms.routes(), project))
        answering = sum(requests.get(j["endpoint"], timeout=10).status_code == 200 for j in jobs.values())
        up_ok = up < SCALE_TARGET_S and len(jobs) == routed == answering == SCALE_UP_TO
        up_note = (f"before issue 8: 8.2 s; CPU {up_cpu:.0%} busy meanwhile (all cores); {len(jobs)} jobs, "
                   f"{routed} routed, {answering} answer 200; "
                   + (f"scale printed \"{notice[:110]}...\"" if notice else "scale printed NO Notice"))
        cpu = _CpuBusy()
        down, _ = ms.timed("scale", "1", cwd=app)
        down_cpu = cpu.busy()
        left = ms.jobs()
        running = labelled_containers(client, ms.home, stopped=False)
        routed = len(project_ready(ms.routes(), project))
        down_ok = down < SCALE_TARGET_S and len(left) == routed == len(running) == 1
        down_note = (f"before issue 8: 35 s; draining included; CPU {down_cpu:.0%} busy meanwhile; "
                     f"{len(left)} job left, {routed} routed, "
                     f"{len(running)} container running")
    print(f"   scale 1 -> {SCALE_UP_TO}: {up:.1f} s ({up_note}); scale {SCALE_UP_TO} -> 1: {down:.1f} s ({down_note})",
          flush=True)
    return [
        Result(f"scale 1 -> {SCALE_UP_TO} (hello, 2 workers each): wall time of the command", up, "s",
               f"< {SCALE_TARGET_S}", up_ok, up_note),
        Result(f"scale {SCALE_UP_TO} -> 1: wall time of the command", down, "s", f"< {SCALE_TARGET_S}", down_ok,
               down_note),
    ]


# -- the section -------------------------------------------------------------------------------


def routing(client: docker.DockerClient, work: Path) -> list[Result]:
    """The routing section: every benchmark runs, whether one before it failed or not."""
    work = work / "routing"
    work.mkdir(parents=True, exist_ok=True)
    with sandbox() as warm:  # builds both images once (flask comes from PyPI)
        warm("run", "--mode", "serve", cwd=_copy(NAMING_APP, work), timeout=900)
        warm("run", "--mode", "serve", cwd=_copy(HELLO_APP, work), timeout=900)
    scenarios: list[tuple[str, Callable[[], list[Result]]]] = []
    for label, disturb in (("kill -9 of 1 of 3 jobs' containers", kill_9_one_of_three),
                           ("scale 3 -> 5 -> 3", scale_3_5_3)):
        for runner in (under_wrk, under_session):
            scenarios.append((f"{label} ({runner.__name__})",
                              lambda r=runner, lb=label, d=disturb: [r(client, work, lb, d)]))
    scenarios.append(("change_is_live", lambda: change_is_live(client, work)))
    scenarios.append(("parallel_scaling", lambda: parallel_scaling(client, work)))
    return run_scenarios(scenarios)
