"""The supervisor keeps serving jobs healthy while no mlserve command runs.

One background process per MLSERVE_HOME, started with the gateway. Every few seconds it checks
each running instance over its uwsgi socket; a job joins its project's rotation after a passing
check and leaves it after a few failures; a dead or persistently failing instance is restarted
with backoff, and a job that keeps failing becomes ``failed``. Jobs past their maximum runtime
are drained and stopped. If nginx itself died, the routes are restored from the state.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mlserve.constants import (
    HEALTH_FAILURES,
    HEALTH_INTERVAL_S,
    HEALTH_TIMEOUT_S,
    HEALTHY_SPELL_S,
    MAX_RESTART_STREAK,
    RESTART_AFTER_FAILURES,
)
from mlserve.errors import MlserveError
from mlserve.health import probe
from mlserve.home import Home
from mlserve.jobs import START_TIMEOUT_S, JobService
from mlserve.platform import Platform
from mlserve.state import Job

PIDFILE = "supervisor.pid"
LOGFILE = "supervisor.log"
HEARTBEAT = "supervisor.heartbeat"


@dataclass
class Watch:
    """What the supervisor remembers of one job between checks."""

    failures: int = 0  # consecutive failed checks
    streak: int = 0  # restarts since the last healthy spell
    next_check: float = 0.0
    not_before: float = 0.0  # backoff: no restart before this
    healthy_since: float | None = None


class Supervisor:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.service = JobService(platform)
        self.state = platform.state
        self.watches: dict[str, Watch] = {}

    def log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)

    # -- one round ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Check every running job once (those due), and act on what was found."""
        now = time.time()
        jobs = self.state.jobs(active_only=True)
        self.watches = {job.id: self.watches.get(job.id, Watch()) for job in jobs}
        if jobs and not self.platform.gateway.is_running():
            self.log("the gateway was not running; restoring its routes from the state")
            with self.state.lock():
                self.service.apply_routes()
        flips: dict[str, tuple[bool, str | None]] = {}
        for job in jobs:
            if job.state == "starting" and now - job.created_at > START_TIMEOUT_S + 60:
                self._fail(job, "it never became healthy (the command starting it went away)")
                continue
            if job.state != "running":
                continue
            watch = self.watches[job.id]
            expires = job.settings.get("max_runtime_s") or 0
            if expires and job.started_at and now >= job.started_at + expires:
                self._expire(job)
                continue
            if now < watch.next_check:
                continue
            health = job.settings.get("health") or {}
            watch.next_check = now + float(health.get("interval") or HEALTH_INTERVAL_S)
            flip = self._check(job, watch, health)
            if flip is not None:
                flips[job.id] = flip
        if flips:
            self._set_health(flips)

    def _check(self, job: Job, watch: Watch, health: dict) -> tuple[bool, str | None] | None:
        """Probe one job; returns (healthy, reason) when its rotation membership should change."""
        socket = str(self.platform.home.socket(job.id))
        result = probe(socket, timeout=float(health.get("timeout") or HEALTH_TIMEOUT_S))
        now = time.time()
        if result.ok:
            watch.failures = 0
            watch.healthy_since = watch.healthy_since or now
            if now - watch.healthy_since >= HEALTHY_SPELL_S:
                watch.streak = 0
            return None if job.healthy else (True, None)
        watch.failures += 1
        watch.healthy_since = None
        reason = f"health check failed {watch.failures}x: {result.detail[:200] or result.status}"
        instance = self.platform.runtime(job.runtime).inspect(job.id, job.handle)
        if not instance.running:
            self._restart(job, watch, f"instance {instance.status}")
            return None
        if watch.failures >= RESTART_AFTER_FAILURES:
            self._restart(job, watch, reason)
            return None
        if job.healthy and watch.failures >= int(health.get("failures") or HEALTH_FAILURES):
            self.log(f"{job.name}: out of rotation ({reason})")
            return (False, reason)
        return None

    def _set_health(self, flips: dict[str, tuple[bool, str | None]]) -> None:
        with self.state.lock():
            for job_id, (healthy, reason) in flips.items():
                current = self.state.get_job(job_id)
                if current is None or current.state != "running":
                    continue  # a command stopped it meanwhile
                self.state.update_job(job_id, healthy=healthy, reason=reason)
                if healthy:
                    self.log(f"{current.name}: healthy, in rotation")
            self.service.apply_routes()

    def _restart(self, job: Job, watch: Watch, why: str) -> None:
        now = time.time()
        if now < watch.not_before:
            return
        with self.state.lock():
            current = self.state.get_job(job.id)
            if current is None or current.state != "running":
                return
            if watch.streak >= MAX_RESTART_STREAK:
                self._fail(current, f"restarted {watch.streak} times without recovering; last: {why}")
                return
            self.log(f"{job.name}: restarting ({why})")
            self.state.update_job(job.id, healthy=False, reason=f"restarting: {why}")
            self.service.apply_routes()
            try:
                handle = self.platform.runtime(job.runtime).restart(self.service.spec(current), current.handle)
            except MlserveError as exc:
                self.log(f"{job.name}: restart failed: {exc.message}")
                handle = current.handle
            watch.streak += 1
            watch.failures = 0
            watch.not_before = now + min(2 ** watch.streak, 60)
            watch.next_check = now + 1
            self.state.update_job(job.id, handle=handle, restarts=current.restarts + 1, started_at=time.time())

    def _fail(self, job: Job, reason: str) -> None:
        self.log(f"{job.name}: failed: {reason}")
        with self.state.lock():  # re-entrant: callers may hold it already
            self.service.fail(job, reason)

    def _expire(self, job: Job) -> None:
        self.log(f"{job.name}: its maximum runtime is over; draining and stopping it")
        with self.state.lock():
            current = self.state.get_job(job.id)
            if current is not None and current.state == "running":
                self.service.stop_locked([current], reason="maximum runtime reached")


# -- the process ---------------------------------------------------------------------------------


def _pidfile(home: Home) -> Path:
    return home.gateway_dir / PIDFILE


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of mlserve's own code: a supervisor started by older code is replaced after an upgrade."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _running(home: Home) -> tuple[int, str] | None:
    """(pid, code fingerprint) of the supervisor running for this home."""
    try:
        value, _, fingerprint = _pidfile(home).read_text().strip().partition(" ")
        cmdline = Path(f"/proc/{int(value)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return (int(value), fingerprint) if b"mlserve.supervisor" in cmdline else None


def pid(home: Home) -> int | None:
    """The running supervisor's pid for this home, or None."""
    running = _running(home)
    return running[0] if running else None


def heartbeat_age(home: Home) -> float | None:
    """Seconds since the supervisor's last round, or None if it never ran."""
    try:
        return time.time() - (home.gateway_dir / HEARTBEAT).stat().st_mtime
    except OSError:
        return None


def ensure_running(home: Home) -> int | None:
    """Start the supervisor for ``home`` unless it runs; returns the new pid, or None if it ran already.

    One started by other code (mlserve was upgraded meanwhile) is replaced.
    """
    running = _running(home)
    if running is not None and running[1] == code_fingerprint():
        return None
    if running is not None:
        stop(home)
    home.gateway_dir.mkdir(parents=True, exist_ok=True)
    with open(home.gateway_dir / LOGFILE, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlserve.supervisor"],
            env={**os.environ, "MLSERVE_HOME": str(home.root)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd="/",
        )
    deadline = time.monotonic() + 5
    while pid(home) != process.pid and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    return process.pid


def stop(home: Home, timeout: float = 10) -> bool:
    """Stop the supervisor; False if it was not running."""
    value = pid(home)
    if value is None:
        return False
    os.kill(value, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid(home) == value and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def main() -> int:
    home = Home.from_env()
    pidfile = _pidfile(home)
    pidfile.write_text(f"{os.getpid()} {code_fingerprint()}")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    platform = Platform(home, report=lambda message: print(message, flush=True))
    supervisor = Supervisor(platform)
    supervisor.log(f"supervisor {os.getpid()} watching {home.root}")
    while not stopping and home.db.exists():
        try:
            supervisor.tick()
        except MlserveError as exc:
            supervisor.log(f"round failed: {exc.message}")
            platform.__dict__.pop("docker", None)  # reconnect next round (the engine may be restarting)
        except Exception:  # noqa: BLE001 - the supervisor must outlive any one bad round
            supervisor.log("round failed:\n" + traceback.format_exc())
        (home.gateway_dir / HEARTBEAT).touch()
        time.sleep(0.5)
    supervisor.log("supervisor stopping")
    if pid(home) == os.getpid():
        pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
