"""Versions and traffic: no failed request through `run --replace`, a canary then `traffic --to-latest`,
and the death of every primary job beside a fallback version, for two clients that never retry (wrk on
keep-alive connections, and a requests.Session with max_retries=0), each measured alone; how soon the
fallback answers once the last primary died; the share a `--canary 10` version takes; and how soon a
`traffic --to` change is live on every gateway worker after the command returns.

Every answer through the project endpoint names its version (X-Mlserve-Version): that is what the
clients count. Every scenario runs on a fresh mlserve (bench/sandbox.py) serving bench/apps/hello;
loads go to loopback only and are bounded in time (wrk is stopped with SIGINT once the scenario is
over, as Ctrl-C does, and prints its counts then)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import docker
from faults import deploy
from results import BenchError, Result, run_scenarios
from routing import WRK_CONNECTIONS, GatewayLogs, Wrk, _copy, _log_note
from sandbox import sandbox

from tests.harness import (
    REPO,
    VERSION_HEADER,
    Mlserve,
    VersionLoad,
    answered_versions,
    gateway_workers,
    job_container,
    seconds_until,
)

HELLO_APP = REPO / "bench" / "apps" / "hello"
WRK_LIMIT_S = int(os.environ.get("BENCH_VERSIONS_WRK_SECONDS", "60"))  # wrk's -d; stopped when the scenario ends
SESSION_THREADS = 4
LOAD_LIMIT_S = 90  # no load runs longer than this, whatever happens
SETTLE_S = 2  # load before and after each change
CANARY_PERCENT = 10
CANARY_REQUESTS = 5000
CANARY_TOLERANCE = 2  # percentage points
KILL_GAP_S = 0.5  # between the docker kill of the first primary and of the last
BACK_WAIT_S = 60  # the killed primaries must be healthy again within this
TAKEOVER_TARGET_S = 2.0
LIVE_CHANGES = 6  # traffic --to-latest and --to OLD=100, in turn
LIVE_TARGET_S = 0.2
LIVE_WAIT_S = 10  # a change not live after this is an error
HELD_MAX = 64  # keep-alive connections opened at most to reach every gateway worker
FRESH_CONNECTIONS = 50
FRESH_THREADS = 10
REQUEST_TIMEOUT_S = 30

# Counts the X-Mlserve-Version of every answer, per wrk thread, and prints the sums when wrk ends.
WRK_SCRIPT = f"""
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) versions = {{}} end
function response(status, headers, body)
  local v = headers["{VERSION_HEADER}"] or "none"
  versions[v] = (versions[v] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for v, n in pairs(t:get("versions")) do io.write(string.format("answered by version %s: %d\\n", v, n)) end
  end
end
"""


# -- clients -----------------------------------------------------------------------------------


class VersionWrk(Wrk):
    """`wrk -t2 -c8` with a script that counts the version of every answer; stopped when the block ends
    (SIGINT: wrk prints what it counted so far), ``limit`` seconds at most."""

    def __init__(self, url: str, script: Path, limit: int = WRK_LIMIT_S) -> None:
        super().__init__(url, limit)
        self.script = script
        self.began = self.elapsed = 0.0

    def __enter__(self) -> Self:
        self.script.write_text(WRK_SCRIPT)
        self.process = subprocess.Popen(
            ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{self.seconds}s", "-s", str(self.script), self.url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.began = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.elapsed = time.monotonic() - self.began
        super().__exit__(*exc)

    def versions(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for version, n in re.findall(r"answered by version (\S+): (\d+)", self.output):
            found[version] += int(n)
        return found


def _versions_text(counts: Counter[str]) -> str:
    return ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) or "nothing"


def _fresh_version(host: str, port: int, path: str) -> str:
    """The version that answered a GET on a new connection, or what went wrong."""
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        return _version_of(connection.getresponse())
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def _version_of(answer: http.client.HTTPResponse) -> str:
    answer.read()
    if answer.status != 200:
        return f"HTTP {answer.status}"
    return answer.getheader(VERSION_HEADER) or "no version header"


def _owners(port: int) -> dict[int, int]:
    """Client port -> pid of the gateway process that accepted that connection to ``port`` (ss -tnp)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=False).stdout
    owners = {}
    for line in out.splitlines():
        match = re.search(rf":{port}\s+\S+:(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)", line)
        if match:
            owners[int(match.group(1))] = int(match.group(2))
    return owners


class HeldConnections:
    """Keep-alive connections to the gateway, opened 8 at a time until every nginx worker has accepted
    at least one (who accepted which, from `ss -tnp`): a request on each reaches every worker."""

    def __init__(self, ms: Mlserve, path: str) -> None:
        self.port, self.path = ms.port, path
        self.workers = set(gateway_workers(ms.home))
        self.connections: list[http.client.HTTPConnection] = []
        self.covered: set[int] = set()
        self.pool = ThreadPoolExecutor(max_workers=8)

    def open(self) -> Self:
        while len(self.connections) < HELD_MAX and not self.workers <= self.covered:
            batch = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S) for _ in range(8)]
            list(self.pool.map(self._get, batch))  # answered: accepted by some worker
            self.connections += batch
            owners = _owners(self.port)
            self.covered = {owners[c.sock.getsockname()[1]] for c in self.connections
                            if c.sock is not None and c.sock.getsockname()[1] in owners}
        return self

    def _get(self, connection: http.client.HTTPConnection) -> str:
        try:
            connection.request("GET", self.path)
            return _version_of(connection.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            connection.close()  # the next request opens a new connection (to any worker)
            return f"held connection: {type(exc).__name__}: {exc}"

    def versions(self) -> list[str]:
        """One GET on each held connection, 8 at a time."""
        return list(self.pool.map(self._get, self.connections))

    def describe(self) -> str:
        text = f"{len(self.connections)} keep-alive connections held on {len(self.covered)} of {len(self.workers)} " \
               "gateway workers"
        return text + ("" if self.workers <= self.covered else " (NOT every worker reached)")

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.pool.shutdown()


# -- deploying ---------------------------------------------------------------------------------


def _run(ms: Mlserve, app: Path, *flags: str) -> tuple[float, dict[str, Any]]:
    """`run --mode serve FLAGS --json`: its seconds and its JSON."""
    took, result = ms.timed("run", "--mode", "serve", *flags, "--json", cwd=app, timeout=900)
    return took, json.loads(result.stdout)


def _all_healthy(ms: Mlserve, count: int) -> None:
    if seconds_until(lambda: (jobs := ms.jobs()) and len(jobs) == count
                     and all(j["healthy"] for j in jobs.values()), timeout=60) is None:
        raise BenchError(f"{count} healthy jobs expected, status says: {ms.jobs()}")


def _serving_now(url: str, n: int = 200) -> str:
    counts, failures = answered_versions(url, n)
    return f"{n} GETs after: version {_versions_text(counts)}" + (f", {len(failures)} failed" if failures else "")


# -- 1. no failed request through version changes ----------------------------------------------


@dataclass
class Change:
    """A scenario: what is deployed before the load (returns what the change needs), and the change
    made under the load (returns a note). ``after`` may add rows from the session client's timeline."""

    label: str
    setup: Callable[[Mlserve, Path], dict[str, Any]]
    change: Callable[[docker.DockerClient, Mlserve, dict[str, Any], Path], str]
    after: Callable[[dict[str, Any], VersionLoad], list[Result]] | None = None


def two_jobs(ms: Mlserve, app: Path) -> dict[str, Any]:
    return deploy(ms, app, 2)


def replace(client: docker.DockerClient, ms: Mlserve, ctx: dict[str, Any], app: Path) -> str:
    time.sleep(SETTLE_S)
    took, out = _run(ms, app, "--replace")
    time.sleep(SETTLE_S)
    return (f"run --replace took {took:.1f} s: version {out['version']} with {len(out['jobs'])} jobs, replaced "
            f"{', '.join(name.rsplit('/', 1)[1] for name in out['replaced']) or 'NOTHING'}; "
            + _serving_now(ctx["project_endpoint"]))


def canary_then_latest(client: docker.DockerClient, ms: Mlserve, ctx: dict[str, Any], app: Path) -> str:
    time.sleep(SETTLE_S)
    took, out = _run(ms, app, "--canary", str(CANARY_PERCENT))
    time.sleep(SETTLE_S)
    latest, _ = ms.timed("traffic", "--to-latest", cwd=app)
    time.sleep(SETTLE_S)
    return (f"run --canary {CANARY_PERCENT} took {took:.1f} s (version {out['version']}), traffic --to-latest "
            f"{latest:.2f} s; " + _serving_now(ctx["project_endpoint"]))


def two_jobs_and_fallback(ms: Mlserve, app: Path) -> dict[str, Any]:
    out = deploy(ms, app, 2)
    _, fallback = _run(ms, app, "--fallback")
    _all_healthy(ms, 3)
    out["fallback_version"] = str(fallback["version"])
    out["primaries"] = [j for j in ms.jobs().values() if not j["fallback"]]
    return out


class TableWatch:
    """Polls routes.json in the background: when the project's table first had no primary pool (the
    supervisor took the dead primaries out), and when every primary was in its pools again."""

    def __init__(self, ms: Mlserve, project: str, primaries: set[str]) -> None:
        self.ms, self.project, self.primaries = ms, project, primaries
        self.fallback_only: float | None = None
        self.back: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                entry = self.ms.routes()["projects"][self.project]
            except (OSError, ValueError, KeyError):
                entry = None
            if entry is not None:
                ready = {i for pool in entry["pools"] for i in pool["ready"]}
                now = time.monotonic()
                if self.fallback_only is None and not entry["pools"] and entry["fallback"]:
                    self.fallback_only = now
                if self.back is None and self.primaries <= ready and self.fallback_only is not None:
                    self.back = now
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def kill_both_primaries(client: docker.DockerClient, ms: Mlserve, ctx: dict[str, Any], app: Path) -> str:
    """docker kill (SIGKILL) of one primary, then of the other KILL_GAP_S later; until both are healthy
    again (the supervisor restarts them), and SETTLE_S more."""
    primaries = ctx["primaries"]
    containers = [job_container(client, ms.home, j["id"]) for j in primaries]
    if None in containers:
        raise BenchError(f"no container for every primary job: {[j['id'] for j in primaries]}")
    project = ctx["job"].rsplit("/", 1)[0]
    with TableWatch(ms, project, {j["id"] for j in primaries}) as table:
        time.sleep(SETTLE_S)
        containers[0].kill(signal="SIGKILL")
        time.sleep(KILL_GAP_S)
        began, wall = time.monotonic(), time.time()
        containers[1].kill(signal="SIGKILL")
        ctx["last_kill"] = time.monotonic()  # the engine has sent the signal when its call returns...
        ctx["kill_call"] = ctx["last_kill"] - began
        back = seconds_until(lambda: all((j := ms.jobs()[p["job"]])["healthy"] and j["restarts"] >= 1
                                         for p in primaries), timeout=BACK_WAIT_S)
        ctx["back"] = time.monotonic() if back is not None else None
        time.sleep(SETTLE_S)
    signalled = _kill_event(client, containers[1].id, wall)
    if signalled is not None:  # ...but its call may be slow on a busy engine: its kill event says when
        ctx["last_kill"] = signalled
    ctx["kill_reference"] = "the engine's kill event" if signalled is not None else "the return of the kill call"
    kill = ctx["last_kill"]
    text = (f"primaries {', '.join(p['job'].rsplit('/', 1)[1] for p in primaries)} killed {KILL_GAP_S} s apart; "
            + (f"both healthy again {back:.1f} s after the last kill" if back is not None
               else f"NOT both healthy again within {BACK_WAIT_S} s"))
    if table.fallback_only is not None:
        text += f"; routes.json had the fallback alone from {table.fallback_only - kill:.1f} s"
        text += f" to {table.back - kill:.1f} s" if table.back is not None else " on"
    else:
        text += "; routes.json never had the fallback alone"
    return text


def _kill_event(client: docker.DockerClient, container_id: str, since: float) -> float | None:
    """When the engine killed the container (its `kill` event, on time.monotonic()'s clock), or None.
    Asked afterwards, with an `until` in the past, so the call returns at once."""
    until = int(time.time())
    if until <= since:
        return None
    try:
        for event in client.events(since=int(since) - 1, until=until, decode=True,
                                   filters={"container": container_id, "event": "kill"}):
            if event.get("timeNano", 0) / 1e9 >= since - 0.01:
                return event["timeNano"] / 1e9 - (time.time() - time.monotonic())
    except docker.errors.DockerException:
        return None
    return None


def fallback_takeover(ctx: dict[str, Any], load: VersionLoad) -> list[Result]:
    """From the session client's timeline: the first answer by the fallback after the docker kill of the
    last primary (the engine's kill event, else the return of its call), and what was answered and what
    failed from then until both primaries were healthy again."""
    kill, fallback = ctx["last_kill"], ctx["fallback_version"]
    back = ctx.get("back") or float("inf")
    before = sum(1 for _, ended, version, _ in load.timeline if ended < kill and version == fallback)
    after = [(began, ended, version, failure) for began, ended, version, failure in load.timeline if ended >= kill]
    first = next((ended for _, ended, version, _ in after if version == fallback), None)
    takeover = None if first is None else max(0.0, first - kill)
    between = [(b, v, f) for b, e, v, f in after if b <= back]
    by_fallback = sum(v == fallback for _, v, _ in between)
    failed = [f for _, _, f in between if f]
    # Begun 0.1 s or more after the kill: answered by a primary the supervisor restarted meanwhile.
    by_restarted = sum(1 for b, _, v, _ in after if v not in (None, fallback) and kill + 0.1 <= b <= back)
    until = max((e for _, e, v, _ in after if v == fallback), default=kill) - kill
    back_text = "NOT back" if back == float("inf") else f"{back - kill:.1f} s"
    note = "no answer by the fallback" if takeover is None else f"first answer by the fallback {takeover * 1000:.1f} ms"
    note += (f" after the kill ({ctx['kill_reference']}; the call took {ctx['kill_call'] * 1000:.0f} ms); "
             f"{SESSION_THREADS} threads, keep-alive, max_retries=0; from the kill until both primaries were back "
             f"({back_text}): {len(between)} requests, {by_fallback} answered by the fallback (version {fallback}, "
             f"its last {until:.2f} s after the kill), {by_restarted} by a restarted primary, {len(failed)} failed"
             + (f" ({Counter(x[:60] for x in failed).most_common(2)})" if failed else "")
             + f"; {before} answered by the fallback before the last kill")
    print(f"   fallback takeover: {note}", flush=True)
    return [Result("fallback takeover: seconds from the docker kill of the last primary to the first answer by the "
                   "fallback (requests.Session)", takeover, "s", f"<= {TAKEOVER_TARGET_S:g}",
                   takeover is not None and takeover <= TAKEOVER_TARGET_S, note)]


CHANGES = [
    Change("run --replace of a 2-job project", two_jobs, replace),
    Change(f"run --canary {CANARY_PERCENT}, then traffic --to-latest (2-job project)", two_jobs, canary_then_latest),
    Change("both primaries killed (docker kill), a fallback version present", two_jobs_and_fallback,
           kill_both_primaries, fallback_takeover),
]


def under_wrk(client: docker.DockerClient, work: Path, change: Change) -> list[Result]:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        ctx = change.setup(ms, app)
        logs = GatewayLogs(ms)
        with VersionWrk(ctx["project_endpoint"], work / "versions.lua") as wrk:
            what = change.change(client, ms, ctx, app)
            covered = wrk.running()
        total, non_2xx, sockets = wrk.counts()
        failed = non_2xx + sum(sockets.values())
        ok = failed == 0 and covered
        note = (f"{total} requests in {wrk.elapsed:.1f} s, answered by version {_versions_text(wrk.versions())}; "
                f"non-2xx or 3xx: {non_2xx}; socket errors: " + ", ".join(f"{k} {n}" for k, n in sockets.items())
                + f"; {what}" + ("" if covered else f"; the scenario outlasted wrk's {WRK_LIMIT_S} s")
                + "; " + _log_note(logs, not ok))
        if re.search(r"\b\d+x 499\b", note):
            note += " (499: requests in flight when wrk was stopped, which closed their connections)"
    print(f"   {change.label}, wrk: {note}", flush=True)
    return [Result(f"{change.label}, wrk -t2 -c{WRK_CONNECTIONS} keep-alive, no retries: failed requests", failed,
                   "requests", "0", ok, note)]


def under_session(client: docker.DockerClient, work: Path, change: Change) -> list[Result]:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        ctx = change.setup(ms, app)
        logs = GatewayLogs(ms)
        with VersionLoad(ctx["project_endpoint"], threads=SESSION_THREADS, limit=LOAD_LIMIT_S,
                         retries=False) as load:
            what = change.change(client, ms, ctx, app)
        ok = not load.failures
        note = f"{load.describe()}; {what}; {_log_note(logs, not ok)}"
    print(f"   {change.label}, requests.Session: {note}", flush=True)
    rows = [Result(f"{change.label}, requests.Session x{SESSION_THREADS} threads, max_retries=0: failed requests",
                   len(load.failures), "requests", "0", ok, note)]
    return rows + (change.after(ctx, load) if change.after else [])


# -- 2. the share of a canary ------------------------------------------------------------------


def canary_share(client: docker.DockerClient, work: Path) -> list[Result]:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 2)
        _, canary = _run(ms, app, "--canary", str(CANARY_PERCENT))
        new = str(canary["version"])
        started = time.monotonic()
        counts, failures = answered_versions(out["project_endpoint"], CANARY_REQUESTS, threads=SESSION_THREADS)
        took = time.monotonic() - started
        fresh_counts = Counter(_fresh_version("127.0.0.1", ms.port, urlsplit(out["project_endpoint"]).path)
                               for _ in range(200))
    share = 100 * counts[new] / CANARY_REQUESTS
    ok = abs(share - CANARY_PERCENT) <= CANARY_TOLERANCE and not failures
    note = (f"version 1 has 2 jobs, the canary (version {new}) 1: the share is by version, not by job; "
            f"{CANARY_REQUESTS} GETs from {SESSION_THREADS} keep-alive sessions in {took:.1f} s answered by version "
            f"{_versions_text(counts)}; {len(failures)} failed"
            + (f" ({Counter(f[:60] for f in failures).most_common(2)})" if failures else "")
            + f"; 200 GETs on fresh connections: version {_versions_text(fresh_counts)}")
    print(f"   canary share {share:.2f} %: {note}", flush=True)
    return [Result(f"run --canary {CANARY_PERCENT}: share of {CANARY_REQUESTS} requests answered by the new version",
                   share, "%", f"{CANARY_PERCENT} ± {CANARY_TOLERANCE}", ok, note)]


# -- 3. a traffic change is live on every worker when the command returns ----------------------


def _live_after(held: HeldConnections, path: str, port: int, expected: str,
                returned: float) -> tuple[float | None, list[float], Counter[str]]:
    """Seconds from ``returned`` until a round (one GET on every held connection, and a batch on fresh
    connections) is answered by ``expected`` alone: 0 when the first round is. Also the seconds each
    round took, and the wrong answers of the rounds that did not pass."""
    wrong: Counter[str] = Counter()
    rounds: list[float] = []
    with ThreadPoolExecutor(max_workers=FRESH_THREADS) as pool:
        while time.monotonic() - returned < LIVE_WAIT_S:
            began = time.monotonic() - returned
            fresh = pool.map(lambda _: _fresh_version("127.0.0.1", port, path), range(FRESH_CONNECTIONS))
            answers = held.versions() + list(fresh)
            rounds.append(time.monotonic() - returned - began)
            if all(answer == expected for answer in answers):
                return (0.0 if len(rounds) == 1 else began), rounds, wrong
            wrong.update(answer for answer in answers if answer != expected)
    return None, rounds, wrong


def traffic_change_is_live(client: docker.DockerClient, work: Path) -> list[Result]:
    app = _copy(HELLO_APP, work)
    with sandbox() as ms:
        out = deploy(ms, app, 1)
        _, canary = _run(ms, app, "--canary", str(CANARY_PERCENT))
        old, new = "1", str(canary["version"])
        path = urlsplit(out["project_endpoint"]).path
        logs = GatewayLogs(ms)
        held = HeldConnections(ms, path).open()
        samples: list[float | None] = []
        notes: list[str] = []
        first_rounds: list[float] = []
        commands: list[float] = []
        try:
            for n in range(LIVE_CHANGES):
                args, expected = (("--to-latest",), new) if n % 2 == 0 else (("--to", f"{old}=100"), old)
                took, _ = ms.timed("traffic", *args, cwd=app)
                returned = time.monotonic()
                live, rounds, wrong = _live_after(held, path, ms.port, expected, returned)
                samples.append(live)
                commands.append(took)
                first_rounds.append(rounds[0])
                text = f"{' '.join(args)}: " + ("not live" if live is None else f"{live:.2f}")
                if wrong:
                    text += f" (before: {dict(wrong.most_common(3))})"
                notes.append(text)
                print(f"   traffic {text}; command {took:.2f} s; rounds took "
                      f"{', '.join(f'{r:.3f}' for r in rounds)} s", flush=True)
        finally:
            held.close()
        described = held.describe()
        errors = logs.errors()
    measured = [s for s in samples if s is not None]
    worst = max(measured) if measured else None
    ok = len(measured) == len(samples) and worst is not None and worst <= LIVE_TARGET_S \
        and held.workers <= held.covered
    note = (f"{described}, plus {FRESH_CONNECTIONS} fresh connections a round ({FRESH_THREADS} threads; a round took "
            f"{statistics.median(first_rounds):.3f} s), the first round begun when `traffic` returned "
            f"(it took {statistics.median(commands):.2f} s, median); per change: " + "; ".join(notes)
            + (f"; median {statistics.median(measured):.2f} s" if measured else "")
            + ("; error.log: no new lines" if not errors else f"; error.log: {sum(errors.values())} new lines"))
    return [Result(f"traffic --to: live on every gateway worker after the command returns (max of {LIVE_CHANGES})",
                   worst, "s", f"<= {LIVE_TARGET_S}", ok, note)]


# -- the section -------------------------------------------------------------------------------


def versions(client: docker.DockerClient, work: Path) -> list[Result]:
    """The versions section: every benchmark runs, whether one before it failed or not."""
    work = work / "versions"
    work.mkdir(parents=True, exist_ok=True)
    with sandbox() as warm:  # builds the image once
        warm("run", "--mode", "serve", cwd=_copy(HELLO_APP, work), timeout=900)
    scenarios: list[tuple[str, Callable[[], list[Result]]]] = []
    for change in CHANGES:
        for runner in (under_wrk, under_session):
            scenarios.append((f"{change.label} ({runner.__name__})", lambda r=runner, c=change: r(client, work, c)))
    scenarios.append(("canary_share", lambda: canary_share(client, work)))
    scenarios.append(("traffic_change_is_live", lambda: traffic_change_is_live(client, work)))
    return run_scenarios(scenarios)
