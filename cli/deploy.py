"""Putting a project's app into service: `run` (validate, build, start one job) and `scale`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import daemons
from .config import flag_max_runtime_s, load_config
from .constants import DEFAULT_WORKERS
from .errors import JobNotFoundError, UsageError
from .instances import Instances
from .platform import Platform
from .project import default_project_name, parse_data_mount, validate_project_name
from .runtimes import BuildRequest, DataMount, Runtime
from .spec import Artifact, JobSpec
from .state import Job
from .validate import validate_app

OVERSUBSCRIBED_PER_CORE = 8  # uWSGI worker processes per core before `scale` warns


@dataclass(frozen=True)
class RunRequest:
    project_dir: Path
    project: str | None = None
    env: str | None = None
    data: tuple[str, ...] = ()
    workers: int | None = None
    runtime: str | None = None
    ca_bundle: str | None = None
    max_runtime: str | None = None


@dataclass(frozen=True)
class Deployment:
    jobs: list[Job]
    endpoints: dict[str, str]  # job id -> unique endpoint URL
    project_endpoint: str
    build: dict[str, Any]


class Deployer:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.instances = Instances(platform)
        self.report = platform.report

    def run(self, request: RunRequest) -> Deployment:
        """Validate, build and start one serving job. Every check runs before the build; on failure
        an MlserveError is raised and nothing is left behind (no job, instance, route or image)."""
        project_dir = request.project_dir.resolve()
        config = load_config(project_dir)
        name = request.project if request.project is not None else config.project
        project = validate_project_name(name if name is not None else default_project_name(project_dir))
        owner = self.platform.owner
        report = validate_app(project_dir)
        self.report(f"Validating app.py ... ok (global {report.kind} app)" if report.kind else "Validating app.py ... ok")
        mounts = [parse_data_mount(spec, Path.cwd()) for spec in request.data]
        mounts += [parse_data_mount(spec, project_dir) for spec in config.data]
        _check_unique_mounts(mounts)
        max_runtime_s = flag_max_runtime_s(request.max_runtime, config)
        requirements = config.requirements or "requirements.txt"
        # A project stays on the runtime its jobs run on: a brief engine outage must not move it.
        serving = self.state.jobs(active_only=True, owner=owner, project=project)
        runtime_name = self.platform.choose_runtime(request.runtime or (serving[-1].runtime if serving else None))
        gateway = self.platform.gateway
        if not gateway.is_running():
            gateway.preflight()  # nginx missing or its port taken: say so before building

        runtime = self.platform.runtime(runtime_name)
        built = runtime.build(BuildRequest(
            project_dir=project_dir, slug=f"{owner}-{project}", project_key=f"{owner}/projects/{project}",
            env=request.env or config.env, requirements=requirements if (project_dir / requirements).is_file() else None,
            ca_bundle=request.ca_bundle, report=self.report,
        ))
        spec = JobSpec(
            runtime=runtime_name, artifact=built.artifact, project_dir=str(project_dir),
            workers=request.workers or config.workers or DEFAULT_WORKERS, preload=config.preload,
            env_vars=config.env_vars, mounts=tuple(mounts), limits=config.limits, health=config.health,
            options=config.options, max_runtime_s=max_runtime_s,
        )
        try:
            with self.state.project_lock(owner, project):
                jobs = self.instances.create(owner, project, spec, count=1)
        except BaseException:
            self._discard_unused(runtime, [built.artifact])  # an image no job runs is a leftover
            raise
        self._discard_unused(runtime, self._stopped_artifacts(owner, project))
        daemons.ensure_running(self.platform.home)
        key = f"{owner}/projects/{project}"
        return Deployment(jobs, {j.id: self.platform.endpoint(j.id) for j in jobs},
                          self.platform.project_endpoint(key), built.summary)

    def _stopped_artifacts(self, owner: str, project: str) -> list[Artifact]:
        jobs = self.state.jobs(owner=owner, project=project)
        return list({j.spec.artifact.ref: j.spec.artifact for j in jobs if not j.active}.values())

    def _discard_unused(self, runtime: Runtime, artifacts: list[Artifact]) -> None:
        with self.state.lock():  # a run that reserves jobs checks its artifact under the same lock
            in_use = self.state.artifacts_in_use()
            for artifact in artifacts:
                if artifact.ref not in in_use:
                    runtime.discard(artifact)

    def scale(self, owner: str, project: str, replicas: int | None = None, add: int | None = None) -> list[Job]:
        """Make the project have ``replicas`` active jobs (or ``add`` more): new ones copy the newest job,
        and scaling down stops the oldest first. The decision is made under the state lock; starting
        and draining happen outside it (under the project's lock: one run or scale of a project at a time)."""
        with self.state.project_lock(owner, project):
            return self._scale(owner, project, replicas, add)

    def _scale(self, owner: str, project: str, replicas: int | None, add: int | None) -> list[Job]:
        grow: list[Job] = []
        shrink: list[Job] = []
        with self.state.lock():
            active = [j for j in self.state.jobs(active_only=True, owner=owner, project=project)
                      if j.state != "stopping"]
            target = len(active) + add if add is not None else replicas
            if target is None or target < 0:
                raise UsageError("scale needs a count N >= 0, or --add K")
            if target > len(active):
                if not active:
                    raise JobNotFoundError(
                        f"project {owner}/projects/{project} has no running job to copy",
                        "Start one first with `mlserve run --mode serve` in the project folder.",
                    )
                newest = max(active, key=lambda j: (j.created_at, j.number))
                grow = self.instances.reserve(owner, project, newest.spec, target - len(active))
            elif target < len(active):
                oldest_first = sorted(active, key=lambda j: (j.created_at, j.number))
                shrink = self.instances.begin_stop(oldest_first[: len(active) - target])
        if grow:
            self._warn_if_oversubscribed()
            self.instances.launch(grow)
        self.instances.finish_stop(shrink)
        daemons.ensure_running(self.platform.home)
        return self.state.jobs(active_only=True, owner=owner, project=project)


    def _warn_if_oversubscribed(self) -> None:
        """Say so before the user finds out under load: worker processes far beyond the cores compete.
        Jobs just reserved are active already, so they count."""
        cores = os.cpu_count() or 1
        processes = sum(j.spec.workers for j in self.state.jobs(active_only=True))
        if processes > OVERSUBSCRIBED_PER_CORE * cores:
            self.report(
                f"Notice: {processes} uWSGI worker processes on {cores} cores. Beyond about "
                f"{OVERSUBSCRIBED_PER_CORE} per core they compete for the CPU and throughput falls (on 2 cores, "
                "30 jobs of 2 workers served 0.42x the requests of 2 jobs). More jobs add capacity only with more cores."
            )


def _check_unique_mounts(mounts: list[DataMount]) -> None:
    seen: set[str] = set()
    for mount in mounts:
        if mount.mount in seen:
            raise UsageError(f"two data sources are mounted at {mount.mount}", "Give each --data a different mount point.")
        seen.add(mount.mount)
