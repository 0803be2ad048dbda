"""A project's versions and its traffic split, as `versions` and `traffic` show and change them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import JobNotFoundError
from .platform import Platform
from .routing import Router
from .state import Version
from .traffic import Traffic, changed_shares, percents, weights


@dataclass(frozen=True)
class VersionView:
    version: Version
    jobs: int  # active jobs (not stopping)
    healthy: int
    percent: float  # the share it is set to take: its percent, or its part of the jobs (equal turns per job)
    now: float  # the share it takes right now, with the jobs' health as it is

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version.number, "percent": self.percent, "jobs": self.jobs, "healthy": self.healthy,
                "fallback": self.version.fallback, "now": self.now}


@dataclass(frozen=True)
class Split:
    project_key: str
    traffic: Traffic
    versions: list[VersionView]  # every version of the project, oldest first

    @property
    def serving(self) -> list[VersionView]:
        """The versions `traffic` lists: those with a job, or a share."""
        shares = self.traffic.shares or {}
        return [v for v in self.versions if v.jobs or shares.get(v.version.number)]

    @property
    def fallback_serving(self) -> bool:
        return any(v.version.fallback and v.now for v in self.versions)


def split(platform: Platform, owner: str, project: str) -> Split:
    """The project's versions with their jobs and shares, as recorded now."""
    state = platform.state
    versions = state.versions(owner, project)
    if not versions:
        raise JobNotFoundError(f"no project {owner}/projects/{project} on record",
                               "`mlserve status --all` lists the projects' jobs.")
    traffic = state.traffic(owner, project)
    fallback = {v.number for v in versions if v.fallback}
    jobs = [j for j in state.jobs(active_only=True, owner=owner, project=project) if j.state != "stopping"]
    active = Counter(j.version for j in jobs)
    ready = Counter(j.version for j in jobs if j.healthy and j.state == "running")
    primary_active = {v: n for v, n in active.items() if v not in fallback}
    primary_ready = {v: n for v, n in ready.items() if v not in fallback}
    set_to = percents(primary_active) if traffic.shares is None else {v: float(p) for v, p in traffic.shares.items()}
    now = weights(traffic, primary_ready) or {v: n for v, n in ready.items() if v in fallback}
    now_percent = percents(now)
    views = [VersionView(v, active[v.number], ready[v.number], 0.0 if v.fallback else set_to.get(v.number, 0.0),
                         now_percent.get(v.number, 0.0)) for v in versions]
    return Split(f"{owner}/projects/{project}", traffic, views)


def set_traffic(platform: Platform, owner: str, project: str, to: Iterable[str] = (), to_latest: bool = False,
                by_jobs: bool = False, sticky: bool | None = None) -> list[str]:
    """Change the project's split (live when this returns, with no gateway reload); notes for the user."""
    to = tuple(to)
    state = platform.state
    notes = []
    with state.lock():
        current = split(platform, owner, project)
        versions = {v.version.number: v for v in current.versions}
        traffic = current.traffic
        shares = changed_shares(traffic.shares, {n: v.version.fallback for n, v in versions.items()}, to, to_latest,
                                by_jobs, current.project_key)
        state.set_traffic(owner, project, Traffic(shares, traffic.sticky if sticky is None else sticky))
        Router(platform).apply()
    for number in sorted(shares or {}):
        if not versions[number].jobs:
            notes.append(f"version {number} has no serving job: its share goes to the others until it has one "
                         f"(`mlserve scale 1 --version {number} --project {project}`)")
    return notes
