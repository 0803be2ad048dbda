"""Liveness apart from readiness: the uWSGI master's stats judged (busy is not sick), the stats client,
the supervisor that neither probes nor restarts a busy job, and out-of-memory kills counted and shown."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlserve import supervisor as supervisor_module
from mlserve.config import HealthPolicy, Limits
from mlserve.constants import RESTART_AFTER_FAILURES, STATS_SOCKET_NAME
from mlserve.home import Home
from mlserve.platform import Platform
from mlserve.reconcile import Observation, Plan
from mlserve.routing import STOPPED_BY_USER
from mlserve.runtimes import InstanceState
from mlserve.runtimes.docker import DockerRuntime, oom_kills_of
from mlserve.spec import Artifact, JobSpec
from mlserve.state import Job
from mlserve.views import JobView
from mlserve_runtime.health import LOAD_GRACE_S, ProbeResult, judge, liveness, main, read_stats

NOW = 1_795_488_200.0
TIMEOUT_S, PROBE_TIMEOUT_S = 60, 2.0


def _worker(wid: int, *, request: list[str] | None = None, started: float = NOW - 5, accepting: int = 1,
            spawned: float = NOW - 3600, respawn_count: int = 1, pid: int | None = None) -> dict[str, Any]:
    """A worker as uWSGI 2.0.30's stats server shows it (``request``: the vars of its current request)."""
    core: dict[str, Any] = {"id": 0, "requests": 3, "in_request": 0, "vars": [], "req_info": {}}
    if request is not None:
        core.update(in_request=1, vars=[*request, ""], req_info={"request_start": int(started)})
    return {"id": wid, "pid": 100 + wid if pid is None else pid, "accepting": accepting, "requests": 3,
            "status": "busy" if request is not None else "idle", "last_spawn": int(spawned),
            "respawn_count": respawn_count, "harakiri_count": 0, "cores": [core]}


CLIENT = ["REQUEST_METHOD=GET", "PATH_INFO=/sleep", "QUERY_STRING=s=25", "HTTP_HOST=127.0.0.1"]
PROBE = ["REQUEST_METHOD=GET", "PATH_INFO=/", "REQUEST_URI=/_mlserve/health", "MLSERVE_HEALTH=1"]


def _stats(*workers: dict[str, Any]) -> dict[str, Any]:
    return {"version": "2.0.30", "listen_queue": 0, "pid": 1, "workers": list(workers)}


def _judge(*workers: dict[str, Any]):
    return judge(_stats(*workers), NOW, TIMEOUT_S, PROBE_TIMEOUT_S)


# -- the master's stats, judged ------------------------------------------------------------------


def test_every_worker_in_a_clients_request_inside_the_timeout_is_busy():
    life = _judge(_worker(1, request=CLIENT, started=NOW - 12), _worker(2, request=CLIENT, started=NOW - 3))
    assert life.alive and life.busy
    assert life.detail == "2 of 2 workers busy, the longest request for 12s"


def test_an_idle_worker_means_a_failed_probe_is_not_explained_by_load():
    life = _judge(_worker(1, request=CLIENT), _worker(2))
    assert life.alive and not life.busy and not life.stuck and life.detail == "1 of 2 workers idle"


def test_a_worker_past_the_timeout_is_stuck_not_busy():
    life = _judge(_worker(1, request=CLIENT, started=NOW - 63), _worker(2, request=CLIENT))
    assert life.alive and not life.busy and life.stuck
    assert life.detail == "worker 1 in a request for 63s (limit 60s)"


def test_a_health_check_that_hangs_is_sick_but_one_just_picked_up_is_not():
    hanging = _judge(_worker(1, request=PROBE, started=NOW - 3), _worker(2, request=CLIENT))
    assert not hanging.busy and hanging.detail == "worker 1 in a health check for 3s (limit 2s)"
    # A probe that waited behind the clients' requests and was just picked up: the worker was busy until now.
    fresh = _judge(_worker(1, request=PROBE, started=NOW), _worker(2, request=CLIENT))
    assert fresh.busy


def test_a_worker_loading_the_app_is_starting_until_the_grace_is_over():
    loading = _judge(_worker(1, accepting=0, spawned=NOW - 5, respawn_count=2), _worker(2, request=CLIENT))
    assert loading.busy and loading.respawns == 1
    assert loading.detail == "2 of 2 workers busy, 1 loading the app, the longest request for 5s"
    late = _judge(_worker(1, accepting=0, spawned=NOW - LOAD_GRACE_S - 10), _worker(2, request=CLIENT))
    assert not late.busy and "loading the app" in late.detail


def test_a_master_without_workers_is_not_alive_and_garbage_is_not_busy():
    assert not _judge().alive
    assert not _judge(_worker(1, pid=0)).alive
    odd = judge({"workers": [{"pid": "1", "cores": "x"}, 7, {"pid": True}]}, NOW, TIMEOUT_S, PROBE_TIMEOUT_S)
    assert not odd.alive and not odd.busy
    assert not judge({"workers": "all of them"}, NOW, TIMEOUT_S, PROBE_TIMEOUT_S).busy


# -- the stats client ----------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    path = Path(tempfile.mkdtemp(prefix="mlst", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class StatsServer:
    """A stand-in for a uWSGI master's stats socket: sends ``answer`` in small pieces, then closes
    (or, with ``close=False``, keeps the connection open without ending the answer)."""

    def __init__(self, path: Path, answer: bytes, close: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.answer, self.close = answer, close
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                try:
                    for i in range(0, len(self.answer), 4096):
                        conn.sendall(self.answer[i:i + 4096])
                except OSError:  # the reader gave up: an answer too long
                    continue
                if not self.close:
                    self.stopping.wait(10)

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()


@pytest.fixture
def serve_stats(short_dir) -> Iterator[Any]:
    servers: list[StatsServer] = []

    def start(answer: bytes, path: Path | None = None, close: bool = True) -> Path:
        path = path or short_dir / "stats.sock"
        servers.append(StatsServer(path, answer, close))
        return path

    yield start
    for server in servers:
        server.stop()


def test_read_stats_reads_json_until_the_master_closes(serve_stats):
    stats = _stats(*(_worker(i, request=CLIENT) for i in range(1, 65)))  # 64 workers: many reads
    path = serve_stats(json.dumps(stats).encode())
    assert read_stats(str(path)) == stats


def test_read_stats_gives_up_on_a_master_that_never_finishes(serve_stats):
    path = serve_stats(b'{"workers": [', close=False)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_stats(str(path), timeout=0.5)
    assert time.monotonic() - started < 2


def test_liveness_of_a_master_that_is_gone_or_answers_nonsense(serve_stats, short_dir):
    gone = liveness(str(short_dir / "nothing.sock"), TIMEOUT_S, PROBE_TIMEOUT_S)
    assert not gone.alive and not gone.busy and "does not answer" in gone.detail
    for answer in (b"not json", b"[1, 2]", b'"\x1b[31m"', b" " * (9 << 20)):
        path = serve_stats(answer, short_dir / f"s{len(answer)}-{answer[:1].hex()}.sock")
        life = liveness(str(path), TIMEOUT_S, PROBE_TIMEOUT_S)
        assert not life.alive and not life.busy and "\x1b" not in life.detail


# -- the exec probe in a pod: python -m mlserve_runtime.health live ----------------------------------


def _live(path: Path, *more: str) -> list[str]:
    return ["live", "--stats", str(path), "--timeout-s", str(TIMEOUT_S), "--probe-timeout", str(PROBE_TIMEOUT_S),
            *more]


def test_live_passes_an_idle_or_busy_instance_and_fails_a_stuck_or_silent_one(serve_stats, short_dir, capsys):
    now = time.time()
    busy = serve_stats(json.dumps(_stats(_worker(1, request=CLIENT, started=now - 20),
                                         _worker(2, request=CLIENT, started=now))).encode(), short_dir / "busy.sock")
    idle = serve_stats(json.dumps(_stats(_worker(1, request=CLIENT, started=now), _worker(2))).encode(),
                       short_dir / "idle.sock")
    assert main(_live(busy)) == 0 and main(_live(idle)) == 0
    assert capsys.readouterr().out == ""  # a passing check says nothing
    stuck = serve_stats(json.dumps(_stats(_worker(1, request=CLIENT, started=now - 63), _worker(2))).encode(),
                        short_dir / "stuck.sock")
    assert main(_live(stuck)) == 1
    assert re.fullmatch(r"worker 1 in a request for 6[34]s \(limit 60s\)\n", capsys.readouterr().out)
    # The request timeout is the instance's: the same stats under a longer one are busy, not stuck.
    assert main(["live", "--stats", str(stuck), "--timeout-s", "120"]) == 0
    hung_probe = serve_stats(json.dumps(_stats(_worker(1, request=PROBE, started=now - 3))).encode(),
                             short_dir / "probe.sock")
    assert main(_live(hung_probe)) == 1 and "in a health check" in capsys.readouterr().out
    assert main(["live", "--stats", str(hung_probe), "--timeout-s", "60", "--probe-timeout", "5"]) == 0
    no_workers = serve_stats(json.dumps(_stats(_worker(1, pid=0))).encode(), short_dir / "none.sock")
    assert main(_live(no_workers)) == 1 and capsys.readouterr().out == "the uWSGI master has no workers\n"
    assert main(_live(short_dir / "gone.sock")) == 1
    out = capsys.readouterr().out
    assert out.startswith("the uWSGI master does not answer (FileNotFoundError") and out.count("\n") == 1
    garbage = serve_stats(b'"\x1b[31m\nred"', short_dir / "garbage.sock")
    assert main(_live(garbage)) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out[:-1].isprintable()


@pytest.mark.parametrize("argv", [
    [], ["alive"], ["live", "--timeout-s", "60"], ["live", "--stats", "/x"], ["live", "--stats", "/x", "--timeout-s", "0"],
    ["live", "--stats", "/x", "--timeout-s", "nan"], ["live", "--stats", "/x", "--timeout-s", "60", "--socket", "/y"],
])
def test_live_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


# -- the supervisor with a busy job ----------------------------------------------------------------


def _job(n: int, runtime: str = "local", timeout_s: int = TIMEOUT_S, memory: int = 128 << 20) -> Job:
    spec = JobSpec(runtime=runtime, artifact=Artifact("img"), project_dir="/p", timeout_s=timeout_s,
                   limits=Limits(memory_bytes=memory), health=HealthPolicy(interval_s=0.01))
    return Job(id=f"job{n}".ljust(22, "x"), owner="o", project="p", number=n, state="running", healthy=True,
               handle=f"h{n}", spec=spec, started_at=time.time() - 10)


@dataclass
class Supervised:
    sup: supervisor_module.Supervisor
    job: Job
    lines: list[str]  # what it logged
    instance: dict[str, InstanceState]  # "now": what its next round sees running for the job


@pytest.fixture
def supervised(short_dir, monkeypatch) -> Supervised:
    """A supervisor over one job (in the rotation) whose round sees what the test says runs."""
    platform = Platform(Home(short_dir), report=lambda _: None)
    platform.state.set_setting(STOPPED_BY_USER, "1")  # no gateway in this unit test
    job = _job(1)
    platform.state.add_job(job)
    sup = supervisor_module.Supervisor(platform)
    lines: list[str] = []
    monkeypatch.setattr(sup, "log", lines.append)
    monkeypatch.setattr(sup.platform.gateway, "cap_logs", lambda max_bytes: [])
    instance = {"now": InstanceState(job.id, "h1", True, "running", runtime="local")}

    def converge(problems: list[str]) -> tuple[Observation, Plan]:
        jobs = platform.state.jobs(active_only=True)
        return Observation(jobs, {job.id: instance["now"]}, {}, time.time()), Plan()

    monkeypatch.setattr(sup.reconciler, "converge", converge)
    return Supervised(sup, job, lines, instance)


def _rounds(supervised: Supervised, n: int) -> None:
    for _ in range(n):
        supervised.sup.tick()
        time.sleep(0.02)


def test_the_supervisor_neither_probes_nor_restarts_a_job_whose_workers_are_all_busy(supervised, serve_stats,
                                                                                      monkeypatch):
    sup, job = supervised.sup, supervised.job
    now = time.time()
    stats = _stats(_worker(1, request=CLIENT, started=now - 20), _worker(2, request=CLIENT, started=now))
    serve_stats(json.dumps(stats).encode(), sup.platform.home.run_dir(job.id) / STATS_SOCKET_NAME)
    probes: list[str] = []

    def probe(socket_path: str, timeout: float) -> ProbeResult:
        probes.append(socket_path)
        return ProbeResult(False, None, "TimeoutError: timed out")

    monkeypatch.setattr(supervisor_module, "probe", probe)
    monkeypatch.setattr(sup, "_restart", lambda *args: pytest.fail("a busy job was restarted"))
    _rounds(supervised, RESTART_AFTER_FAILURES * 3)
    assert probes == []  # it would only have waited in the queue behind the clients' requests
    current = sup.platform.state.get_job(job.id)
    assert current.healthy and current.restarts == 0 and current.reason is None
    busy = [line for line in supervised.lines if "busy, not sick" in line]
    assert len(busy) == 1 and re.fullmatch(  # once a spell, not every check
        rf"{job.name}: busy, not sick \(2 of 2 workers busy, the longest request for 2[01]s\); not probed while every "
        "worker is busy, never restarted for it", busy[0]), busy


def test_the_supervisor_counts_a_probe_that_times_out_next_to_an_idle_worker(supervised, serve_stats, monkeypatch):
    sup, job = supervised.sup, supervised.job
    stats = _stats(_worker(1, request=CLIENT, started=time.time() - 20), _worker(2))
    serve_stats(json.dumps(stats).encode(), sup.platform.home.run_dir(job.id) / STATS_SOCKET_NAME)
    monkeypatch.setattr(supervisor_module, "probe", lambda path, timeout: ProbeResult(False, None, "timed out"))
    _rounds(supervised, 3)
    current = sup.platform.state.get_job(job.id)
    assert not current.healthy and current.reason == "health check failed 2x: timed out; 1 of 2 workers idle"


def test_the_supervisor_logs_out_of_memory_kills_once_each(supervised, monkeypatch):
    job = supervised.job
    monkeypatch.setattr(supervisor_module, "probe", lambda path, timeout: ProbeResult(True, 200, "ok"))

    def seen(kills: int | None) -> None:
        supervised.instance["now"] = InstanceState(job.id, "h1", True, "running", runtime="local", oom_kills=kills)
        _rounds(supervised, 2)

    def oom_lines() -> list[str]:
        return [line for line in supervised.lines if "out of memory" in line]

    seen(0)
    seen(None)
    assert oom_lines() == []
    seen(1)
    assert oom_lines() == [f"{job.name}: out of memory: the kernel killed 1 process(es) of the instance at its "
                           "128 MiB memory limit (1 since the instance started); a killed worker's request fails "
                           "and uWSGI starts the worker again"]
    seen(3)
    assert len(oom_lines()) == 2 and "killed 2 process(es)" in oom_lines()[-1]
    seen(1)  # a new instance since: its own count
    assert len(oom_lines()) == 3 and "killed 1 process(es)" in oom_lines()[-1]


# -- out-of-memory kills, from the container's memory cgroup -----------------------------------------


CONTAINER = "c0ffee" * 10 + "abcd"


@pytest.mark.parametrize("relative, text", [
    (f"memory/docker/{CONTAINER}/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),  # v1
    (f"system.slice/docker-{CONTAINER}.scope/memory.events",  # v2, systemd driver
     "low 0\nhigh 0\nmax 12\noom 3\noom_kill 3\noom_group_kill 0\n"),
    (f"docker/{CONTAINER}/memory.events", "oom 4\noom_kill 3\n"),  # v2, cgroupfs driver
])
def test_oom_kills_are_read_from_the_containers_memory_cgroup(tmp_path, relative, text):
    (tmp_path / relative).parent.mkdir(parents=True)
    (tmp_path / relative).write_text(text)
    assert oom_kills_of(CONTAINER, None, root=tmp_path) == 3
    assert oom_kills_of("f" * 64, None, root=tmp_path) is None


def test_oom_kills_follow_the_cgroup_the_process_is_in_but_never_the_root(tmp_path):
    # This process stands in for the container's: wherever its memory cgroup is, its count is read.
    lines = Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines()
    memory = next((line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(",")), None)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.oom_control").write_text("oom_kill 999\n")  # the whole machine's
    if memory and memory.strip("/"):
        counter = tmp_path / "memory" / memory.strip("/") / "memory.oom_control"
        counter.parent.mkdir(parents=True)
        counter.write_text("oom_kill 2\n")
        assert oom_kills_of("f" * 64, os.getpid(), root=tmp_path) == 2
    assert oom_kills_of("f" * 64, 2 ** 22 + 1, root=tmp_path) is None  # no such process: never the root's


class _Container:
    def __init__(self, state: dict[str, Any]) -> None:
        self.id, self.labels, self.attrs = CONTAINER, {"io.mlserve.job": "j" * 22}, {"State": state}


def test_a_container_the_kernel_ended_for_memory_says_so(monkeypatch):
    runtime = DockerRuntime(None, Home(Path("/nonexistent")))  # type: ignore[arg-type]
    ended = runtime._state(_Container({"Running": False, "ExitCode": 137, "OOMKilled": True}))
    assert ended.status == "exited (137), out of memory" and ended.oom_kills == 1
    monkeypatch.setattr("mlserve.runtimes.docker.oom_kills_of", lambda container_id, pid: 2 if pid == 42 else None)
    running = runtime._state(_Container({"Running": True, "Pid": 42, "StartedAt": "2026-01-01T00:00:00.5Z"}))
    assert running.running and running.oom_kills == 2


def test_status_and_info_carry_the_oom_kills_of_the_instance():
    job = _job(1, runtime="docker")
    view = JobView.of(job, InstanceState(job.id, "h1", True, "running", oom_kills=2), "http://x/serve/1")
    assert view.healthy and view.as_dict()["oom_kills"] == 2
    assert JobView.of(job, InstanceState(job.id, "h1", True, "running"), "u").as_dict()["oom_kills"] is None
