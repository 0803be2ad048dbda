"""Jobs as `status` and `info` show them: the record, corrected by what really runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .constants import STATS_SOCKET_NAME
from .health import liveness
from .platform import Platform
from .reconcile import Observation, Reconciler
from .runtimes import InstanceState
from .state import Job


@dataclass(frozen=True)
class JobView:
    job: Job
    status: str
    healthy: bool
    uptime: float | None
    endpoint: str
    # Processes of the instance killed for memory since it started (None: not running, or the runtime
    # cannot tell). uWSGI respawns a killed worker, so the job stays healthy: this is how it shows.
    oom_kills: int | None = None
    fallback: bool = False  # its version takes traffic only when no primary version can

    @classmethod
    def of(cls, job: Job, instance: InstanceState | None, endpoint: str, fallback: bool = False) -> JobView:
        if not job.active:
            return cls(job, job.state, False, None, endpoint, fallback=fallback)
        oom_kills = instance.oom_kills if instance is not None else None
        if instance is not None and not instance.running:
            # Drift: the record says it runs, the runtime says it does not.
            return cls(job, instance.status, False, None, endpoint, oom_kills, fallback)
        uptime = time.time() - job.started_at if job.started_at else None
        return cls(job, job.state, job.healthy and job.state == "running", uptime, endpoint, oom_kills, fallback)

    @property
    def expires_in(self) -> float | None:
        """Seconds until the job's maximum runtime is over (None: no limit, or not running)."""
        limit = self.job.spec.max_runtime_s
        if not limit or self.uptime is None:
            return None
        return max(0.0, limit - self.uptime)

    def as_dict(self) -> dict[str, Any]:
        job = self.job
        return {
            "job": job.name,
            "id": job.id,
            "owner": job.owner,
            "project": job.project,
            "number": job.number,
            "version": job.version,
            "fallback": self.fallback,
            "state": self.status,
            "healthy": self.healthy,
            "runtime": job.runtime,
            "image": job.spec.artifact.ref,
            "created": job.created_at,
            "uptime": round(self.uptime, 1) if self.uptime is not None else None,
            "endpoint": self.endpoint,
            "restarts": job.restarts,
            "oom_kills": self.oom_kills,
            "reason": job.reason,
            "expires_in": round(self.expires_in) if self.expires_in is not None else None,
        }


def job_views(jobs: list[Job], seen: Observation, endpoint: Any,
              fallback: frozenset[tuple[str, str, int]] = frozenset()) -> list[JobView]:
    """Each job joined with its instance as observed; a runtime that could not be asked says so.
    ``fallback``: the (owner, project, version) of fallback versions."""
    views = []
    for job in jobs:
        instance = None
        if job.active:
            if job.runtime in seen.unreachable:
                instance = InstanceState(job.id, "", False, "unknown (engine unreachable)")
            else:
                instance = seen.instances.get(job.id) or InstanceState(job.id, "", False, "gone (no instance)")
        views.append(JobView.of(job, instance, endpoint(job.id), (job.owner, job.project, job.version) in fallback))
    return views


def status_views(platform: Platform, include_stopped: bool) -> tuple[list[JobView], dict[str, str]]:
    """Jobs (active, or all) as observed now, and the runtimes their instances could not be asked of."""
    seen = Reconciler(platform).observe()
    jobs = platform.state.jobs(active_only=not include_stopped)
    used = {job.runtime for job in jobs if job.active}
    return job_views(jobs, seen, platform.endpoint, platform.state.fallback_versions()), {k: v for k, v in seen.unreachable.items() if k in used}


def worker_respawns(platform: Platform, job: Job) -> int | None:
    """How often the instance's uWSGI master started a worker again (killed for memory, crashed, past
    the timeout), from its stats socket; None when the job is not running or its master does not answer."""
    if job.state != "running":
        return None
    life = liveness(str(platform.home.run_dir(job.id) / STATS_SOCKET_NAME), job.spec.timeout_s,
                    job.spec.health.timeout_s)
    return life.respawns if life.alive else None
