"""The one reconcile step: the record (SQLite) against what really runs (labels, processes).

``plan`` is a pure function from an ``Observation`` to a ``Plan``; ``Reconciler.converge`` observes,
plans and applies. ``status``, every command's revive path, ``stop --all`` and the supervisor
all go through it, so a killed command, a dead instance or a stray container is handled the same
way whoever notices it first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import daemons
from .actors import actor_alive
from .errors import EngineUnavailableError, MlserveError
from .instances import Instances
from .platform import RUNTIMES, Platform
from .routing import Router
from .runtimes import InstanceState
from .state import Job


@dataclass(frozen=True)
class Observation:
    jobs: list[Job]  # active records, oldest first
    instances: dict[str, InstanceState]  # job id -> what runs, for every reachable runtime
    unreachable: dict[str, str]  # runtime name -> why it could not be listed
    now: float


@dataclass(frozen=True)
class Plan:
    discard: list[Job] = field(default_factory=list)  # starting, but the command starting it is gone
    finish_stop: list[Job] = field(default_factory=list)  # stopping, but the command stopping it is gone
    expire: list[Job] = field(default_factory=list)  # past their maximum runtime
    restart: list[tuple[Job, str]] = field(default_factory=list)  # running on record, dead in fact
    orphans: list[InstanceState] = field(default_factory=list)  # runs, but no active job claims it
    reroute: list[Job] = field(default_factory=list)  # in the rotation on record, but dead: out now

    @property
    def empty(self) -> bool:
        return not (self.discard or self.finish_stop or self.expire or self.restart or self.orphans or self.reroute)


def plan(seen: Observation, alive: Callable[[str | None], bool] = actor_alive) -> Plan:
    """What to do so that what runs matches the record. Jobs of an unreachable runtime are left alone."""
    result = Plan()
    known = {job.id for job in seen.jobs}
    for job in seen.jobs:
        if job.runtime in seen.unreachable:
            continue
        instance = seen.instances.get(job.id)
        if job.state == "starting" and not alive(job.actor):
            result.discard.append(job)
        elif job.state == "stopping" and not alive(job.actor):
            result.finish_stop.append(job)
        elif job.state == "running":
            expires = job.spec.max_runtime_s
            if expires and job.started_at and seen.now >= job.started_at + expires:
                result.expire.append(job)
            elif instance is None or not instance.running:
                result.restart.append((job, f"instance {instance.status if instance else 'gone (none found)'}"))
                if job.healthy:
                    result.reroute.append(job)
    result.orphans.extend(i for job_id, i in seen.instances.items() if job_id not in known)
    return result


class Reconciler:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.instances = Instances(platform)
        self.router = Router(platform)

    def observe(self) -> Observation:
        """What runs first, then the record: a job whose instance is listed was recorded before it started,
        so nothing just started is mistaken for an orphan."""
        instances: dict[str, InstanceState] = {}
        unreachable: dict[str, str] = {}
        for name in RUNTIMES:
            try:
                for instance in self.platform.runtime(name).instances():
                    instances[instance.job_id] = replace(instance, runtime=name)
            except EngineUnavailableError as exc:
                unreachable[name] = exc.message
        return Observation(self.state.jobs(active_only=True), instances, unreachable, time.time())

    def converge(self, problems: list[str] | None = None) -> tuple[Observation, Plan]:
        """Observe, plan and apply all but the restarts (the supervisor's, with backoff).

        A failure on one job is added to ``problems`` (or raised when none is given) after the
        others were handled.
        """
        seen = self.observe()
        todo = plan(seen)
        errors: list[str] = []
        if todo.reroute:
            with self.state.lock():
                for job in todo.reroute:
                    current = self.state.get_job(job.id)
                    if current is not None and current.state == "running":
                        self.state.update_job(job.id, healthy=False)
                self.router.apply()
        self._each(todo.discard, lambda job: self.instances.discard([job]), errors)
        if todo.discard:  # the commands that started them died: so did the versions they were making
            with self.state.lock():
                if self.state.forget_versions_without_jobs():
                    self.router.apply()
        self._each(todo.finish_stop, lambda job: self._finish_stop(job), errors)
        self._each(todo.expire, lambda job: self.instances.stop([job], reason="maximum runtime reached"), errors)
        self._each(todo.orphans, self._remove_orphan, errors)
        if problems is not None:
            problems.extend(errors)
        elif errors:
            raise MlserveError(errors[0])
        return seen, todo

    def revive(self) -> list[str]:
        """Before a command: converge, then bring back the gateway's routes and the supervisor if jobs
        should be serving (after a crash or a reboot), unless the user stopped the gateway.

        Returns notices of what had to be restored or could not be.
        """
        if not self.state.jobs(active_only=True):
            return []
        notes: list[str] = []
        self.converge(notes)
        if self.router.stopped_by_user:
            return notes
        home = self.platform.home
        supervised = daemons.pid(home) is not None
        if not self.platform.gateway.is_running() and self.state.jobs(active_only=True):
            with self.state.lock():
                self.router.apply()
            notes.append("the gateway was not running; its routes were restored from the state")
        daemons.ensure_running(home)  # also replaces one left by older code
        if not supervised:
            notes.append(f"the supervisor was not running; it was started again (its log: {daemons.logfile(home)})")
        return notes

    def _finish_stop(self, job: Job) -> None:
        with self.state.lock():
            taken = self.instances.begin_stop([job], job.reason)
        self.instances.finish_stop(taken, drain=False)

    def _remove_orphan(self, orphan: InstanceState) -> None:
        self.platform.runtime(orphan.runtime).stop(orphan.job_id, orphan.handle, timeout=10)
        self.platform.report(f"Removed instance {orphan.handle[:12]} (no job claims it)")

    @staticmethod
    def _each(items: list, action: Callable, errors: list[str]) -> None:
        for item in items:
            try:
                action(item)
            except MlserveError as exc:
                errors.append(exc.message)
