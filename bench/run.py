"""mlserve benchmarks: speed (issue 2) and self-healing under load and faults (issue 3).

Run with `make bench` (or `python3 bench/run.py`); add `--engine-restart` to also restart the
Docker engine (it disturbs every container on the machine, so it is off by default). Everything
goes to loopback, bounded in time. Prints the tables and writes bench/RESULTS.md with the machine
it ran on. Ratios are measured in one run, interleaved, because these machines are shared and noisy.

Notes written by hand below the NOTES_MARKER line of RESULTS.md are kept across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import docker
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
RESULTS = BENCH / "RESULTS.md"
NOTES_MARKER = "<!-- notes below this line are written by hand and kept when run.py rewrites the tables -->"
WRK_SECONDS = int(os.environ.get("BENCH_WRK_SECONDS", "8"))
WRK_ROUNDS = int(os.environ.get("BENCH_WRK_ROUNDS", "3"))
WRK_CONNECTIONS = 16
LOAD_LIMIT_S = 90  # no load runs longer than this, whatever happens
COMMAND_TIMEOUT_S = 300
SPEED = "Speed (issue 2)"
HEALING = "Self-healing under load and faults (issue 3)"
HEALING_APP = BENCH.parent / "tests" / "integration" / "apps" / "healing"  # the app the fault tests use


class BenchError(RuntimeError):
    pass


@dataclass
class Result:
    name: str
    value: float | None
    unit: str
    target: str
    ok: bool | None  # None: information, no target
    note: str = ""

    def cell(self) -> str:
        if self.value is None:
            return "error"
        if self.unit == "yes/no":
            return "yes" if self.value else "no"
        if self.unit in ("requests", "commands"):
            return f"{self.value:.0f}"
        number = f"{self.value:.2f}" if abs(self.value) < 100 else f"{self.value:.0f}"
        return f"{number} {self.unit}".strip()

    def met(self) -> str:
        return "-" if self.ok is None else ("yes" if self.ok else "**NO**")


@dataclass
class Section:
    title: str
    results: list[Result] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.25) -> float | None:
    """Seconds until ``predicate()`` was true, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate():
                return time.monotonic() - started
        except (BenchError, requests.RequestException, KeyError, OSError):
            pass  # not there yet (a command failed while the engine restarts, a job not listed yet)
        time.sleep(interval)
    return None


class Mlserve:
    """One isolated mlserve: its own MLSERVE_HOME, gateway port and owner."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mlb", dir="/tmp"))
        self.port = free_port()
        self.env = {**os.environ, "MLSERVE_HOME": str(self.home), "MLSERVE_GATEWAY_PORT": str(self.port),
                    "MLSERVE_OWNER": "bench"}

    def __call__(self, *args: str, cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT_S) -> str:
        out = subprocess.run([sys.executable, "-m", "mlserve", *args], cwd=cwd, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise BenchError(f"mlserve {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out.stdout

    def json(self, *args: str, cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT_S):
        return json.loads(self(*args, "--json", cwd=cwd, timeout=timeout))

    def timed(self, *args: str, cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT_S) -> tuple[float, str]:
        started = time.perf_counter()
        out = self(*args, cwd=cwd, timeout=timeout)
        return time.perf_counter() - started, out

    def jobs(self) -> dict[str, dict]:
        return {j["job"]: j for j in self.json("status", timeout=60)}

    def gateway_conf(self) -> str:
        return (self.home / "gateway" / "nginx.conf").read_text()

    def close(self) -> None:
        for args in (["stop", "--all"], ["gateway", "stop"]):
            try:
                subprocess.run([sys.executable, "-m", "mlserve", *args], env=self.env, capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                pass
        try:  # a safety net: nothing of this home may outlive the benchmark
            client = docker.from_env()
            for container in client.containers.list(all=True, filters={"label": f"io.mlserve.home={self.home}"}):
                container.remove(force=True)
            client.close()
        except docker.errors.DockerException:
            pass
        shutil.rmtree(self.home, ignore_errors=True)


def project_upstream(conf: str) -> str:
    """The text of the project upstream blocks of a rendered gateway configuration."""
    return "\n".join(re.findall(r"upstream project_\w+ \{[^}]*\}", conf))


def job_upstreams(conf: str) -> set[str]:
    return {line.split("job_")[1].split()[0] for line in conf.splitlines() if line.strip().startswith("upstream job_")}


# -- load ----------------------------------------------------------------------------------------


class Load:
    """GET requests from a few threads until stopped (or LOAD_LIMIT_S); counts every failure.

    A failure is an answer other than 200 or a socket error / timeout. Loopback only."""

    def __init__(self, url: str, threads: int = 4, timeout: float = 65) -> None:
        self.url, self.timeout = url, timeout
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.max_latency = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        self.started = 0.0

    def _loop(self) -> None:
        session = requests.Session()
        session.trust_env = False
        # As curl and browsers do: a GET on a reused keep-alive connection that the gateway closed
        # (a reload closes idle ones) is retried on a new one; any HTTP answer counts as it is.
        retry = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=["GET"], raise_on_status=False)
        session.mount("http://", HTTPAdapter(max_retries=retry))
        while not self._stop.is_set() and time.monotonic() - self.started < LOAD_LIMIT_S:
            began = time.monotonic()
            try:
                answer = session.get(self.url, timeout=self.timeout)
                failure = None if answer.status_code == 200 else f"{answer.status_code} {answer.text[:120].strip()}"
            except requests.RequestException as exc:
                failure = f"{type(exc).__name__}: {str(exc)[:160]}"
            took = time.monotonic() - began
            with self._lock:
                self.max_latency = max(self.max_latency, took)
                if failure:
                    self.failures.append((began - self.started, failure))
                else:
                    self.ok += 1

    def __enter__(self) -> "Load":
        self.started = time.monotonic()
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=LOAD_LIMIT_S)

    def describe(self) -> str:
        text = f"{self.ok} ok, max latency {self.max_latency:.1f}s"
        if self.failures:
            kinds: dict[str, int] = {}
            for _, failure in self.failures:
                kinds[failure[:60]] = kinds.get(failure[:60], 0) + 1
            text += "; failures: " + "; ".join(f"{n}x {kind}" for kind, n in list(kinds.items())[:3])
            text += f" (at {self.failures[0][0]:.1f}s..{self.failures[-1][0]:.1f}s of the load)"
        return text


def failed_requests(name: str, load: Load) -> Result:
    return Result(name, len(load.failures), "requests", "0", not load.failures, load.describe())


# -- issue 2: speed ------------------------------------------------------------------------------


def wrk(url: str) -> tuple[float, str]:
    out = subprocess.run(["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s", url],
                         capture_output=True, text=True, timeout=WRK_SECONDS + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not match or errors:
        raise BenchError(f"wrk against {url} failed:\n{out}")
    sockets = re.search(r"Socket errors: (.*)", out)
    return float(match.group(1)), sockets.group(1) if sockets else ""


def start_direct_uwsgi(app_dir: Path) -> tuple[subprocess.Popen, str]:
    """The same app under `uwsgi --http-socket` with 2 processes on the host: the baseline."""
    port = free_port()
    process = subprocess.Popen(
        ["uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master", "--processes", "2",
         "--wsgi-file", str(app_dir / "app.py"), "--callable", "app", "--disable-logging", "--die-on-term"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    if wait_for(lambda: requests.get(url, timeout=2).status_code == 200, timeout=20, interval=0.1) is None:
        process.kill()
        raise BenchError("uwsgi --http-socket did not answer 200 within 20 s")
    return process, url


def gateway_efficiency(project_endpoint: str, app_dir: Path) -> list[Result]:
    """Project endpoint vs uwsgi alone, the same wrk, interleaved rounds; ratio of the medians."""
    process, direct_url = start_direct_uwsgi(app_dir)
    through, direct, socket_notes = [], [], set()
    try:
        for _ in range(WRK_ROUNDS):
            rps, errors = wrk(project_endpoint)
            through.append(rps)
            socket_notes.add(errors)
            direct.append(wrk(direct_url)[0])
    finally:
        process.terminate()
        process.wait(timeout=30)
    ratio = statistics.median(through) / statistics.median(direct)
    rounds = ", ".join(f"{t / d:.2f}" for t, d in zip(through, direct))
    errors = "; ".join(sorted(e for e in socket_notes if e))
    return [
        Result("gateway req/s (project endpoint, 1 job, 2 workers)", statistics.median(through), "req/s", "-", None,
               f"median of {WRK_ROUNDS}: " + ", ".join(f"{t:.0f}" for t in through)
               + (f"; wrk socket errors: {errors}" if errors else "")),
        Result("direct uwsgi --http-socket req/s (2 processes, host)", statistics.median(direct), "req/s", "-", None,
               f"median of {WRK_ROUNDS}: " + ", ".join(f"{d:.0f}" for d in direct)),
        Result("gateway efficiency (ratio of the medians)", ratio, "", ">= 0.70", ratio >= 0.70,
               f"per round: {rounds}"),
    ]


def container_pids(client: docker.DockerClient, home: Path, project: str) -> list[int]:
    pids = []
    for container in client.containers.list(filters={"label": [f"io.mlserve.home={home}", f"io.mlserve.project={project}"]}):
        top = container.top(ps_args="-o pid,comm")
        pids += [int(row[0]) for row in top["Processes"] if "uwsgi" in row[1]]
    return pids


def proc_kb(pid: int, field_name: str, name: str = "status") -> int:
    with open(f"/proc/{pid}/{name}") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def nginx_pids(home: Path) -> list[int]:
    master = int((home / "gateway" / "nginx.pid").read_text().split()[0])
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def curl_upload(path: Path, url: str) -> float:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "-F", f"file=@{path}", url],
                         capture_output=True, text=True, timeout=120).stdout.split()
    if len(out) != 2 or out[1] != "200":
        raise BenchError(f"upload to {url} answered {out}")
    return float(out[0])


def speed(client: docker.DockerClient, work: Path) -> list[Result]:
    ms = Mlserve()
    results: list[Result] = []
    try:
        hello = work / "hello"
        shutil.copytree(APPS / "hello", hello)
        ms("run", "--mode", "serve", cwd=hello, timeout=900)  # warms the image cache
        ms("stop", "--all")

        seconds, out = ms.timed("run", "--mode", "serve", "--json", cwd=hello)
        deployed = json.loads(out)
        results.append(Result("run --mode serve to healthy (warm caches)", seconds, "s", "<= 5", seconds <= 5))

        subprocess.run(["curl", "-s", "-o", "/dev/null", deployed["project_endpoint"]], check=True)
        time.sleep(1)
        pids = container_pids(client, ms.home, "bench/projects/hello")
        rss = sum(proc_kb(pid, "VmRSS") for pid in pids) / 1024
        pss = sum(proc_kb(pid, "Pss", "smaps_rollup") for pid in pids) / 1024
        results.append(Result("idle instance RSS (master + 2 workers, summed)", rss, "MB", "<= 60", rss <= 60,
                              f"{len(pids)} processes; proportional (PSS) sum {pss:.1f} MB"))

        results += gateway_efficiency(deployed["project_endpoint"], hello)

        blob = work / "5mb.bin"
        blob.write_bytes(os.urandom(5 * 1024 * 1024))
        times = [curl_upload(blob, deployed["project_endpoint"]) for _ in range(10)]
        median = statistics.median(times)
        results.append(Result("curl -F 5 MB through the project endpoint (median of 10)", median, "s", "<= 0.15",
                              median <= 0.15, f"max {max(times):.3f} s"))

        app = hello / "app.py"
        app.write_text(app.read_text().replace("hello world", "hello again"))
        seconds, _ = ms.timed("run", "--mode", "serve", cwd=hello)
        results.append(Result("redeploy after a code-only change", seconds, "s", "<= 5", seconds <= 5))

        ms("scale", "1", "--project", "hello")
        seconds, _ = ms.timed("scale", "4", "--project", "hello")
        answering = sum(requests.get(j["endpoint"], timeout=10).status_code == 200 for j in ms.jobs().values())
        results.append(Result("scale 1 -> 4, all answering", seconds, "s", "<= 10", seconds <= 10 and answering == 4,
                              f"{answering} of 4 answer 200 afterwards"))
        ms("stop", "--all")

        upload_app = work / "upload"
        shutil.copytree(APPS / "upload", upload_app)
        deployed = json.loads(ms("run", "--mode", "serve", "--json", cwd=upload_app, timeout=900))
        big = work / "90mb.bin"
        with open(big, "wb") as handle:
            for _ in range(90):
                handle.write(os.urandom(1024 * 1024))
        pids = nginx_pids(ms.home) + container_pids(client, ms.home, "bench/projects/upload")
        before = {pid: proc_kb(pid, "VmHWM") for pid in pids}
        answer = subprocess.run(["curl", "-s", "-F", f"file=@{big}", deployed["project_endpoint"]],
                                capture_output=True, text=True, timeout=300).stdout
        if json.loads(answer)["bytes"] <= 90 * 1024 * 1024:
            raise BenchError(f"the upload app saw too few bytes: {answer}")
        growth = max((proc_kb(pid, "VmHWM") - before[pid]) / 1024 for pid in pids)
        results.append(Result("90 MB upload: largest peak-RSS growth of any process", growth, "MB", "<= 30", growth <= 30,
                              f"{len(pids)} processes: nginx master + workers, uwsgi master + workers"))
    except (BenchError, subprocess.SubprocessError, OSError, ValueError, docker.errors.DockerException) as exc:
        results.append(Result("speed benchmarks (stopped early)", None, "", "-", False, _one_line(exc)))
        traceback.print_exc()
    finally:
        ms.close()
    return results


# -- issue 3: self-healing under load and faults ---------------------------------------------------


def _container(client: docker.DockerClient, ms: Mlserve, job_id: str):
    found = client.containers.list(all=True, filters={"label": [f"io.mlserve.home={ms.home}", f"io.mlserve.job={job_id}"]})
    if not found:
        raise BenchError(f"no container labelled with job {job_id}")
    return found[0]


def _deploy(ms: Mlserve, app: Path, replicas: int) -> dict:
    """`run` then `scale N`; returns run's JSON once every job is healthy."""
    out = ms.json("run", "--mode", "serve", cwd=app)
    if replicas > 1:
        ms("scale", str(replicas), cwd=app)
    if wait_for(lambda: (jobs := ms.jobs()) and len(jobs) == replicas and all(j["healthy"] for j in jobs.values()),
                timeout=60) is None:
        raise BenchError(f"{replicas} healthy jobs expected, status says: {ms.jobs()}")
    return out


def kill_9_one_of_three(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = _deploy(ms, app, 3)
    container = _container(client, ms, out["id"])
    with Load(out["project_endpoint"]) as load:
        time.sleep(2)
        container.kill(signal="SIGKILL")
        back = wait_for(lambda: (j := ms.jobs()[out["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
        time.sleep(2)
    served = {requests.get(out["project_endpoint"], timeout=10).json()["job"] for _ in range(12)}
    return [
        failed_requests("(a) kill -9 of 1 of 3 instances under GET load: failed requests", load),
        Result("(a) ... seconds until the killed job is healthy again", back, "s", "<= 15", back is not None and back <= 15,
               "restarts >= 1 and healthy in `mlserve status --json`; "
               + ("back in the project's round robin" if out["job"] in served else "NOT served by the project endpoint after")),
    ]


def hanging_health_path(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    sick = _deploy(ms, app, 2)
    answer = requests.post(sick["endpoint"] + "/sick", timeout=10)
    if answer.json() != {"sick": True}:
        raise BenchError(f"POST /sick answered {answer.status_code} {answer.text[:200]}")
    started = time.monotonic()
    seen: dict[str, float] = {}
    with Load(sick["project_endpoint"]) as load:
        while time.monotonic() - started < 75 and "back" not in seen:
            job = ms.jobs()[sick["job"]]
            routed = sick["id"] in project_upstream(ms.gateway_conf())
            now = time.monotonic() - started
            if "unhealthy" not in seen and not job["healthy"]:
                seen["unhealthy"] = now
            if "unrouted" not in seen and not routed:
                seen["unrouted"] = now
            if "unrouted" in seen and job["healthy"] and job["restarts"] >= 1 and routed:
                seen["back"] = now
            time.sleep(0.25)
        time.sleep(1)
    out_s = max(seen["unhealthy"], seen["unrouted"]) if "unhealthy" in seen and "unrouted" in seen else None
    back_s = seen.get("back")
    return [
        Result("(b) health path hangs: seconds until out of rotation", out_s, "s", "<= 10", out_s is not None and out_s <= 10,
               f"`healthy` false after {seen.get('unhealthy', float('nan')):.1f}s, gone from the project upstream "
               f"after {seen.get('unrouted', float('nan')):.1f}s (from POST /sick)"),
        Result("(b) ... seconds until restarted and back in rotation", back_s, "s", "-", back_s is not None,
               "restarts >= 1, healthy, in the project upstream again"),
        failed_requests("(b) ... failed requests on the project endpoint meanwhile", load),
    ]


def scale_down_and_stop(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = _deploy(ms, app, 3)
    with Load(out["project_endpoint"]) as load:
        time.sleep(1)
        down, _ = ms.timed("scale", "1", cwd=app)
        time.sleep(1)
        remaining = list(ms.jobs())
        ms("scale", "--add", "1", cwd=app)
        stop, _ = ms.timed("stop", remaining[0])
        time.sleep(1)
    left = len(ms.jobs())
    return [failed_requests("(c) scale 3 -> 1, scale --add 1, stop the older job, under GET load: failed requests", load),
            Result("(c) ... seconds for scale 3 -> 1 / for stop (draining included)", down, "s", "-", None,
                   f"stop took {stop:.2f}s; {left} job(s) left (1 expected)")]


def twenty_concurrent_commands(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    _deploy(ms, app, 1)
    commands = [["scale", str(n % 4 + 1)] if n % 3 else ["run", "--mode", "serve"] for n in range(20)]
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "mlserve", *args], cwd=app, env=ms.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in commands]
    failures = []
    for args, proc in zip(commands, procs):
        try:
            _, err = proc.communicate(timeout=max(1, COMMAND_TIMEOUT_S * 2 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"   mlserve {' '.join(args)} exited {proc.returncode}:\n{err[-1500:]}", flush=True)
            failures.append(f"{' '.join(args)}: {err.strip().splitlines()[-1:] if err.strip() else proc.returncode}")
    wall = time.monotonic() - started

    def agreement() -> tuple[bool, str]:
        jobs = ms.json("status")
        ids = {j["id"] for j in jobs}
        containers = client.containers.list(all=True, filters={"label": f"io.mlserve.home={ms.home}"})
        labelled = {c.labels.get("io.mlserve.job") for c in containers}
        conf = ms.gateway_conf()
        routed = job_upstreams(conf)
        upstream = project_upstream(conf)
        in_project = {i for i in ids if i in upstream}
        healthy = {j["id"] for j in jobs if j["healthy"]}
        numbers = [int(j["job"].rsplit("/", 1)[1]) for j in ms.json("status", "--all")]
        ok = (ids == labelled == routed and in_project == healthy == ids
              and all(c.status == "running" for c in containers) and len(numbers) == len(set(numbers)))
        text = (f"{len(ids)} jobs in the state, {len(labelled)} labelled containers "
                f"({sum(c.status == 'running' for c in containers)} running), {len(routed)} job routes, "
                f"{len(in_project)} in the project upstream, {len(healthy)} healthy, "
                f"{sum(j['runtime'] != 'docker' for j in jobs)} not on Docker; job numbers unique: "
                f"{len(numbers) == len(set(numbers))}")
        return ok, text

    agree, text = agreement()
    settled = wait_for(lambda: agreement()[0], timeout=30, interval=1) if not agree else 0.0
    if not agree:
        text += f"; after {settled:.0f}s more: agree" if settled is not None else "; still not after 30 s: " + agreement()[1]
    return [
        Result("(d) 20 concurrent scale/run on one project: wall time", wall, "s", "-", None,
               f"{len(procs) - len(failures)} of 20 commands exited 0" + (f"; {failures[:2]}" if failures else "")),
        Result("(d) ... commands that failed", len(failures), "commands", "0", not failures),
        Result("(d) ... state, labelled containers and gateway routes agree right after", float(agree), "yes/no", "yes",
               agree, text),
    ]


def engine_restart(client: docker.DockerClient, ms: Mlserve, app: Path) -> list[Result]:
    out = _deploy(ms, app, 2)
    pid = int(Path("/var/run/docker.pid").read_text())
    stopping = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=90) is None:
        raise BenchError(f"dockerd {pid} did not exit within 90 s of SIGTERM")
    down = time.monotonic() - stopping
    start = subprocess.run([sys.executable, "-c", "from mlserve import host; host.ensure_engine(print)"],
                           capture_output=True, text=True, timeout=180)
    if start.returncode != 0:
        raise BenchError(f"the engine did not start again:\n{start.stdout}\n{start.stderr}")
    up = time.monotonic()

    def all_back() -> bool:
        jobs = ms.jobs()
        return len(jobs) == 2 and all(j["healthy"] and j["restarts"] >= 1 for j in jobs.values())

    routes = wait_for(lambda: requests.get(out["project_endpoint"], timeout=5).status_code == 200, timeout=120)
    healthy = None
    if wait_for(all_back, timeout=max(1, 120 - (time.monotonic() - up)), interval=0.5) is not None:
        healthy = time.monotonic() - up
    endpoint = requests.get(out["endpoint"], timeout=10).status_code
    jobs = ms.jobs()
    return [
        Result("(e) Docker engine restart: seconds until the project endpoint answers 200", routes, "s", "-",
               routes is not None, f"from the engine answering again; dockerd took {down:.1f}s to stop and "
               f"{up - stopping - down:.1f}s to start"),
        Result("(e) ... seconds until every job is healthy again", healthy, "s", "-", healthy is not None,
               f"restarts: {[j['restarts'] for j in jobs.values()]}; the job endpoint answers {endpoint}"),
    ]


def self_healing(client: docker.DockerClient, work: Path, with_engine_restart: bool) -> list[Result]:
    healing = work / "healing"
    shutil.copytree(HEALING_APP, healing)
    warm = Mlserve()
    try:
        warm("run", "--mode", "serve", cwd=healing, timeout=900)  # builds the image once (flask from PyPI)
    finally:
        warm.close()
    scenarios = [kill_9_one_of_three, hanging_health_path, scale_down_and_stop, twenty_concurrent_commands]
    if with_engine_restart:
        scenarios.append(engine_restart)
    results: list[Result] = []
    for scenario in scenarios:
        ms = Mlserve()
        started = time.monotonic()
        print(f"-- {scenario.__name__}", flush=True)
        try:
            results += scenario(client, ms, healing)
        except Exception as exc:  # noqa: BLE001 - one scenario failing must not lose the others' numbers
            traceback.print_exc()
            results.append(Result(f"{scenario.__name__} (did not complete)", None, "", "-", False, _one_line(exc)))
        finally:
            if scenario is engine_restart:
                client = docker.from_env()  # the old client's connections died with the engine
            ms.close()
        print(f"   {time.monotonic() - started:.0f}s", flush=True)
    return results


# -- report -----------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    docker_version = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                    capture_output=True, text=True).stdout.strip()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    return (f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), {memory} GiB, Python {platform.python_version()}, "
            f"Docker {docker_version or '?'}, {nginx}")


def _others(client: docker.DockerClient, homes: set[str]) -> int:
    try:
        return sum(1 for c in client.containers.list() if c.labels.get("io.mlserve.home") not in homes)
    except docker.errors.DockerException:
        return -1


def table(results: list[Result], carried: list[str] = ()) -> str:
    lines = ["| benchmark | measured | target | met | notes |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.cell()} | {r.target} | {r.met()} | {r.note.replace('|', '/')} |")
    return "\n".join([*lines, *carried])


def _sections_text(old: str, sections: list[Section], engine_restarted: bool) -> list[str]:
    """Every section, in order; what this run did not measure is kept from the previous RESULTS.md, marked so."""
    when = re.search(r"Measured (.+?) on ", old)
    since = f"carried over from the run of {when.group(1) if when else 'an earlier date'}"
    measured = {s.title: s for s in sections}
    texts = []
    for title in (SPEED, HEALING):
        section = measured.get(title)
        if section is None:
            block = re.search(rf"## {re.escape(title)}\n\n(.*?)(?=\n## |\n{re.escape(NOTES_MARKER)}|\Z)", old, re.S)
            if block:
                text = block.group(1).strip()
                texts.append(f"## {title}\n\n" + (text if text.startswith("(carried over") else f"({since})\n\n{text}"))
            continue
        carried = []
        if title == HEALING and not engine_restarted:
            for row in old.splitlines():
                if row.startswith("| (e)"):
                    carried.append(row if "carried over" in row else row[:-2] + f" ({since} with --engine-restart) |")
        texts.append(f"## {title}\n\n{table(section.results, carried)}")
    return texts


def report(sections: list[Section], context: str, engine_restarted: bool) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    body = "\n\n".join(_sections_text(old, sections, engine_restarted))
    print(body)
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    RESULTS.write_text(f"# Benchmark results\n\n{context}\n\n{body}\n\n{NOTES_MARKER}{notes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-restart", action="store_true",
                        help="also restart the Docker engine (disturbs every container on this machine)")
    parser.add_argument("--only", choices=["speed", "healing"], help="run one section only")
    args = parser.parse_args()

    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    started = time.gmtime()
    load_before = os.getloadavg()
    others = _others(client, set())
    machine = _machine()
    sections: list[Section] = []
    try:
        if args.only in (None, "speed"):
            sections.append(Section(SPEED, speed(client, work)))
        if args.only in (None, "healing"):
            sections.append(Section(HEALING, self_healing(client, work, args.engine_restart)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    context = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', started)} on {machine}.\n\n"
        f"Load: wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s (x{WRK_ROUNDS}, interleaved) for throughput; "
        f"4 Python threads of sequential GETs for the fault scenarios; loopback only, every load bounded in time. "
        f"Command: `python3 bench/run.py{' --engine-restart' if args.engine_restart else ''}`.\n\n"
        f"The machine was shared: load average {load_before[0]:.1f} at the start and {load_after[0]:.1f} at the end, "
        f"{others} other containers running when it began."
    )
    report(sections, context, args.engine_restart)
    return 0 if all(r.ok is not False for s in sections for r in s.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
