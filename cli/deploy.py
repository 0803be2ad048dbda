"""Putting a project's app into service: `run` (validate, build, start one job) and `scale`."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import daemons
from .config import flag_max_runtime_s, load_config
from .constants import DEFAULT_WORKERS, KEEP_VERSIONS
from .edge import check_open_to_anyone
from .errors import JobNotFoundError, UsageError
from .guard import Guard
from .instances import Instances
from .platform import Platform
from .project import default_project_name, parse_data_mount, validate_project_name
from .quota import check_can_mount
from .runtimes import BuildRequest, DataMount, Runtime
from .secrets import Secrets
from .spec import Artifact, JobSpec
from .state import Job, Version
from .traffic import Traffic, most_traffic, with_canary
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
    replace: bool = False  # start as many jobs as the project has healthy ones, then stop the old ones
    canary: int | None = None  # percent of the project endpoint's traffic for the new version
    fallback: bool = False  # the version takes traffic only when no primary version can
    allow_data_outside: bool = False  # mlserve.yml's data may name folders outside the project
    network: str | None = None  # --network: wins over mlserve.yml's, and alone may open the network
    access: str | None = None  # --access: wins over mlserve.yml's


@dataclass(frozen=True)
class Deployment:
    jobs: list[Job]
    endpoints: dict[str, str]  # job id -> unique endpoint URL
    project_endpoint: str
    version: int
    version_endpoint: str
    traffic: Traffic  # the project's split after the run
    build: dict[str, Any]
    replaced: list[Job] = field(default_factory=list)
    access: str = "public"  # who may call the project now: public | token


class Deployer:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.instances = Instances(platform)
        self.report = platform.report

    def run(self, request: RunRequest) -> Deployment:
        """Validate, build and start a new version of the project: one job (with --replace, as many as the
        project has healthy ones, then the old ones stop). Every check runs before the build; on failure
        an MlserveError is raised and nothing is left behind (no version, job, instance, route or image)."""
        if request.canary is not None and (request.replace or request.fallback):
            raise UsageError("--canary cannot be combined with --replace or --fallback",
                             "A canary is one new primary job beside the serving version; shift the rest with `mlserve traffic`.")
        project_dir = request.project_dir.resolve()
        config = load_config(project_dir)
        name = request.project if request.project is not None else config.project
        project = validate_project_name(name if name is not None else default_project_name(project_dir))
        owner = self.platform.owner
        report = validate_app(project_dir)
        self.report(f"Validating app.py ... ok (global {report.kind} app)" if report.kind else "Validating app.py ... ok")
        state_home = self.platform.home.root
        mounts = [parse_data_mount(spec, Path.cwd(), state_home) for spec in request.data]
        mounts += [parse_data_mount(spec, project_dir, state_home, None if request.allow_data_outside else project_dir)
                   for spec in config.data]
        _check_unique_mounts(mounts)
        network = _network(request.network, config.network)
        # Access never opens by itself: a run whose mlserve.yml and flags are silent keeps the project's.
        kept = self.state.guard(owner, project).access
        guard = Guard(request.access or config.access or kept, config.rate, config.cors)
        check_open_to_anyone(self.platform, [(f"{owner}/projects/{project}", guard)])
        max_runtime_s = flag_max_runtime_s(request.max_runtime, config)
        requirements = config.requirements or "requirements.txt"
        # A project stays on the runtime its jobs run on: a brief engine outage must not move it.
        serving = self.state.jobs(active_only=True, owner=owner, project=project)
        if request.canary is not None and not self._serving(owner, project, fallback=False):
            raise UsageError(f"--canary splits {owner}/projects/{project}'s traffic with the version serving it, "
                             "and no primary job of the project is running",
                             "Start the project with a plain `mlserve run --mode serve` first.")
        runtime_name = self.platform.choose_runtime(request.runtime or (serving[-1].runtime if serving else None))
        check_can_mount()  # every instance's /output is a filesystem of its own: say so before building
        gateway = self.platform.gateway
        if not gateway.is_running():
            gateway.preflight()  # nginx missing or its port taken: say so before building

        runtime = self.platform.runtime(runtime_name)
        built = runtime.build(BuildRequest(
            project_dir=project_dir, slug=f"{owner}-{project}", project_key=f"{owner}/projects/{project}",
            env=request.env or config.env, requirements=requirements if (project_dir / requirements).is_file() else None,
            ca_bundle=request.ca_bundle, report=self.report, network=network,
            environment={**dict(config.env_vars), **Secrets(self.platform.home, owner, project).environment()},
        ))
        spec = JobSpec(
            runtime=runtime_name, artifact=built.artifact, project_dir=str(project_dir),
            workers=request.workers or config.workers or DEFAULT_WORKERS, preload=config.preload,
            env_vars=config.env_vars, mounts=tuple(mounts), limits=config.limits, health=config.health,
            options=config.options, max_runtime_s=max_runtime_s, network=network,
        )
        try:
            with self.state.project_lock(owner, project):
                version, jobs, replaced = self._start_version(owner, project, spec, request, guard)
        except BaseException:
            self._discard_unused(runtime, [built.artifact])  # an image no job runs is a leftover
            raise
        self._discard_unused(runtime, self._old_artifacts(owner, project, runtime_name))
        daemons.ensure_running(self.platform.home)
        key = f"{owner}/projects/{project}"
        return Deployment(jobs, {j.id: self.platform.endpoint(j.id) for j in jobs}, self.platform.project_endpoint(key),
                          version.number, self.platform.version_endpoint(key, version.number),
                          self.state.traffic(owner, project), built.summary, replaced,
                          guard.effective_access(self.platform.gateway.settings.loopback))

    def _start_version(self, owner: str, project: str, spec: JobSpec, request: RunRequest,
                       guard: Guard) -> tuple[Version, list[Job], list[Job]]:
        """Record the new version and start its jobs (a canary's share set first: a version without a
        healthy job takes nothing; the project's guard set first: no request passes the old one to the
        new version). With --replace, then stop the jobs of the kind it replaces. If its jobs never
        become healthy, the version, the split and the guard are undone and nothing else moved."""
        with self.state.lock():
            # Again under the lock: the gateway may have been opened while this run was building.
            check_open_to_anyone(self.platform, [(f"{owner}/projects/{project}", guard)])
            guard_before = self.state.guard(owner, project)
            self.state.set_guard(owner, project, guard)
            before = self.state.traffic(owner, project)
            primary = self._serving(owner, project, fallback=False)
            same_kind = self._serving(owner, project, fallback=True) if request.fallback else primary
            version = self.state.add_version(owner, project, spec, request.fallback)
            split = before
            try:
                active = Counter(j.version for j in primary)
                if request.canary is not None:
                    if not active:
                        raise UsageError(f"--canary: no primary job of {owner}/projects/{project} is running any more")
                    split = with_canary(before, active, version.number, request.canary)
                elif not request.fallback and before.shares is not None and not any(
                        active[v] for v, share in before.shares.items() if share):
                    # The versions the split names are all gone: the new one takes it over.
                    split = Traffic({version.number: 100}, before.sticky)
                if split != before:
                    self.state.set_traffic(owner, project, split)
                count = max(1, sum(1 for j in same_kind if j.healthy)) if request.replace else 1
                jobs = self.instances.reserve(version, count)
            except BaseException:
                self._forget(version, before, split)
                self._restore_guard(owner, project, guard_before, guard)
                raise
        try:
            self.instances.launch(jobs)
        except BaseException:
            with self.state.lock():
                self._forget(version, before, split)
                self._restore_guard(owner, project, guard_before, guard)
                self.instances.reroute_after_error()
            raise
        if not request.replace:
            return version, jobs, []
        with self.state.lock():
            old = [j for j in self._serving(owner, project, fallback=request.fallback) if j.version != version.number]
            traffic = self.state.traffic(owner, project)
            if not request.fallback and traffic.shares is not None:
                self.state.set_traffic(owner, project, Traffic({version.number: 100}, traffic.sticky))
            taken = self.instances.begin_stop(old, reason=f"replaced by version {version.number}")
            if not taken:
                self.instances.router.apply()
        return version, jobs, self.instances.finish_stop(taken)

    def _forget(self, version: Version, before: Traffic, split: Traffic) -> None:
        """Undo a version that never served, and the split it set (``before`` -> ``split``): the split goes
        back unless a `traffic` command changed it meanwhile; then only the version's share goes.
        The caller holds the state lock."""
        owner, project = version.owner, version.project
        current = self.state.traffic(owner, project)
        if current == split:
            self.state.set_traffic(owner, project, before)
            self.state.delete_version(owner, project, version.number)
        else:
            self.state.forget_versions_without_jobs()  # its jobs are gone: it goes, and its share

    def _restore_guard(self, owner: str, project: str, before: Guard, mine: Guard) -> None:
        """A failed run's guard goes back, unless an `access` command changed it meanwhile. The caller
        holds the state lock."""
        if self.state.guard(owner, project) == mine:
            self.state.set_guard(owner, project, before)

    def _serving(self, owner: str, project: str, fallback: bool) -> list[Job]:
        """The project's active jobs (not stopping) of primary versions, or of fallback versions."""
        kind = {v.number for v in self.state.versions(owner, project) if v.fallback == fallback}
        return [j for j in self.state.jobs(active_only=True, owner=owner, project=project)
                if j.state != "stopping" and j.version in kind]

    def _old_artifacts(self, owner: str, project: str, runtime: str) -> list[Artifact]:
        """The project's artifacts on ``runtime``: what may be discarded once no active job and none of the
        newest versions needs it (``_discard_unused`` decides)."""
        # Every job runs its version's artifact, so the versions name them all.
        candidates = [v.spec.artifact for v in self.state.versions(owner, project) if v.spec.runtime == runtime]
        return list({a.ref: a for a in candidates}.values())

    def _discard_unused(self, runtime: Runtime, artifacts: list[Artifact]) -> None:
        with self.state.lock():  # a run that reserves jobs checks its artifact under the same lock
            in_use = self.state.artifacts_in_use(KEEP_VERSIONS)
            for artifact in artifacts:
                if artifact.ref not in in_use:
                    runtime.discard(artifact)

    def scale(self, owner: str, project: str, replicas: int | None = None, add: int | None = None,
              version: int | None = None) -> list[Job]:
        """Make the project have ``replicas`` primary jobs (or ``add`` more), or with ``version`` that
        many jobs of that version. New jobs copy the version that takes the most traffic (or
        ``version``). Scaling down stops the jobs of the versions with the smallest share first, the
        oldest first among equals. The decision is made under the state lock; starting and draining
        happen outside it (under the project's lock: one run or scale of a project at a time)."""
        with self.state.project_lock(owner, project):
            return self._scale(owner, project, replicas, add, version)

    def _scale(self, owner: str, project: str, replicas: int | None, add: int | None,
               version: int | None) -> list[Job]:
        grow: list[Job] = []
        shrink: list[Job] = []
        with self.state.lock():
            versions = {v.number: v for v in self.state.versions(owner, project)}
            traffic = self.state.traffic(owner, project)
            if version is not None:
                if version not in versions:
                    raise JobNotFoundError(
                        f"project {owner}/projects/{project} has no version {version}",
                        f"Its versions: {', '.join(map(str, versions)) or 'none'} (`mlserve versions {project}`).")
                group = [j for j in self.state.jobs(active_only=True, owner=owner, project=project)
                         if j.state != "stopping" and j.version == version]
                source: Version | None = versions[version]
            else:
                group = self._serving(owner, project, fallback=False)
                top = most_traffic(traffic, Counter(j.version for j in group))
                source = versions.get(top) if top is not None else None
            target = len(group) + add if add is not None else replicas
            if target is None or target < 0:
                raise UsageError("scale needs a count N >= 0, or --add K")
            if target > len(group):
                if source is None:
                    fallbacks = self._serving(owner, project, fallback=True)
                    raise JobNotFoundError(
                        f"project {owner}/projects/{project} has no running job to copy",
                        f"Its only jobs are fallbacks: scale them with `--version {fallbacks[0].version}`." if fallbacks
                        else "Start one first with `mlserve run --mode serve` in the project folder.")
                grow = self.instances.reserve(source, target - len(group))
            elif target < len(group):
                share = traffic.shares or {}
                order = sorted(group, key=lambda j: (share.get(j.version, 0), j.created_at, j.number))
                shrink = self.instances.begin_stop(order[: len(group) - target])
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


def _network(flag: str | None, configured: str) -> str:
    """``--network``, else mlserve.yml's. A project's mlserve.yml (which may come from a cloned
    repository) may ask for less network, never for more: `open` takes the command line."""
    if flag is not None:
        return flag
    if configured == "open":
        raise UsageError("mlserve.yml asks for `network: open`: its instances could reach this host, private networks "
                         "and other instances",
                         "If you trust this project with that, confirm it with `mlserve run --mode serve --network open`.")
    return configured


def _check_unique_mounts(mounts: list[DataMount]) -> None:
    seen: set[str] = set()
    for mount in mounts:
        if mount.mount in seen:
            raise UsageError(f"two data sources are mounted at {mount.mount}", "Give each --data a different mount point.")
        seen.add(mount.mount)
