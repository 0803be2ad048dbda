"""A public guarded edge (issue 9): what TLS and a token check on every request cost the gateway, and how
soon a token revocation or a new rate limit is enforced while other clients of the gateway lose nothing.

Every scenario runs on a fresh mlserve (bench/sandbox.py) serving bench/apps/hello; loads go to
loopback only and are bounded in time."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import docker
import requests
from results import BenchError, Result, run_scenarios
from routing import _CpuBusy
from sandbox import sandbox
from speed import WRK_CONNECTIONS, WRK_ROUNDS, WRK_SECONDS, container_pids

from tests.harness import REPO, Load, Mlserve, gateway_workers, seconds_until

EDGE = "A public guarded edge (issue 9)"
HELLO_APP = REPO / "bench" / "apps" / "hello"
PROJECT_PATH = "/serve/bench/projects/{project}"
EFFICIENCY_TARGET = 0.80
ENFORCED_TARGET_S = 1.0
SESSION_THREADS = 4  # the other clients' keep-alive sessions (token B)
LOAD_LIMIT_S = 90  # no client runs longer than this, whatever happens
REQUEST_TIMEOUT_S = 30
SETTLE_S = 2  # load before each change, and after its effect was seen
REVOCATIONS = 3
REVOKE_SETTLE_S = 1  # a revoked token's client: its load before the revoke, and after the first 401
SEEN_WAIT_S = 10  # a change whose effect no client saw by then counts as not enforced
WATCH_INTERVAL_S = 0.01
PROJECT_RATE = "20/s"  # the new project limit: far below what one client sends
PROJECT_BURST = 20
TOKEN_RATE = "10/s"  # a new token's own limit
TOKEN_BURST = 10


# -- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    rps: float
    requests: int
    sockets: str  # wrk's "Socket errors" line, if any
    cpu_us: dict[str, float]  # CPU time per request, in microseconds, by process kind


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (/proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(url: str, token: str, pids: dict[str, list[int]]) -> WrkRun:
    """speed.wrk's load (-t2 -cN -dS, keep-alive) with the token in every request, and the CPU time that
    wrk and each kind of process in ``pids`` spent per request. Raises BenchError when any answer is
    not 2xx/3xx (a refused token)."""
    before = {kind: _cpu_s(group) for kind, group in pids.items()}
    wrk_before = _children_cpu_s()
    out = subprocess.run(["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s",
                          "-H", f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, timeout=WRK_SECONDS + 30, check=False).stdout
    spent = {kind: _cpu_s(group) - before[kind] for kind, group in pids.items()}
    spent["wrk"] = _children_cpu_s() - wrk_before
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total or int(total.group(1)) == 0 or re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise BenchError(f"wrk against {url} failed:\n{out}")
    sockets = re.search(r"Socket errors: (.*)", out)
    requests_done = int(total.group(1))
    return WrkRun(float(rps.group(1)), requests_done, sockets.group(1) if sockets else "",
                  {kind: seconds * 1e6 / requests_done for kind, seconds in spent.items()})


class Client(Load):
    """Threads of a keep-alive requests.Session that send a bearer token and never retry, until stopped
    (or ``limit`` seconds). Every request is kept as (began, ended, outcome): the status code, or the
    exception's name; times are time.monotonic()."""

    def __init__(self, url: str, token: str, ca_file: str, threads: int = 1, limit: float = LOAD_LIMIT_S) -> None:
        super().__init__(url, threads=threads, timeout=REQUEST_TIMEOUT_S, limit=limit, retries=False,
                         headers={"Authorization": f"Bearer {token}"}, verify=ca_file)
        self.timeline: list[tuple[float, float, str]] = []

    def note(self, began: float, ended: float, answer: requests.Response | None, failure: str | None) -> None:
        outcome = str(answer.status_code) if answer is not None else (failure or "").split(":")[0]
        self.timeline.append((began, ended, outcome))

    def first(self, outcome: str, after: float) -> float | None:
        """When the first answer ``outcome`` arrived of the requests that began after ``after``."""
        with self._lock:
            ends = [ended for began, ended, seen in self.timeline if seen == outcome and began >= after]
        return min(ends) if ends else None

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        """Outcomes of the requests that began in [since, until)."""
        with self._lock:
            return Counter(seen for began, _, seen in self.timeline if since <= began < until)


def _outcomes(counts: Counter[str]) -> str:
    return ", ".join(f"{n}x {outcome}" for outcome, n in counts.most_common()) or "none"


class RoutesWatch:
    """When the routing table mlserve last pushed (routes.json) first satisfied ``predicate``; polled
    every 10 ms in a thread, for at most ``limit`` seconds."""

    def __init__(self, ms: Mlserve, predicate: Callable[[dict[str, Any]], bool], limit: float = LOAD_LIMIT_S) -> None:
        self.path, self.predicate, self.limit = ms.home / "gateway" / "routes.json", predicate, limit
        self.seen: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if self.predicate(json.loads(self.path.read_text())):
                    self.seen = time.monotonic()
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass  # written meanwhile: read it again next time
            time.sleep(WATCH_INTERVAL_S)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _guard(table: dict[str, Any], project: str) -> dict[str, Any]:
    guard: dict[str, Any] = table["projects"][f"bench/projects/{project}"]["guard"]
    return guard


def _copy(app: Path, work: Path, name: str) -> Path:
    """The app in a folder named ``name`` under ``work`` (the folder names the project)."""
    target = work / name
    shutil.copytree(app, target)
    return target


def _gateway(ms: Mlserve, tls: str) -> dict[str, Any]:
    """`gateway start --host 127.0.0.1 --tls TLS --json` (a reload when it runs): url, ca_file..."""
    started: dict[str, Any] = ms.json("gateway", "start", "--host", "127.0.0.1", "--tls", tls)
    return started


def _seconds(later: float | None, earlier: float) -> str:
    return "never" if later is None else f"{later - earlier:.2f} s"


# -- 1. what TLS and the token check cost ------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    label: str
    tls: str  # gateway start --tls
    access: str  # mlserve access


PLAIN = Mode("plain HTTP, project public", "off", "public")
GUARDED = Mode("HTTPS (self-signed) + token required", "self-signed", "token")
TOKEN_ONLY = Mode("plain HTTP + token required", "off", "token")  # to tell the token check's cost from TLS's
MODES = (PLAIN, GUARDED, TOKEN_ONLY)


def _configure(ms: Mlserve, mode: Mode, token: str) -> str:
    """The gateway and the project as ``mode`` says (`gateway start` reloads nginx, `access` pushes the
    table); the project endpoint, checked: without the token a GET gets 401 or 200 as the access says,
    with it 200."""
    started = _gateway(ms, mode.tls)
    url = started["url"] + PROJECT_PATH.format(project="hello")
    ms("access", mode.access, "--project", "hello")
    verify = started["ca_file"] or True
    without = requests.get(url, timeout=10, verify=verify).status_code
    with_token = requests.get(url, timeout=10, verify=verify, headers={"Authorization": f"Bearer {token}"}).status_code
    expected = (401 if mode.access == "token" else 200, 200)
    if (without, with_token) != expected:
        raise BenchError(f"{mode.label}: a GET without the token got {without}, with it {with_token}; "
                         f"expected {expected}")
    return url


def _cpu_note(runs: list[WrkRun]) -> str:
    kinds = runs[0].cpu_us
    return "CPU per request (median): " + ", ".join(
        f"{kind} {statistics.median(r.cpu_us[kind] for r in runs):.0f} us" for kind in kinds)


def efficiency(client: docker.DockerClient, work: Path) -> list[Result]:
    """One project, one job (2 workers), the same wrk with the same Authorization header in every mode:
    plain HTTP with the project public, HTTPS with a token required, and (to tell the two costs apart)
    plain HTTP with a token required. Rounds interleave the modes, each round in another order; the
    target is the ratio of the medians of the first two."""
    runs: dict[Mode, list[WrkRun]] = {mode: [] for mode in MODES}
    with sandbox() as ms:
        ms("run", "--mode", "serve", "--access", "token", cwd=_copy(HELLO_APP, work, "hello"), timeout=900)
        token = ms.json("token", "create", "--project", "hello", "--name", "wrk")["token"]
        instances = container_pids(client, ms.home, "bench/projects/hello")
        for n in range(WRK_ROUNDS):
            for mode in MODES[n % len(MODES):] + MODES[:n % len(MODES)]:
                url = _configure(ms, mode, token)
                runs[mode].append(wrk(url, token, {"nginx": gateway_workers(ms.home), "uwsgi": instances}))
            print("   " + ", ".join(f"{mode.label} {runs[mode][-1].rps:.0f} req/s" for mode in MODES), flush=True)
        workers = len(gateway_workers(ms.home))
    median = {mode: statistics.median(r.rps for r in runs[mode]) for mode in MODES}
    ratio = median[GUARDED] / median[PLAIN]
    rounds = ", ".join(f"{g.rps / p.rps:.2f}" for g, p in zip(runs[GUARDED], runs[PLAIN], strict=True))
    errors = "; ".join(sorted({r.sockets for rs in runs.values() for r in rs if r.sockets}))

    def rps_note(mode: Mode) -> str:
        return (f"median of {WRK_ROUNDS}: " + ", ".join(f"{r.rps:.0f}" for r in runs[mode])
                + f"; {_cpu_note(runs[mode])}")

    cpu = {mode: {kind: statistics.median(r.cpu_us[kind] for r in runs[mode]) for kind in runs[mode][0].cpu_us}
           for mode in MODES}

    def cpu_ratio(*kinds: str) -> float:
        return sum(cpu[PLAIN][k] for k in kinds) / sum(cpu[GUARDED][k] for k in kinds)

    return [
        Result(f"{PLAIN.label}: req/s", median[PLAIN], "req/s", "-", None,
               rps_note(PLAIN) + f"; wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s keep-alive on the project "
               f"endpoint, 1 job of 2 workers, {workers} gateway workers, the same Authorization header in every mode"),
        Result(f"{GUARDED.label}: req/s", median[GUARDED], "req/s", "-", None,
               rps_note(GUARDED) + (f"; wrk socket errors: {errors}" if errors else "")),
        Result(f"{TOKEN_ONLY.label}: req/s (the token check without TLS)", median[TOKEN_ONLY], "req/s", "-", None,
               rps_note(TOKEN_ONLY) + f"; ratio to plain {median[TOKEN_ONLY] / median[PLAIN]:.2f}"),
        Result("guarded edge efficiency (HTTPS + token / plain HTTP + public, ratio of the medians)", ratio, "",
               f">= {EFFICIENCY_TARGET}", ratio >= EFFICIENCY_TARGET,
               f"per round: {rounds}; the modes interleaved, each round in another order; `gateway start --tls` "
               "and `access` before every wrk (a reload, a push); wrk and the instance share the 2 cores with "
               "nginx, so wrk's own TLS work counts against the guarded mode"),
        Result("... the same by CPU time per request (plain / HTTPS + token; nginx workers + instance)",
               cpu_ratio("nginx", "uwsgi"), "", "-", None,
               f"less sensitive to the machine's other load than req/s; nginx alone {cpu_ratio('nginx'):.2f}, "
               f"nginx + instance + wrk {cpu_ratio('nginx', 'uwsgi', 'wrk'):.2f}; the token check alone (plain HTTP "
               f"+ token) costs nginx {cpu[TOKEN_ONLY]['nginx'] - cpu[PLAIN]['nginx']:+.0f} us a request, TLS and "
               f"the check together {cpu[GUARDED]['nginx'] - cpu[PLAIN]['nginx']:+.0f} us (wrk "
               f"{cpu[GUARDED]['wrk'] - cpu[PLAIN]['wrk']:+.0f} us)"),
    ]


# -- 2. revocation and new limits under load ---------------------------------------------------


def _wait_seen(client: Client, outcome: str, after: float) -> float | None:
    seconds_until(lambda: client.first(outcome, after) is not None, timeout=SEEN_WAIT_S, interval=0.05)
    return client.first(outcome, after)


@dataclass(frozen=True)
class Revocation:
    began: float  # `token revoke` started (time.monotonic())
    returned: float
    pushed: float | None  # routes.json no longer had the token
    refused: float | None  # the revoked token's client got its first 401
    before: Counter[str]  # the client's answers, by when their request began: before the command,
    meanwhile: Counter[str]  # while it ran,
    after: Counter[str]  # and after it returned
    cpu_busy: float  # share of all cores' time in use while the command ran

    @property
    def seconds(self) -> float | None:
        return None if self.refused is None else self.refused - self.began

    def describe(self) -> str:
        return (f"{_seconds(self.refused, self.began)} (command {self.returned - self.began:.2f} s, CPU "
                f"{self.cpu_busy:.0%} busy; table {_seconds(self.pushed, self.began)}; 401 "
                f"{_seconds(self.refused, self.returned)} from its return)")


def _revoke(ms: Mlserve, url: str, ca_file: str, name: str) -> Revocation:
    """A new token with its own client (1 keep-alive session); revoked once the client has run a while:
    when the table had it gone, and when its client saw the first 401."""
    token = ms.json("token", "create", "--project", "hello", "--name", name)["token"]

    def gone(table: dict[str, Any]) -> bool:
        return all(v["name"] != name for v in _guard(table, "hello")["tokens"].values())

    with Client(url, token, ca_file) as client, RoutesWatch(ms, gone) as watch:
        time.sleep(REVOKE_SETTLE_S)
        cpu = _CpuBusy()
        began = time.monotonic()
        ms("token", "revoke", name, "--project", "hello")
        returned = time.monotonic()
        busy = cpu.busy()
        refused = _wait_seen(client, "401", began)
        time.sleep(REVOKE_SETTLE_S)  # what the client gets after the first 401
    revocation = Revocation(began, returned, watch.seen, refused, client.counts(until=began),
                            client.counts(began, returned), client.counts(since=returned), busy)
    print(f"   revoke {name}: {revocation.describe()}; answers before {_outcomes(revocation.before)}, meanwhile "
          f"{_outcomes(revocation.meanwhile)}, after {_outcomes(revocation.after)}", flush=True)
    return revocation


def _revocations(ms: Mlserve, url: str, ca_file: str, idle_s: float) -> Result:
    """REVOCATIONS tokens revoked in turn, each while its client sends on; the slowest is the value."""
    done = [_revoke(ms, url, ca_file, f"client-a{n}") for n in range(1, REVOCATIONS + 1)]
    seconds = [r.seconds for r in done]
    worst = None if None in seconds else max(s for s in seconds if s is not None)
    late = sum(r.after.get("200", 0) for r in done)  # begun after the command returned, and let through
    failed_before = sum(n for r in done for outcome, n in r.before.items() if outcome != "200")
    ok = worst is not None and worst <= ENFORCED_TARGET_S and not late and not failed_before
    note = (f"{REVOCATIONS} tokens, each used by its own keep-alive session, revoked in turn; from `token revoke` "
            f"starting to the first 401: " + "; ".join(r.describe() for r in done)
            + f"; the same command took {idle_s:.2f} s before the load began; requests begun after the command "
            f"returned and still answered 200: {late}; answers before the revoke that were not 200: {failed_before}")
    return Result(f"token revocation under load: seconds from `token revoke` starting to the first 401 "
                  f"(max of {REVOCATIONS})", worst, "s", f"<= {ENFORCED_TARGET_S}", ok, note)


def _project_limit(ms: Mlserve, app: Path, client_c: Client) -> Result:
    """A lower project limit by the only path that changes one: mlserve.yml's `limits: rate`, applied by
    `run --replace` (a build and a new version). When the table had it, and when C saw its first 429."""
    config = app / "mlserve.yml"
    config.write_text(config.read_text() + f"limits:\n  rate: {PROJECT_RATE}\n  burst: {PROJECT_BURST}\n")
    with RoutesWatch(ms, lambda t: "rate" in _guard(t, "limited")) as watch:
        began = time.monotonic()
        ms("run", "--mode", "serve", "--replace", cwd=app, timeout=300)
        returned = time.monotonic()
        limited = _wait_seen(client_c, "429", began)
    time.sleep(max(0.0, returned + SETTLE_S - time.monotonic()))
    pushed = watch.seen
    before = client_c.counts(until=began)
    during = client_c.counts(began, returned + SETTLE_S)
    failed = sum(n for outcome, n in (before + during).items() if outcome not in ("200", "429"))
    from_push = None if limited is None or pushed is None else limited - pushed
    ok = (from_push is not None and limited is not None and from_push <= ENFORCED_TARGET_S
          and limited - returned <= ENFORCED_TARGET_S and not failed and not before.get("429"))
    note = (f"limits: {{rate: {PROJECT_RATE}, burst: {PROJECT_BURST}}} added to mlserve.yml, then `run --replace` "
            f"({returned - began:.2f} s: build, new version healthy, old job drained); routes.json had the limit "
            f"{_seconds(pushed, began)} after the run began; first 429 {_seconds(limited, began)} after it began, "
            f"{_seconds(limited, returned)} after it returned (negative: before); client C (1 keep-alive session, "
            f"its own project): before {_outcomes(before)}; from the run's start to {SETTLE_S} s after its return "
            f"{_outcomes(during)}")
    print(f"   project limit: {note}", flush=True)
    return Result("new project rate limit under load: seconds from the routing table having it to the first 429",
                  from_push, "s", f"<= {ENFORCED_TARGET_S}", ok, note)


def _token_limit(ms: Mlserve, url: str, ca_file: str) -> Result:
    """A new token with its own limit: its client starts when `token create` returns; when the first 429 came."""
    began = time.monotonic()
    token = ms.json("token", "create", "--project", "hello", "--name", "client-d",
                    "--rate", TOKEN_RATE, "--burst", str(TOKEN_BURST))["token"]
    returned = time.monotonic()
    with Client(url, token, ca_file) as client_d:
        limited = _wait_seen(client_d, "429", returned)
        time.sleep(1)
    admitted = sum(1 for start, _, seen in client_d.timeline
                   if seen == "200" and (limited is None or start < limited))
    counts = client_d.counts()
    failed = sum(n for outcome, n in counts.items() if outcome not in ("200", "429"))
    ok = limited is not None and limited - returned <= ENFORCED_TARGET_S and not failed
    note = (f"`token create --rate {TOKEN_RATE} --burst {TOKEN_BURST}` took {returned - began:.2f} s; its client "
            f"(1 keep-alive session) began when it returned; {admitted} answered 200 before the first 429; "
            f"all its answers: {_outcomes(counts)}")
    print(f"   token limit: {note}", flush=True)
    return Result("new token with its own limit: seconds from `token create` returning to its client's first 429",
                  None if limited is None else limited - returned, "s", f"<= {ENFORCED_TARGET_S}", ok, note)


def changes_under_load(work: Path) -> list[Result]:
    """HTTPS gateway; project hello (token access) with the other clients (token B, 4 sessions), project
    limited (token access, no limit yet) with client C. Under that load: revoke tokens of hello, each
    with a client of its own; lower limited's rate (run --replace); create a token D with its own limit.
    B must lose nothing."""
    with sandbox() as ms:
        hello = _copy(HELLO_APP, work, "hello")
        limited = _copy(HELLO_APP, work, "limited")
        # access: token in the file: a re-run applies mlserve.yml's guard, and without it the project
        # would be public again on a loopback gateway.
        (limited / "mlserve.yml").write_text("access: token\n")
        ms("run", "--mode", "serve", "--access", "token", cwd=hello, timeout=900)
        ms("run", "--mode", "serve", cwd=limited, timeout=900)
        started = _gateway(ms, "self-signed")
        ca_file = started["ca_file"]
        hello_url = started["url"] + PROJECT_PATH.format(project="hello")
        limited_url = started["url"] + PROJECT_PATH.format(project="limited")
        ms("token", "create", "--project", "hello", "--name", "idle")
        idle_s, _ = ms.timed("token", "revoke", "idle", "--project", "hello")
        token_b = ms.json("token", "create", "--project", "hello", "--name", "client-b")["token"]
        token_c = ms.json("token", "create", "--project", "limited", "--name", "client-c")["token"]
        with Client(hello_url, token_b, ca_file, threads=SESSION_THREADS) as others:
            with Client(limited_url, token_c, ca_file) as client_c:
                time.sleep(SETTLE_S)
                revoked = _revocations(ms, hello_url, ca_file, idle_s)
                project_limit = _project_limit(ms, limited, client_c)
            token_limit = _token_limit(ms, hello_url, ca_file)
            time.sleep(SETTLE_S)
        counts = others.counts()
        duration = others.timeline[-1][1] - others.started if others.timeline else 0.0
    failed = sum(n for outcome, n in counts.items() if outcome != "200")
    slowest = max((ended - began for began, ended, _ in others.timeline), default=0.0)
    note = (f"{sum(counts.values())} requests in {duration:.1f} s: {_outcomes(counts)}; max latency {slowest:.2f} s; "
            f"{SESSION_THREADS} keep-alive sessions with token B of project hello, no retries, over HTTPS, from "
            f"before the first revoke until after the new token's load (the project limit was on project limited)")
    print(f"   others: {note}", flush=True)
    return [
        revoked, project_limit, token_limit,
        Result("other clients through the revokes and both new limits: failed requests", failed, "requests", "0",
               failed == 0 and bool(counts), note),
    ]


# -- the section -------------------------------------------------------------------------------


def edge(client: docker.DockerClient, work: Path) -> list[Result]:
    """The edge section: both scenarios run, whether the first failed or not."""
    work = work / "edge"
    work.mkdir(parents=True, exist_ok=True)
    return run_scenarios([
        ("efficiency", lambda: efficiency(client, work / "efficiency")),
        ("changes_under_load", lambda: changes_under_load(work / "changes")),
    ])
