"""Drives a real mlserve from outside, as its users do: the `mlserve` command against an isolated home,
waits, label lookups, the rendered gateway configuration and a background GET load.

Shared by the integration tests (through tests/conftest.py) and the benchmarks (bench/). No pytest here:
bench/run.py imports it as a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from mlserve.constants import LABEL_HOME, LABEL_JOB, LABEL_PROJECT
from mlserve.quota import unmount_all

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

T = TypeVar("T")


class CommandError(AssertionError):
    """An `mlserve` command exited non-zero. An AssertionError, so that a test reports it as its failure."""


# What "not yet" looks like while something comes back: a command or request that fails (the engine
# restarts), a job not listed yet.
NOT_YET: tuple[type[Exception], ...] = (CommandError, requests.RequestException, KeyError, OSError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.25,
             ignore: tuple[type[Exception], ...] = ()) -> T | None:
    """The first true value of ``predicate()``, or None after ``timeout`` seconds.

    An exception of a type in ``ignore`` counts as false; any other is raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        time.sleep(interval)
    return None


def seconds_until(predicate: Callable[[], object], timeout: float, interval: float = 0.25) -> float | None:
    """Seconds until ``predicate()`` was true, or None after ``timeout``; the NOT_YET errors count as false."""
    started = time.monotonic()
    if wait_for(predicate, timeout, interval, ignore=NOT_YET) is None:
        return None
    return time.monotonic() - started


@dataclass
class Mlserve:
    """Runs the real `mlserve` command against an isolated home and gateway port."""

    home: Path
    port: int
    env: dict[str, str]
    timeout: float = 600  # seconds a command may take where a call does not say

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True, timeout: float | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Runs `mlserve ARGS` to its end; raises CommandError if it exits non-zero and ``check``."""
        result = subprocess.run(
            [sys.executable, "-m", "mlserve", *args], cwd=cwd, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=self.timeout if timeout is None else timeout, check=False,
        )
        if check and result.returncode != 0:
            raise CommandError(f"mlserve {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str, cwd: Path | None = None, timeout: float | None = None) -> Any:
        return json.loads(self(*args, "--json", cwd=cwd, timeout=timeout).stdout)

    def timed(self, *args: str, cwd: Path | None = None,
              timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Seconds `mlserve ARGS` took, and its result; raises CommandError as a call does."""
        started = time.perf_counter()
        result = self(*args, cwd=cwd, timeout=timeout)
        return time.perf_counter() - started, result

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        """Starts `mlserve ARGS` without waiting; its output is piped, as text."""
        return subprocess.Popen([sys.executable, "-m", "mlserve", *args], cwd=cwd, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The running jobs by name (owner/projects/project/N), from `status --json`."""
        return {j["job"]: j for j in self.json("status", timeout=60)}

    def gateway_conf(self) -> str:
        """The nginx configuration the gateway runs with."""
        return (self.home / "gateway" / "nginx.conf").read_text()

    def routes(self) -> dict[str, Any]:
        """The routing table the gateway's router serves from (the last one mlserve pushed)."""
        return json.loads((self.home / "gateway" / "routes.json").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_mlserve(owner: str = "tester", timeout: float = 600) -> Mlserve:
    """A new, empty home (under /tmp) and a free gateway port, for jobs owned by ``owner``."""
    # Short paths: unix socket paths under the home must stay under 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="mls", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "MLSERVE_HOME": str(home), "MLSERVE_GATEWAY_PORT": str(port), "MLSERVE_OWNER": owner}
    return Mlserve(home, port, env, timeout)


def teardown_mlserve(ms: Mlserve, client: DockerClient | None = None) -> None:
    """Stops every job of ``ms`` and its gateway, removes the containers labelled with its home and
    untags its images (given a client), and deletes the home. Every step runs even if one before it
    failed; the failure is raised."""
    with contextlib.ExitStack() as steps:  # runs the callbacks last-registered first
        steps.callback(shutil.rmtree, ms.home, ignore_errors=True)
        steps.callback(unmount_all, ms.home)  # jobs' output filesystems: never deleted through, no loop device left
        if client is not None:
            steps.callback(_untag_images, client, ms.home)
            steps.callback(_remove_containers, client, ms.home)
        steps.callback(ms, "gateway", "stop", check=False)
        steps.callback(ms, "stop", "--all", check=False, timeout=300)


def _remove_containers(client: DockerClient, home: Path) -> None:
    for container in labelled_containers(client, home):
        container.remove(force=True)


def home_images(client: DockerClient, home: Path, project: str | None = None) -> set[str]:
    """The image tags built by the mlserve at ``home`` (of one project, owner/projects/name, if given)."""
    labels = [f"{LABEL_HOME}={home}"] + ([f"{LABEL_PROJECT}={project}"] if project else [])
    return {tag for image in client.images.list(filters={"label": labels}) for tag in image.tags}


def _untag_images(client: DockerClient, home: Path) -> None:
    # noprune: the layers stay cached, so the next test's build is as fast as a user's rebuild.
    for tag in home_images(client, home):
        client.images.remove(tag, noprune=True)


def labelled_containers(client: DockerClient, home: Path, *, job: str | None = None, project: str | None = None,
                        stopped: bool = True) -> list[Container]:
    """The containers of the mlserve at ``home``, of one job (endpoint id) or project if given; ``stopped``
    ones too unless told not to."""
    labels = [f"{LABEL_HOME}={home}"]
    if job is not None:
        labels.append(f"{LABEL_JOB}={job}")
    if project is not None:
        labels.append(f"{LABEL_PROJECT}={project}")
    return client.containers.list(all=stopped, filters={"label": labels})


def job_container(client: DockerClient, home: Path, job_id: str) -> Container | None:
    """The container of the job with endpoint id ``job_id``, or None."""
    found = labelled_containers(client, home, job=job_id)
    return found[0] if found else None


def routed_jobs(routes: dict[str, Any]) -> set[str]:
    """The endpoint ids that a routing table sends traffic to at their own endpoints."""
    return {job_id for job_id, job in routes["jobs"].items() if job["ready"]}


def project_ready(routes: dict[str, Any], key: str) -> list[str]:
    """The endpoint ids of primary versions that take turns at project ``key``'s endpoint now."""
    return [job_id for pool in routes["projects"][key]["pools"] for job_id in pool["ready"]]


def project_pools(routes: dict[str, Any]) -> set[str]:
    """The endpoint ids that take turns at some project endpoint in a routing table."""
    return {job_id for key in routes["projects"] for job_id in project_ready(routes, key)}


def served_jobs(project_endpoint: str, n: int) -> set[str]:
    """The job names that answer ``n`` GETs on a project endpoint (the apps under test name their job)."""
    return {requests.get(project_endpoint, timeout=10).json()["job"] for _ in range(n)}


class Load:
    """GET requests from a few threads until stopped (or ``limit`` seconds); counts every failure.

    A failure is an answer other than 200, or a socket error or timeout, kept with the seconds into
    the load it began at. Loopback only."""

    def __init__(self, url: str, threads: int = 4, timeout: float = 30, limit: float = 60,
                 retries: bool = True, headers: dict[str, str] | None = None, verify: str | bool = True) -> None:
        self.url, self.timeout, self.limit, self.retries = url, timeout, limit, retries
        self.headers, self.verify = headers or {}, verify  # e.g. a bearer token; the CA file of a TLS gateway
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.max_latency = 0.0
        self.started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        session = requests.Session()
        session.trust_env = False
        # With retries, as curl and browsers do: a GET on a reused keep-alive connection that the gateway
        # closed (a reload closes idle ones) is retried on a new one; any HTTP answer counts as it is.
        # Without, nothing is retried, not even that: the strictest client there is.
        retry = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=["GET"], raise_on_status=False)
        for scheme in ("http://", "https://"):
            session.mount(scheme, HTTPAdapter(max_retries=retry if self.retries else 0))
        session.headers.update(self.headers)
        session.verify = self.verify
        while not self._stop.is_set() and time.monotonic() - self.started < self.limit:
            began = time.monotonic()
            answer = None
            try:
                answer = session.get(self.url, timeout=self.timeout)
                failure = self.judge(answer)
            except (requests.RequestException, ValueError) as exc:
                failure = f"{type(exc).__name__}: {str(exc)[:160]}"
            ended = time.monotonic()
            with self._lock:
                self.max_latency = max(self.max_latency, ended - began)
                if failure:
                    self.failures.append((began - self.started, failure))
                else:
                    self.ok += 1
                self.note(began, ended, answer, failure)

    def judge(self, answer: requests.Response) -> str | None:
        """What is wrong with an answer (None: nothing). Subclasses check more."""
        return None if answer.status_code == 200 else f"{answer.status_code} {answer.text[:120].strip()}"

    def note(self, began: float, ended: float, answer: requests.Response | None, failure: str | None) -> None:
        """Called for every request, under the load's lock; subclasses keep what they count."""

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.limit)

    def describe(self) -> str:
        """Answers, the slowest, and the commonest failures with when they happened."""
        text = f"{self.ok} ok, max latency {self.max_latency:.1f}s"
        if self.failures:
            kinds: dict[str, int] = {}
            for _, failure in self.failures:
                kinds[failure[:60]] = kinds.get(failure[:60], 0) + 1
            text += "; failures: " + "; ".join(f"{n}x {kind}" for kind, n in list(kinds.items())[:3])
            text += f" (at {self.failures[0][0]:.1f}s..{self.failures[-1][0]:.1f}s of the load)"
        return text


# -- versions and traffic ----------------------------------------------------------------------

VERSION_HEADER = "X-Mlserve-Version"  # the gateway names the version that answered every routed request


class VersionLoad(Load):
    """A Load that also notes which version answered (the gateway's X-Mlserve-Version header, "none"
    when missing): ``versions`` counts them, ``timeline`` keeps every request in order as (began, ended,
    version or None, failure or None), in time.monotonic() seconds."""

    def __init__(self, url: str, threads: int = 4, timeout: float = 30, limit: float = 60,
                 retries: bool = True) -> None:
        super().__init__(url, threads, timeout, limit, retries)
        self.versions: Counter[str] = Counter()
        self.timeline: list[tuple[float, float, str | None, str | None]] = []

    def note(self, began: float, ended: float, answer: requests.Response | None, failure: str | None) -> None:
        version = answer.headers.get(VERSION_HEADER, "none") if answer is not None else None
        self.timeline.append((began, ended, version, failure))
        if not failure:
            self.versions[version or "none"] += 1

    def describe(self) -> str:
        return super().describe() + "; answered by version " + (
            ", ".join(f"{v}: {n}" for v, n in sorted(self.versions.items())) or "none")


def answered_versions(url: str, n: int, threads: int = 4, timeout: float = 30) -> tuple[Counter[str], list[str]]:
    """``n`` GETs on ``url`` from ``threads`` keep-alive sessions that never retry: how many answered
    200 from each version (X-Mlserve-Version, "none" when missing), and what failed."""
    counts: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def share(count: int) -> None:
        session = requests.Session()
        session.trust_env = False
        session.mount("http://", HTTPAdapter(max_retries=0))
        for _ in range(count):
            try:
                answer = session.get(url, timeout=timeout)
                failure = None if answer.status_code == 200 else f"{answer.status_code} {answer.text[:120].strip()}"
            except requests.RequestException as exc:
                failure = f"{type(exc).__name__}: {str(exc)[:160]}"
            with lock:
                if failure:
                    failures.append(failure)
                else:
                    counts[answer.headers.get(VERSION_HEADER, "none")] += 1

    workers = [threading.Thread(target=share, args=(n // threads + (i < n % threads),), daemon=True)
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts, failures


def gateway_workers(home: Path) -> list[int]:
    """The pids of the gateway's nginx worker processes (the children of its master), for the mlserve at
    ``home``; empty when the gateway does not run."""
    try:
        master = int((home / "gateway" / "nginx.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:  # the parent's pid follows the state
            workers.append(int(entry.name))
    return sorted(workers)
