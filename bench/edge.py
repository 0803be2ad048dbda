"""A public guarded edge (issue 9): what TLS and a token check on every request cost the gateway, and how
soon a token revocation or a new rate limit is enforced while other clients of the gateway lose nothing.

Every scenario runs on a fresh mlserve (bench/sandbox.py) serving bench/apps/hello; loads go to
loopback only and are bounded in time and count."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import docker
import requests
from requests.adapters import HTTPAdapter
from results import BenchError, Result, run_scenarios
from sandbox import sandbox
from speed import WRK_CONNECTIONS, WRK_ROUNDS, WRK_SECONDS

from tests.harness import REPO, Mlserve, gateway_workers, seconds_until

EDGE = "A public guarded edge (issue 9)"
HELLO_APP = REPO / "bench" / "apps" / "hello"
PROJECT_PATH = "/serve/bench/projects/{project}"
EFFICIENCY_TARGET = 0.80
ENFORCED_TARGET_S = 1.0
SESSION_THREADS = 4  # the other clients' keep-alive sessions (token B)
LOAD_LIMIT_S = 90  # no client runs longer than this, whatever happens
REQUEST_TIMEOUT_S = 30
SETTLE_S = 2  # load before each change, and after its effect was seen
SEEN_WAIT_S = 10  # a change whose effect no client saw by then counts as not enforced
WATCH_INTERVAL_S = 0.01
PROJECT_RATE = "20/s"  # the new project limit: far below what one client sends
PROJECT_BURST = 20
TOKEN_RATE = "10/s"  # a new token's own limit
TOKEN_BURST = 10


# -- clients -----------------------------------------------------------------------------------


def wrk(url: str, token: str) -> tuple[float, str]:
    """speed.wrk's load (-t2 -cN -dS, keep-alive) with the token in every request; requests per second
    and wrk's socket errors. Raises BenchError when any answer is not 2xx/3xx (a refused token)."""
    out = subprocess.run(["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s",
                          "-H", f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, timeout=WRK_SECONDS + 30, check=False).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match or re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise BenchError(f"wrk against {url} failed:\n{out}")
    sockets = re.search(r"Socket errors: (.*)", out)
    return float(match.group(1)), sockets.group(1) if sockets else ""


class Client:
    """Threads of a keep-alive requests.Session that send a bearer token and never retry, until stopped
    (or ``limit`` seconds). Every request is kept as (began, ended, outcome): the status code, or the
    exception's name; times are time.monotonic()."""

    def __init__(self, url: str, token: str, ca_file: str, threads: int = 1, limit: float = LOAD_LIMIT_S) -> None:
        self.url, self.token, self.ca_file, self.limit = url, token, ca_file, limit
        self.timeline: list[tuple[float, float, str]] = []
        self.started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        session = requests.Session()
        session.trust_env = False
        session.mount("https://", HTTPAdapter(max_retries=0))
        session.verify = self.ca_file
        session.headers["Authorization"] = f"Bearer {self.token}"
        while not self._stop.is_set() and time.monotonic() - self.started < self.limit:
            began = time.monotonic()
            try:
                outcome = str(session.get(self.url, timeout=REQUEST_TIMEOUT_S).status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self._lock:
                self.timeline.append((began, time.monotonic(), outcome))

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.limit)

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


def _plain(ms: Mlserve) -> str:
    """Plain HTTP, the project open to anyone; the project endpoint, checked to answer without a token."""
    url = _gateway(ms, "off")["url"] + PROJECT_PATH.format(project="hello")
    ms("access", "public", "--project", "hello")
    status = requests.get(url, timeout=10).status_code
    if status != 200:
        raise BenchError(f"plain HTTP, public: a GET without a token got {status}")
    return url


def _guarded(ms: Mlserve, token: str) -> str:
    """HTTPS (self-signed) and a token required; the project endpoint, checked to refuse a GET without
    the token and answer one with it."""
    started = _gateway(ms, "self-signed")
    url = started["url"] + PROJECT_PATH.format(project="hello")
    ms("access", "token", "--project", "hello")
    without = requests.get(url, timeout=10, verify=started["ca_file"]).status_code
    with_token = requests.get(url, timeout=10, verify=started["ca_file"],
                              headers={"Authorization": f"Bearer {token}"}).status_code
    if (without, with_token) != (401, 200):
        raise BenchError(f"HTTPS + token: a GET without the token got {without}, with it {with_token}")
    return url


def efficiency(work: Path) -> list[Result]:
    """One project, one job (2 workers), the same wrk with the same Authorization header: plain HTTP with
    the project public, against HTTPS with a token required; rounds interleaved, ratio of the medians."""
    with sandbox() as ms:
        ms("run", "--mode", "serve", "--access", "token", cwd=_copy(HELLO_APP, work, "hello"), timeout=900)
        token = ms.json("token", "create", "--project", "hello", "--name", "wrk")["token"]
        plain: list[float] = []
        guarded: list[float] = []
        sockets: set[str] = set()
        for _ in range(WRK_ROUNDS):
            rps, errors = wrk(_plain(ms), token)
            plain.append(rps)
            sockets.add(errors)
            rps, errors = wrk(_guarded(ms, token), token)
            guarded.append(rps)
            sockets.add(errors)
            print(f"   plain HTTP + public {plain[-1]:.0f} req/s, HTTPS + token {guarded[-1]:.0f} req/s", flush=True)
        workers = len(gateway_workers(ms.home))
    ratio = statistics.median(guarded) / statistics.median(plain)
    rounds = ", ".join(f"{g / p:.2f}" for g, p in zip(guarded, plain, strict=True))
    errors = "; ".join(sorted(e for e in sockets if e))
    load = (f"wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s keep-alive, the same Authorization header in both; "
            f"project endpoint, 1 job, 2 workers; {workers} gateway workers")
    return [
        Result("plain HTTP, project public: req/s", statistics.median(plain), "req/s", "-", None,
               f"median of {WRK_ROUNDS}: " + ", ".join(f"{p:.0f}" for p in plain) + f"; {load}"),
        Result("HTTPS (self-signed, TLS 1.3) + token required: req/s", statistics.median(guarded), "req/s", "-", None,
               f"median of {WRK_ROUNDS}: " + ", ".join(f"{g:.0f}" for g in guarded)
               + (f"; wrk socket errors: {errors}" if errors else "")),
        Result("guarded edge efficiency (HTTPS + token / plain HTTP + public, ratio of the medians)", ratio, "",
               f">= {EFFICIENCY_TARGET}", ratio >= EFFICIENCY_TARGET,
               f"per round: {rounds}; rounds interleaved, plain first; `gateway start --tls` and `access` between "
               "rounds (each a reload or a push)"),
    ]


# -- 2. revocation and new limits under load ---------------------------------------------------


def _wait_seen(client: Client, outcome: str, after: float) -> float | None:
    seconds_until(lambda: client.first(outcome, after) is not None, timeout=SEEN_WAIT_S, interval=0.05)
    return client.first(outcome, after)


def _revoke(ms: Mlserve, client_a: Client) -> Result:
    """Revoke token A while its client sends on: when the table had it gone, and when A saw its first 401."""
    with RoutesWatch(ms, lambda t: all(v["name"] != "client-a" for v in _guard(t, "hello")["tokens"].values())) as watch:
        began = time.monotonic()
        ms("token", "revoke", "client-a", "--project", "hello")
        returned = time.monotonic()
        refused = _wait_seen(client_a, "401", began)
    time.sleep(SETTLE_S)  # what A gets after the first 401
    before = client_a.counts(until=began)
    after_return = client_a.counts(since=returned)
    late = after_return.get("200", 0)  # began after the command returned, and still let through
    failed_before = sum(n for outcome, n in before.items() if outcome != "200")
    ok = refused is not None and refused - began <= ENFORCED_TARGET_S and not late and not failed_before
    note = (f"`token revoke` took {returned - began:.2f} s; first 401 {_seconds(refused, returned)} after it "
            f"returned; routes.json without the token {_seconds(watch.seen, began)} after it began; client A "
            f"(1 keep-alive session, token A): before the revoke {_outcomes(before)}; begun between its start and "
            f"return {_outcomes(client_a.counts(began, returned))}; begun after its return {_outcomes(after_return)}")
    print(f"   revoke: {note}", flush=True)
    return Result("token revocation under load: seconds from `token revoke` starting to the first 401 at its client",
                  None if refused is None else refused - began, "s", f"<= {ENFORCED_TARGET_S}", ok, note)


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
    """HTTPS gateway; project hello (token access) with client A and the other clients (token B, 4
    sessions), project limited (token access, no limit yet) with client C. Under that load: revoke A,
    lower limited's rate (run --replace), create a token D with its own limit. B must lose nothing."""
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
        token = {name: ms.json("token", "create", "--project", project, "--name", name)["token"]
                 for name, project in (("client-a", "hello"), ("client-b", "hello"), ("client-c", "limited"))}
        with Client(hello_url, token["client-b"], ca_file, threads=SESSION_THREADS) as others:
            with Client(hello_url, token["client-a"], ca_file) as client_a, \
                    Client(limited_url, token["client-c"], ca_file) as client_c:
                time.sleep(SETTLE_S)
                revoked = _revoke(ms, client_a)
                project_limit = _project_limit(ms, limited, client_c)
            token_limit = _token_limit(ms, hello_url, ca_file)
            time.sleep(SETTLE_S)
        counts = others.counts()
        duration = others.timeline[-1][1] - others.started if others.timeline else 0.0
    failed = sum(n for outcome, n in counts.items() if outcome != "200")
    slowest = max((ended - began for began, ended, _ in others.timeline), default=0.0)
    note = (f"{sum(counts.values())} requests in {duration:.1f} s: {_outcomes(counts)}; max latency {slowest:.2f} s; "
            f"{SESSION_THREADS} keep-alive sessions with token B of project hello, no retries, over HTTPS, from "
            f"before the revoke of A until after the new token's load (the project limit was on project limited)")
    print(f"   others: {note}", flush=True)
    return [
        revoked, project_limit, token_limit,
        Result("other clients through the revoke and both new limits: failed requests", failed, "requests", "0",
               failed == 0 and bool(counts), note),
    ]


# -- the section -------------------------------------------------------------------------------


def edge(client: docker.DockerClient, work: Path) -> list[Result]:
    """The edge section: both scenarios run, whether the first failed or not."""
    work = work / "edge"
    work.mkdir(parents=True, exist_ok=True)
    return run_scenarios([
        ("efficiency", lambda: efficiency(work / "efficiency")),
        ("changes_under_load", lambda: changes_under_load(work / "changes")),
    ])
