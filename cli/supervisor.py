"""The supervisor keeps serving jobs healthy while no mlserve command runs.

One background process per MLSERVE_HOME (``daemons`` starts and stops it). Each round it runs
the reconcile step (undoing what killed commands left, expiring jobs, removing strays, routing
dead instances out), then checks every running instance: its uWSGI master's stats (alive? busy?)
and, unless every worker is busy, a probe over its uwsgi socket (ready?). A job joins its
project's rotation after a passing check and leaves it after a few failures; a busy job keeps its
place and is never restarted for being busy; a dead or persistently failing instance is restarted
with backoff, and a job that keeps failing becomes ``failed``. Processes the kernel killed for
memory are logged. If nginx died, its routes are restored. A failure with one job is logged and
reported in the heartbeat; it never stops the round for the others.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

from mlserve_runtime.logfile import truncate_if_large

from . import daemons
from .constants import DEFAULT_LOG_FILE_MAX_BYTES, INSTANCE_LOG_NAME, STATS_SOCKET_NAME
from .errors import MlserveError
from .health import Liveness, liveness, probe
from .home import Home
from .instances import Instances
from .platform import Platform
from .reconcile import Reconciler
from .routing import Router
from .runtimes import InstanceState
from .state import Job
from .watch import Decision, Watch

ROUND_PAUSE_S = 0.5
BUSY_LOG_EVERY_S = 300.0  # a job busy again and again is logged at most this often
LOG_MAX_BYTES = int(os.environ.get("MLSERVE_LOG_MAX_BYTES") or DEFAULT_LOG_FILE_MAX_BYTES)


class Supervisor:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.instances = Instances(platform)
        self.reconciler = Reconciler(platform)
        self.router = Router(platform)
        self.watches: dict[str, Watch] = {}
        self.oom_kills: dict[str, int] = {}  # job id -> out-of-memory kills its instance had when last seen
        self.busy_logged: dict[str, float] = {}  # job id -> when its last busy spell was logged

    def log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)

    def tick(self) -> list[str]:
        """One round; returns what went wrong in it, one line per problem."""
        problems: list[str] = []
        self.platform.forget_gateway()  # `gateway start` may have changed its settings since the last round
        self._restore_gateway(problems)
        seen, plan = self.reconciler.converge(problems)
        self.watches = {job.id: self.watches.get(job.id, Watch()) for job in seen.jobs}
        self.busy_logged = {job_id: at for job_id, at in self.busy_logged.items() if job_id in self.watches}
        self._note_oom_kills(seen.jobs, seen.instances)
        dead = {job.id: why for job, why in plan.restart}
        expired = {job.id for job in plan.expire}
        now = time.time()
        decisions: list[tuple[Job, Decision]] = []
        for job in seen.jobs:
            if job.state != "running" or job.id in expired:
                continue
            try:
                decision = self._decide(job, dead.get(job.id), now)
            except Exception as exc:  # noqa: BLE001 - one job's trouble never stops the round
                problems.append(f"{job.name}: {type(exc).__name__}: {exc}")
                continue
            if decision is not None:
                decisions.append((job, decision))
        self._apply(decisions, problems)
        self._cap_logs(seen.jobs)
        for problem in problems:
            self.log(f"problem: {problem}")
        return problems

    def _restore_gateway(self, problems: list[str]) -> None:
        if self.platform.gateway.is_running() or self.router.stopped_by_user or not self.state.jobs(active_only=True):
            return
        self.log("the gateway was not running; restoring its routes from the state")
        try:
            with self.state.lock():
                self.router.apply()
        except MlserveError as exc:
            problems.append(f"gateway: {exc.message}")

    def _decide(self, job: Job, dead: str | None, now: float) -> Decision | None:
        watch, policy = self.watches[job.id], job.spec.health
        if dead is not None:
            return watch.dead(dead, now)
        if not watch.due(now, policy):
            return None
        stats = str(self.platform.home.run_dir(job.id) / STATS_SOCKET_NAME)
        life = liveness(stats, job.spec.timeout_s, policy.timeout_s)
        if life.busy:
            # The probe would only wait in the queue behind the clients' requests (and its answer be
            # written to a closed connection): busy is not sick.
            decision = watch.checked(False, "not probed", now, job.healthy, policy, life)
        else:
            result = probe(str(self.platform.home.socket(job.id)), timeout=policy.timeout_s)
            if not result.ok and result.status is None:  # no answer: busy since, or sick?
                life = liveness(stats, job.spec.timeout_s, policy.timeout_s)
            decision = watch.checked(result.ok, result.detail[:200] or str(result.status), now, job.healthy, policy,
                                     life)
        self._note_busy(job, watch, life, now)
        return decision

    def _note_busy(self, job: Job, watch: Watch, life: Liveness, now: float) -> None:
        # Once when a busy spell begins (it began with this check), and not more often than BUSY_LOG_EVERY_S.
        if watch.busy_since != now or now - self.busy_logged.get(job.id, 0.0) < BUSY_LOG_EVERY_S:
            return
        self.busy_logged[job.id] = now
        self.log(f"{job.name}: busy, not sick ({life.detail}); not probed while every worker is busy, never "
                 "restarted for it")

    def _note_oom_kills(self, jobs: list[Job], instances: dict[str, InstanceState]) -> None:
        """Log the processes the kernel killed for memory: uWSGI respawns a killed worker silently."""
        known = {job.id for job in jobs}
        self.oom_kills = {job_id: n for job_id, n in self.oom_kills.items() if job_id in known}
        for job in jobs:
            instance = instances.get(job.id)
            if job.state != "running" or instance is None or instance.oom_kills is None:
                continue
            count, before = instance.oom_kills, self.oom_kills.get(job.id)
            self.oom_kills[job.id] = count
            # Fewer than before: a new instance since (a restart counts from zero).
            new = count - before if before is not None and count >= before else count
            if new > 0:
                limit = job.spec.limits.memory_bytes / (1 << 20)
                self.log(f"{job.name}: out of memory: the kernel killed {new} process(es) of the instance at its "
                         f"{limit:g} MiB memory limit ({count} since the instance started); a killed worker's "
                         "request fails and uWSGI starts the worker again")

    def _apply(self, decisions: list[tuple[Job, Decision]], problems: list[str]) -> None:
        flips = [(job, d) for job, d in decisions if d.action in ("join", "leave")]
        if flips:
            with self.state.lock():
                for job, decision in flips:
                    current = self.state.get_job(job.id)
                    if current is None or current.state != "running":
                        continue  # a command stopped it meanwhile
                    self.state.update_job(job.id, healthy=decision.action == "join", reason=decision.reason)
                    self.log(f"{job.name}: " + ("healthy, in rotation" if decision.action == "join"
                                                else f"out of rotation ({decision.reason})"))
                self._route(problems)
        for job, decision in decisions:
            try:
                if decision.action == "restart":
                    self._restart(job, decision.reason or "")
                elif decision.action == "fail":
                    self.log(f"{job.name}: failed: {decision.reason}")
                    self.instances.fail(job, decision.reason or "")
            except MlserveError as exc:
                problems.append(f"{job.name}: {decision.action} failed: {exc.message}")

    def _route(self, problems: list[str]) -> None:
        try:
            self.router.apply()
        except MlserveError as exc:
            problems.append(f"gateway: {exc.message}")

    def _restart(self, job: Job, why: str) -> None:
        """Out of the rotation under the lock; the restart itself (seconds) outside it."""
        with self.state.lock():
            current = self.state.get_job(job.id)
            if current is None or current.state != "running":
                return
            self.log(f"{job.name}: restarting ({why})")
            self.state.update_job(job.id, healthy=False, reason=f"restarting: {why}")
            self.router.apply()
        now = time.time()
        self.watches[job.id].restarted(now)
        handle: str | None
        try:
            handle = self.platform.runtime(job.runtime).restart(self.instances.instance_spec(current), current.handle)
        except MlserveError as exc:
            self.log(f"{job.name}: restart failed: {exc.message}")
            handle = current.handle
        self.state.update_job(job.id, handle=handle, restarts=current.restarts + 1, started_at=time.time())

    def _cap_logs(self, jobs: list[Job]) -> None:
        """No file mlserve writes grows without bound: the gateway's logs, this log, local instances' logs."""
        home = self.platform.home
        self.platform.gateway.cap_logs(LOG_MAX_BYTES)
        paths = [daemons.logfile(home)] + [home.run_dir(job.id) / INSTANCE_LOG_NAME for job in jobs]
        for path in paths:
            if path.exists():
                truncate_if_large(str(path), LOG_MAX_BYTES)


def main() -> int:
    home = Home.from_env()
    daemons.register(home)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    platform = Platform(home, report=lambda message: print(message, flush=True))
    supervisor = Supervisor(platform)
    supervisor.log(f"supervisor {os.getpid()} watching {home.root}")
    while not stopping and home.db.exists():
        try:
            problems = supervisor.tick()
        except MlserveError as exc:
            problems = [f"round failed: {exc.message}"]
            supervisor.log(problems[0])
            platform.reconnect()  # the engine may be restarting
        except Exception:  # noqa: BLE001 - the supervisor must outlive any one bad round
            problems = ["round failed: " + traceback.format_exc().strip().splitlines()[-1]]
            supervisor.log("round failed:\n" + traceback.format_exc())
        daemons.beat(home, problems)
        time.sleep(ROUND_PAUSE_S)
    supervisor.log("supervisor stopping")
    daemons.unregister(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
