"""The serving commands on a Kubernetes cluster: run, scale, stop, traffic, status and logs.

mlserve builds the image here, pushes it to the target's registry, renders objects (render.py),
applies them and waits until Kubernetes reports the new pods ready. What runs is read back from the
cluster by label; the project's record (versions, their specs, the split) is a ConfigMap there, so
anyone with the same cluster target sees the same project. A command that fails puts back every
object it created or changed, and the record, before it exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import load_config
from ..constants import (
    DEFAULT_BODY_LIMIT_MB,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKERS,
    DRAIN_GRACE_S,
    ENDPOINT_ID_LENGTH,
    KEEP_VERSIONS,
)
from ..deploy import RunRequest, _network
from ..errors import JobNotFoundError, UsageError
from ..instances import new_endpoint_id
from ..lookup import folder_project
from ..platform import Platform
from ..project import MOUNT_RE, RESERVED_MOUNTS, default_project_name, validate_project_name
from ..runtimes import BuildRequest
from ..secrets import Secrets
from ..spec import Artifact, DataMount, JobSpec
from ..text import log_line, printable
from ..traffic import Traffic, changed_shares, most_traffic, percents, with_canary
from ..validate import validate_app
from . import render
from .api import Api, ClusterError, Conflict
from .render import ClusterJob, ProjectRef, Routes
from .target import ClusterTarget

# For new pods to become ready before a command gives up and rolls back (a slow image pull counts).
WAIT_S = float(os.environ.get("MLSERVE_CLUSTER_WAIT_S") or 300)
POLL_S = 0.25
# Pod states that will not get better by waiting: the command stops at once and shows why. Others
# are often passing (a kubelet's cache not synced yet): hopeless only when they last this long.
HOPELESS = ("InvalidImageName", "CrashLoopBackOff")
LASTING = ("ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "CreateContainerError",
           "RunContainerError")
LASTING_S = 20.0
# After a job leaves the routes and before its pod is told to stop: ingress-nginx picks the change up
# from the endpoints (the pod's own preStop pause covers the rest).
DRAIN_S = DRAIN_GRACE_S
KINDS_OF_A_PROJECT = ("Ingress", "Service", "Deployment", "NetworkPolicy", "Secret", "ConfigMap")
PVC_MOUNT = "pvc/NAME:MOUNT"
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in render.MANAGED.items())


@dataclass
class Record:
    """The project's record on the cluster (the ConfigMap render.project_record makes)."""

    versions: dict[int, dict[str, Any]] = field(default_factory=dict)  # number -> image, created, fallback, spec
    last_job: int = 0
    last_version: int = 0
    traffic: Traffic = field(default_factory=Traffic)
    resource_version: str | None = None

    def as_data(self, ref: ProjectRef) -> dict[str, Any]:
        return {"project": ref.key, "last_job": self.last_job, "last_version": self.last_version,
                "versions": [self.versions[n] for n in sorted(self.versions)],
                "shares": None if self.traffic.shares is None else {str(v): p for v, p in self.traffic.shares.items()}}

    def spec(self, version: int) -> JobSpec:
        return JobSpec.from_json(self.versions[version]["spec"])

    def fallback(self, version: int) -> bool:
        return bool(self.versions.get(version, {}).get("fallback"))


@dataclass(frozen=True)
class LiveJob:
    """A job as the cluster reports it."""

    ref: ProjectRef
    job: ClusterJob
    ready: bool
    state: str  # ready, starting, or what keeps it from being ready (a pod's waiting reason)
    restarts: int
    created: str
    pod: str | None

    @property
    def name(self) -> str:
        return f"{self.ref.key}/{self.job.number}"


@dataclass(frozen=True)
class ClusterDeployment:
    ref: ProjectRef
    jobs: list[ClusterJob]
    version: int
    image: str
    traffic: Traffic
    replaced: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # build, push, apply (all objects), ready


class _Clock:
    """Seconds each step of a command took, for `run --json` (and the benchmarks)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


class Changes:
    """Objects applied by one command, to put back in reverse order when it fails. Only objects of its
    own project (by their project-key annotation) are ever replaced or deleted."""

    def __init__(self, api: Api, report: Callable[[str], None], key: str) -> None:
        self.api = api
        self.report = report
        self.key = key  # owner/projects/project
        self.done: list[tuple[str, str, dict[str, Any] | None]] = []  # kind, name, the object before (None: new)

    def _ours(self, obj: dict[str, Any]) -> bool:
        return (obj["metadata"].get("annotations") or {}).get(render.ANNOTATION_KEY) == self.key

    def apply(self, body: dict[str, Any]) -> None:
        """Create, or replace what is there (a Service that exists is kept: its address must not change)."""
        kind, name = body["kind"], body["metadata"]["name"]
        self.done.append((kind, name, None))  # before the call: a create that times out may have happened
        try:
            self.api.create(body)
            return
        except Conflict:
            self.done.pop()
        current = self.api.get(kind, name)
        if current is None:
            return self.apply(body)
        if not self._ours(current):
            raise ClusterError(f"{kind} {name} on the cluster is not {self.key}'s: it is left alone",
                               "Another project or tool uses that name; deploy under another project name.")
        if kind != "Service":
            self.done.append((kind, name, current))
            self.api.replace(body, current["metadata"]["resourceVersion"])

    def delete(self, kind: str, name: str) -> None:
        current = self.api.get(kind, name)
        if current is not None and self._ours(current):
            self.done.append((kind, name, current))
            self.api.delete(kind, name)

    def undo(self) -> None:
        """Best effort: every step is tried, and what could not be put back is said. Ctrl-C waits
        until it is done: a half-undone change is what it exists to prevent."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self._undo()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _undo(self) -> None:
        for kind, name, before in reversed(self.done):
            try:
                if before is None:
                    self.api.delete(kind, name)
                else:
                    body = _reusable(before)
                    now = self.api.get(kind, name)
                    if now is None:
                        self.api.create(body)
                    else:
                        self.api.replace(body, now["metadata"]["resourceVersion"])
            except ClusterError as exc:
                self.report(f"Warning: could not put back {kind} {name}: {exc.message}")
        self.done.clear()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _reusable(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as read, made fit to send again: no status, no server-set metadata."""
    meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "labels", "annotations")}
    return {k: v for k, v in obj.items() if k != "status"} | {"metadata": meta}


def parse_cluster_mount(spec: str) -> DataMount:
    """``pvc/NAME:MOUNT``: a PersistentVolumeClaim mounted read-only at /MOUNT. A cluster cannot see
    this machine's folders."""
    source, sep, mount = spec.rpartition(":")
    claim = source.removeprefix(render.PVC_PREFIX)
    if not sep or not source.startswith(render.PVC_PREFIX):
        raise UsageError(f"--data {spec!r}: a cluster's pods cannot mount this machine's folders",
                         f"Put the data in a PersistentVolumeClaim and give it as {PVC_MOUNT}, e.g. pvc/models:input.")
    if not _claim_name_ok(claim):
        raise UsageError(f"--data {spec!r}: {claim!r} is not a PersistentVolumeClaim name",
                         "A claim's name is lower-case letters, digits, '-' and '.'.")
    mount = "/" + mount.strip("/")
    if not MOUNT_RE.match(mount) or ".." in mount.split("/"):
        raise UsageError(f"--data mount point {mount!r} is not a plain absolute path", "e.g. `--data pvc/models:input`.")
    if mount == "/" or any(mount == r or mount.startswith(r + "/") for r in RESERVED_MOUNTS):
        raise UsageError(f"--data cannot mount at {mount}: the instance needs that path", "Pick another, e.g. /input.")
    return DataMount(f"{render.PVC_PREFIX}{claim}", mount)


def _claim_name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name))


class ClusterDeployer:
    def __init__(self, platform: Platform, target: ClusterTarget) -> None:
        self.platform = platform
        self.target = target
        self.report = platform.report
        self.api = target.api()
        # Only the folder's mlserve.yml chose this cluster (no --cluster, no MLSERVE_CLUSTER): it may
        # come from a cloned repository, so it never decides alone to publish or to stop everything.
        self.named_by_config = False

    # endpoints ----------------------------------------------------------------------------------

    def endpoint(self, job_id: str) -> str:
        return f"{self.target.url}/serve/{job_id}"

    def project_endpoint(self, ref: ProjectRef) -> str:
        return f"{self.target.url}/serve/{ref.key}"

    def version_endpoint(self, ref: ProjectRef, version: int) -> str:
        return f"{self.project_endpoint(ref)}/v/{version}"

    def urls(self, ref: ProjectRef, job: ClusterJob) -> dict[str, str]:
        return {"endpoint": self.endpoint(job.id), "project_endpoint": self.project_endpoint(ref),
                "version_endpoint": self.version_endpoint(ref, job.version)}

    # the record -----------------------------------------------------------------------------------

    def record(self, ref: ProjectRef) -> Record:
        found = self.api.get("ConfigMap", ref.name())
        if found is None:
            return Record()
        key = (found["metadata"].get("annotations") or {}).get(render.ANNOTATION_KEY)
        if key != ref.key:
            raise ClusterError(f"cluster {self.target.name}: the name {ref.name()} is taken by "
                               f"{printable(str(key or 'another object'))[:100]}",
                               f"Deploy {ref.key} under another project name (--project).")
        try:
            data = json.loads(found["data"]["record"])
            shares = data.get("shares")
            return Record({int(v["number"]): v for v in data["versions"]}, int(data["last_job"]),
                          int(data["last_version"]),
                          Traffic(None if shares is None else {int(k): int(p) for k, p in shares.items()}),
                          found["metadata"]["resourceVersion"])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ClusterError(f"cluster {self.target.name}: the record of {ref.key} (ConfigMap {ref.name()}) is "
                               "damaged", "Stop the project with `mlserve stop --project` to start it afresh.") from None

    def save(self, ref: ProjectRef, record: Record) -> Record:
        """Write the record if nobody else did since it was read (else a clear error: try again)."""
        body = render.project_record(ref, record.as_data(ref))
        try:
            if record.resource_version is None:
                saved = self.api.create(body)
            else:
                saved = self.api.replace(body, record.resource_version)
        except Conflict:
            raise ClusterError(f"another command changed {ref.key} on cluster {self.target.name} meanwhile",
                               "Nothing was changed by this one; run it again.") from None
        return replace(record, resource_version=saved["metadata"]["resourceVersion"])

    def restore(self, ref: ProjectRef, before: Record, mine: Record) -> None:
        """Undo this command's record change (``before`` -> ``mine``, as this command saved it). If nobody
        wrote the record since, it goes back whole (or goes, if there was none); otherwise only this
        command's version and share leave it, and the job numbers it took stay taken."""
        try:
            now = self.record(ref)
            if now.resource_version == mine.resource_version:
                if before.resource_version is None:
                    self.api.delete("ConfigMap", ref.name())
                else:
                    self.save(ref, replace(before, resource_version=now.resource_version))
                return
            added = set(mine.versions) - set(before.versions)
            shares = now.traffic.shares
            if now.traffic == mine.traffic:
                shares = before.traffic.shares
            elif shares is not None:
                shares = {v: p for v, p in shares.items() if v not in added} or None
            self.save(ref, replace(now, versions={n: v for n, v in now.versions.items() if n not in added},
                                   traffic=Traffic(shares)))
        except ClusterError as exc:
            self.report(f"Warning: could not put back the record of {ref.key}: {exc.message}")

    # reading back ---------------------------------------------------------------------------------

    def jobs(self, ref: ProjectRef | None = None) -> list[LiveJob]:
        """Every job (of ``ref``, else of every project in the namespace), from two list calls."""
        selector = ref.selector() if ref else MANAGED_SELECTOR
        deployments = self.api.list("Deployment", selector)
        pods: dict[str, dict[str, Any]] = {}
        # A job's pod: not going or ended (an evicted pod is kept by Kubernetes), the newest.
        for pod in sorted(self.api.list("Pod", selector), key=lambda p: p["metadata"].get("creationTimestamp", "")):
            job_id = (pod["metadata"].get("labels") or {}).get(render.LABEL_JOB)
            ended = (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
            if job_id and not pod["metadata"].get("deletionTimestamp") and not (ended and job_id in pods):
                pods[job_id] = pod
        found = []
        for deployment in deployments:
            labels = deployment["metadata"].get("labels") or {}
            key = printable((deployment["metadata"].get("annotations") or {}).get(render.ANNOTATION_KEY, ""))
            owner, _, project = key.partition("/projects/")
            try:
                job = ClusterJob(labels[render.LABEL_JOB], int(labels[render.LABEL_NUMBER]),
                                 int(labels[render.LABEL_VERSION]), labels.get(render.LABEL_ROLE) == "fallback")
            except (KeyError, ValueError):
                continue  # not one of mlserve's jobs as this version makes them
            ready = int((deployment.get("status") or {}).get("readyReplicas") or 0) >= 1
            pod = pods.get(job.id)
            state, restarts = _pod_state(pod) if pod else ("no pod yet", 0)
            found.append(LiveJob(ProjectRef(owner, project), job, ready, "ready" if ready else state, restarts,
                                 deployment["metadata"].get("creationTimestamp", ""),
                                 pod["metadata"]["name"] if pod else None))
        return sorted(found, key=lambda j: (j.ref.key, j.job.number))

    def _problem(self, live: LiveJob) -> str:
        """Why a job is not ready, for the user: the pod's events and its last log lines."""
        lines = [f"{live.name}: {live.state}"]
        if live.pod:
            params = {"fieldSelector": f"involvedObject.name={live.pod}"}
            events = self.api.request("GET", self.api.path("Event"), params=params, what="read the pod's events")
            for event in (events.json().get("items") or [])[-6:]:
                lines.append(f"  event: {event.get('reason', '')}: {str(event.get('message', ''))[:240]}")
            try:
                tail = list(self.api.log_lines(live.pod, follow=False, tail=20))
                lines += [f"  log: {line}" for line in tail] or ["  log: (empty)"]
            except ClusterError as exc:
                lines.append(f"  log: not available ({exc.message[:160]})")
        return "\n".join(log_line(line) for line in lines)

    def wait_ready(self, ref: ProjectRef, jobs: list[ClusterJob], timeout_s: float) -> None:
        """Until every job's pod is ready; a pod that cannot get better, or time running out, fails with
        what the cluster says about it."""
        deadline = time.monotonic() + timeout_s
        ids = {j.id for j in jobs}
        since: dict[tuple[str, str], float] = {}  # (job, reason) -> when first seen
        while True:
            live = {j.job.id: j for j in self.jobs(ref) if j.job.id in ids}
            waiting = [live[i] for i in ids if i in live and not live[i].ready]
            if len(live) == len(ids) and not waiting:
                return
            now = time.monotonic()
            reasons = {(j.job.id, j.state.split(":")[0]): j for j in waiting}
            since = {key: since.get(key, now) for key in reasons}
            hopeless = [j for (job_id, reason), j in reasons.items()
                        if reason in HOPELESS or (reason in LASTING and now - since[(job_id, reason)] >= LASTING_S)]
            if hopeless or now > deadline:
                shown = hopeless or waiting
                why = "cannot start" if hopeless else f"not ready after {timeout_s:g} s"
                raise ClusterError(f"cluster {self.target.name}: {len(shown)} new job(s) of {ref.key} {why}",
                                   "\n".join(self._problem(j) for j in shown[:3]))
            time.sleep(POLL_S)

    # routes ---------------------------------------------------------------------------------------

    def apply_routes(self, ref: ProjectRef, changes: Changes, leaving: Iterable[str] = ()) -> None:
        """The project's Services and Ingress objects as the record and the jobs are now (read afresh:
        another command may have changed either meanwhile), without the jobs ``leaving`` (ids); the
        objects of a route no longer needed go."""
        record = self.record(ref)
        gone = set(leaving)
        jobs = [j.job for j in self.jobs(ref) if j.job.id not in gone]
        routes = plan_routes(ref, record.traffic, jobs, record.versions)
        newest = record.spec(max(record.versions)) if record.versions else None
        body_limit_mb = newest.body_limit_mb if newest else DEFAULT_BODY_LIMIT_MB
        timeout_s = newest.timeout_s if newest else DEFAULT_TIMEOUT_S
        wanted = [render.role_service(ref, "primary")]
        wanted += [render.role_service(ref, "fallback")] if routes.fallback else []
        wanted += [render.version_service(ref, v) for v in routes.versions]
        wanted += render.ingresses(ref, routes, self.target.host, self.target.ingress_class, body_limit_mb, timeout_s)
        for body in wanted:
            changes.apply(body)
        names = {b["metadata"]["name"] for b in wanted if b["kind"] == "Ingress"}
        for name in (ref.name("canary"), ref.name("direct")):
            if name not in names:
                changes.delete("Ingress", name)

    def _remove_jobs(self, ref: ProjectRef, jobs: Iterable[ClusterJob]) -> None:
        """Remove jobs already out of the routes: a failure is said, never undone (the routes moved on)."""
        changes = Changes(self.api, self.report, ref.key)
        for job in jobs:
            for kind in ("Service", "Deployment", "ConfigMap"):
                try:
                    changes.delete(kind, job.name(ref))
                except ClusterError as exc:
                    self.report(f"Warning: {ref.key}/{job.number}: {exc.message}")

    # commands -------------------------------------------------------------------------------------

    def run(self, request: RunRequest) -> ClusterDeployment:
        """Validate, build, push, apply a new version's job(s) and wait until they are ready; then route
        to them. On failure everything this run applied goes, and the record is put back."""
        if request.canary is not None and (request.replace or request.fallback):
            raise UsageError("--canary cannot be combined with --replace or --fallback")
        if request.runtime not in (None, "docker"):
            raise UsageError("--runtime: on a cluster, the image is built by Docker here and runs in pods")
        if request.max_runtime is not None:
            raise UsageError("--max-runtime is not enforced on a cluster", "Stop the job with `mlserve stop --cluster`.")
        project_dir = request.project_dir.resolve()
        config = load_config(project_dir)
        name = request.project if request.project is not None else config.project
        ref = ProjectRef(self.platform.owner, validate_project_name(name or default_project_name(project_dir)))
        app = validate_app(project_dir)
        self.report(f"Validating app.py ... ok (global {app.kind} app)" if app.kind else "Validating app.py ... ok")
        mounts = tuple(parse_cluster_mount(spec) for spec in (*request.data, *config.data))
        if len({m.mount for m in mounts}) != len(mounts):
            raise UsageError("two data sources are mounted at the same place", "Give each --data its own mount point.")
        network = _network(request.network, config.network)
        if self.named_by_config and request.access is None:
            raise UsageError(f"mlserve.yml sends {ref.key} to cluster {self.target.name}, where it would be public",
                             f"Confirm with `--access public` (or name the cluster: `--cluster {self.target.name}`); "
                             "`--cluster ''` serves it on this machine.")
        _check_access(request.access or config.access, config)
        self.api.check_namespace()  # reachable, allowed, the namespace exists: before building
        before = self.record(ref)
        live = self.jobs(ref)
        primary = [j for j in live if not j.job.fallback]
        if request.canary is not None and not primary:
            raise UsageError(f"--canary splits {ref.key}'s traffic with the version serving it, and the project has "
                             f"no primary job on cluster {self.target.name}", "Start it with a plain run first.")
        secrets = Secrets(self.platform.home, ref.owner, ref.project).environment()
        clock = _Clock()
        docker = self.platform.runtime("docker")
        built = docker.build(BuildRequest(
            project_dir=project_dir, slug=f"{ref.owner}-{ref.project}", project_key=ref.key,
            env=request.env or config.env,
            requirements=(config.requirements or "requirements.txt")
            if (project_dir / (config.requirements or "requirements.txt")).is_file() else None,
            ca_bundle=request.ca_bundle, report=self.report, network=network,
            environment={**dict(config.env_vars), **secrets}))
        clock.lap("build")
        image = self.push(ref, built.artifact.ref)
        clock.lap("push")
        spec = JobSpec(runtime="kubernetes", artifact=Artifact(image), project_dir=str(project_dir),
                       workers=request.workers or config.workers or DEFAULT_WORKERS, preload=config.preload,
                       env_vars=config.env_vars, mounts=mounts, limits=config.limits, health=config.health,
                       options=config.options, network=network)
        record = _new_version(before, spec, request.fallback, time.time())
        version = record.last_version
        active = Counter(j.job.version for j in primary)
        if request.canary is not None:
            record.traffic = with_canary(before.traffic, active, version, request.canary)
        elif not request.fallback and before.traffic.shares is not None and not any(
                active[v] for v, share in before.traffic.shares.items() if share):
            record.traffic = Traffic({version: 100})
        same_kind = [j for j in live if j.job.fallback == request.fallback]
        count = max(1, sum(1 for j in same_kind if j.ready)) if request.replace else 1
        new = [ClusterJob(new_endpoint_id(), record.last_job + i + 1, version, request.fallback) for i in range(count)]
        record.last_job += count
        changes = Changes(self.api, self.report, ref.key)
        mine = before
        old = [j.job for j in same_kind] if request.replace else []
        try:
            mine = self.save(ref, record)  # the numbers are taken: the first write
            self._start(ref, spec, new, changes, secrets, clock)
            if request.replace and not request.fallback and mine.traffic.shares is not None:
                mine = self.save(ref, replace(self.record(ref), traffic=Traffic({version: 100})))
            self.apply_routes(ref, changes, leaving=[j.id for j in old])
        except BaseException:
            changes.undo()
            self.restore(ref, before, mine)
            raise
        self._remove_jobs(ref, old)
        clock.lap("routes")
        self._forget_old_versions(ref, {j.job.version for j in live} | {version})
        self.platform.engine.untag(built.artifact.ref)  # the registry has it; its layers stay cached here
        return ClusterDeployment(ref, new, version, image, mine.traffic, [f"{ref.key}/{j.number}" for j in old],
                                 built.summary, clock.laps)

    def push(self, ref: ProjectRef, local: str) -> str:
        """The built image, pushed to the target's registry: its reference by digest (what pods run)."""
        repository = f"{self.target.registry}/{ref.slug}"
        tagged = f"{repository}:{local.rpartition(':')[2]}"
        self.report(f"Pushing {tagged} ...")
        engine = self.platform.engine
        digest = engine.push(local, tagged)
        image = f"{repository}@{digest}"
        if not engine.registry_has(image):
            raise ClusterError(f"the registry does not serve {image} after the push: the cluster's nodes could not pull it",
                               "Check that the registry address in `mlserve cluster add --registry` is the one "
                               "pushes and pulls use.")
        return image

    def _start(self, ref: ProjectRef, spec: JobSpec, new: list[ClusterJob], changes: Changes,
               secrets: dict[str, str], clock: _Clock | None = None) -> None:
        """Apply the jobs' objects (and the project's secrets, the version's network policy) and wait
        until they are ready. Secrets this machine does not have are left as the cluster has them."""
        if secrets:
            changes.apply(render.secret(ref, secrets))
        for version in sorted({job.version for job in new}):
            policy = render.network_policy(ref, version, spec.network)
            if policy is not None:
                changes.apply(policy)
        for job in new:
            changes.apply(render.job_config(ref, job, spec, self.urls(ref, job)))
            changes.apply(render.job_deployment(ref, job, spec, spec.artifact.ref))
            changes.apply(render.job_service(ref, job))
        self.report(f"Applied {len(new)} job(s) on cluster {self.target.name}; waiting until ready ...")
        if clock:
            clock.lap("apply")
        self.wait_ready(ref, new, WAIT_S)
        if clock:
            clock.lap("ready")

    def _forget_old_versions(self, ref: ProjectRef, serving: set[int]) -> None:
        """Keep the newest KEEP_VERSIONS versions (and those with jobs) in the record; best effort."""
        try:
            record = self.record(ref)
            keep = set(sorted(record.versions)[-KEEP_VERSIONS:]) | serving
            if set(record.versions) - keep:
                record.versions = {n: v for n, v in record.versions.items() if n in keep}
                self.save(ref, record)
        except ClusterError:
            pass

    def scale(self, project: str, replicas: int | None, add: int | None, version: int | None) -> list[LiveJob]:
        ref = ProjectRef(self.platform.owner, project)
        record = self.record(ref)
        if not record.versions:
            raise JobNotFoundError(f"no project {ref.key} on cluster {self.target.name}",
                                   "Start it with `mlserve run --mode serve --cluster`.")
        live = self.jobs(ref)
        if version is not None:
            if version not in record.versions:
                raise JobNotFoundError(f"project {ref.key} has no version {version} on cluster {self.target.name}",
                                       f"Its versions: {', '.join(map(str, sorted(record.versions)))}.")
            group = [j for j in live if j.job.version == version]
            source: int | None = version
        else:
            group = [j for j in live if not j.job.fallback]
            source = most_traffic(record.traffic, Counter(j.job.version for j in group))
        target = len(group) + add if add is not None else replicas
        if target is None or target < 0:
            raise UsageError("scale needs a count N >= 0, or --add K")
        changes = Changes(self.api, self.report, ref.key)
        if target > len(group):
            if source is None:
                raise JobNotFoundError(f"project {ref.key} has no running job to copy",
                                       "Start one with `mlserve run --mode serve --cluster`, or scale --version N.")
            spec = record.spec(source)
            image = spec.artifact.ref
            if not image.startswith(f"{self.target.registry}/{ref.slug}@sha256:"):
                raise ClusterError(f"the record of {ref.key} names the image {printable(image)[:120]}, not one mlserve "
                                   f"pushed to {self.target.registry}: it is not started",
                                   "Deploy the project again with `mlserve run --mode serve --cluster`.")
            new = [ClusterJob(new_endpoint_id(), record.last_job + i + 1, source, record.fallback(source))
                   for i in range(target - len(group))]
            self.save(ref, replace(record, last_job=record.last_job + len(new)))  # the numbers are taken
            try:
                self._start(ref, spec, new, changes, Secrets(self.platform.home, ref.owner, ref.project).environment())
                self.apply_routes(ref, changes)
            except BaseException:
                changes.undo()
                raise
        elif target < len(group):
            shares = record.traffic.shares or {}
            order = sorted(group, key=lambda j: (shares.get(j.job.version, 0), j.created, j.job.number))
            going = [j.job for j in order[: len(group) - target]]
            self._leave(ref, going)
        return self.jobs(ref)

    def _leave(self, ref: ProjectRef, going: list[ClusterJob]) -> None:
        """Take jobs out of the project's routes (put back if that fails), then remove them."""
        changes = Changes(self.api, self.report, ref.key)
        try:
            self.apply_routes(ref, changes, leaving=[j.id for j in going])
        except BaseException:
            changes.undo()
            raise
        if going:
            time.sleep(DRAIN_S)  # requests on their way to a leaving pod still land
        self._remove_jobs(ref, going)

    def stop(self, refs: Iterable[str], project: str | None, everything: bool) -> list[str]:
        """Remove jobs (out of the routes first, then their Deployment, Service and ConfigMap), or every
        object of a project, or of every project: only objects with mlserve's labels (and, for a
        project, its project-key annotation), nothing else."""
        if everything and self.named_by_config:
            raise UsageError(f"only mlserve.yml names cluster {self.target.name}: `stop --all` there needs it named",
                             f"`mlserve stop --all --cluster {self.target.name}`.")
        if everything or project is not None:
            ref = ProjectRef(self.platform.owner, project) if project is not None else None
            names = sorted(j.name for j in self.jobs(ref) if ref is None or j.ref.key == ref.key)
            for kind in KINDS_OF_A_PROJECT:
                for obj in self.api.list(kind, ref.selector() if ref else MANAGED_SELECTOR):
                    key = (obj["metadata"].get("annotations") or {}).get(render.ANNOTATION_KEY)
                    if ref is None or key == ref.key:
                        self.api.delete(kind, obj["metadata"]["name"])
            return names
        live = self.jobs()
        going = [self.find(live, text) for text in refs]
        for ref in {j.ref for j in going}:
            self._leave(ref, [j.job for j in going if j.ref == ref])
        return [j.name for j in going]

    def find(self, live: list[LiveJob], text: str) -> LiveJob:
        """A job by endpoint id, owner/projects/project/N, project/N or N (project from this folder)."""
        if len(text) == ENDPOINT_ID_LENGTH:
            for job in live:
                if job.job.id == text:
                    return job
        parts = text.strip("/").split("/")
        try:
            if len(parts) == 4 and parts[1] == "projects":
                key, number = f"{parts[0]}/projects/{parts[2]}", int(parts[3])
            elif len(parts) == 2:
                key, number = f"{self.platform.owner}/projects/{parts[0]}", int(parts[1])
            elif len(parts) == 1:
                key, number = f"{self.platform.owner}/projects/{folder_project(Path.cwd())}", int(parts[0])
            else:
                raise ValueError
        except ValueError:
            raise JobNotFoundError(f"no job matches {text!r}",
                                   "Name a job as owner/projects/project/N, project/N, N or by its endpoint id.") from None
        for job in live:
            if job.ref.key == key and job.job.number == number:
                return job
        raise JobNotFoundError(f"no job {key}/{number} on cluster {self.target.name}",
                               "`mlserve status --cluster` lists them.")

    def logs(self, text: str, follow: bool, tail: int | None) -> Iterator[str]:
        job = self.find(self.jobs(), text)
        if job.pod is None:
            raise JobNotFoundError(f"{job.name} has no pod yet", "`mlserve status --cluster` shows its state.")
        for line in self.api.log_lines(job.pod, follow, tail):
            yield log_line(line)

    def versions(self, project: str) -> list[dict[str, Any]]:
        """Every version on record with its image, when, jobs and share (`versions --json`)."""
        ref = ProjectRef(self.platform.owner, project)
        record = self.record(ref)
        if not record.versions:
            raise JobNotFoundError(f"no project {ref.key} on cluster {self.target.name}")
        return [{**row, "created": record.versions[row["version"]]["created"],
                 "image": record.versions[row["version"]]["image"],
                 "endpoint": self.version_endpoint(ref, row["version"])}
                for row in split_rows(record, self.jobs(ref), every=True)]

    def traffic(self, project: str, to: tuple[str, ...], to_latest: bool, by_jobs: bool,
                sticky: bool | None) -> list[dict[str, Any]]:
        """Show or set the split; the rows `traffic --json` prints."""
        if sticky is not None:
            raise UsageError("--sticky is not available on a cluster yet",
                             "ingress-nginx's canary cookie is all or nothing, not a share per browser.")
        ref = ProjectRef(self.platform.owner, project)
        record = self.record(ref)
        if not record.versions:
            raise JobNotFoundError(f"no project {ref.key} on cluster {self.target.name}")
        live = self.jobs(ref)
        if to or to_latest or by_jobs:
            before = mine = record
            shares = changed_shares(record.traffic.shares, {n: record.fallback(n) for n in record.versions}, to,
                                    to_latest, by_jobs, ref.key)
            record = replace(record, traffic=Traffic(shares))
            plan_routes(ref, record.traffic, [j.job for j in live], record.versions)  # refused before any change
            changes = Changes(self.api, self.report, ref.key)
            try:
                record = mine = self.save(ref, record)
                self.apply_routes(ref, changes)
            except BaseException:
                changes.undo()
                self.restore(ref, before, mine)
                raise
        return split_rows(record, live)


def split_rows(record: Record, live: list[LiveJob], every: bool = False) -> list[dict[str, Any]]:
    """Each version with a job or a share (``every``: each version on record): its percent, jobs and
    ready jobs (as `traffic --json`)."""
    active = Counter(j.job.version for j in live)
    ready = Counter(j.job.version for j in live if j.ready)
    primary_active = {v: n for v, n in active.items() if not record.fallback(v)}
    set_to = percents(primary_active) if record.traffic.shares is None else {
        v: float(p) for v, p in record.traffic.shares.items()}
    shares = record.traffic.shares or {}
    return [{"version": n, "percent": 0.0 if record.fallback(n) else set_to.get(n, 0.0), "jobs": active[n],
             "healthy": ready[n], "fallback": record.fallback(n)}
            for n in sorted(record.versions) if every or active[n] or shares.get(n)]


def plan_routes(ref: ProjectRef, traffic: Traffic, jobs: list[ClusterJob], versions: Iterable[int]) -> Routes:
    """Where the project endpoint goes: equal turns per primary job (the primary Service), or the
    version with the largest share, with a second version as ingress-nginx's weighted canary. As on
    one machine, a share of a version without a job goes to the others (equal turns when none with a
    share has one). Every version on record keeps its endpoint (its Service answers 503 without a job)."""
    fallback = ref.name("fallback") if any(j.fallback for j in jobs) else None
    every = tuple(sorted(set(versions) | {j.version for j in jobs}))
    ordered = tuple(sorted(jobs, key=lambda j: j.number))
    with_jobs = {j.version for j in jobs if not j.fallback}
    shared = sorted(((p, v) for v, p in (traffic.shares or {}).items() if p > 0 and v in with_jobs),
                    key=lambda pv: (-pv[0], pv[1]))
    if len([v for v, p in (traffic.shares or {}).items() if p > 0]) > 2:
        raise UsageError(f"{len(traffic.shares or {})} versions with a share: on a cluster, ingress-nginx splits a "
                         "route between two versions at most (a main route and one weighted canary)",
                         "Give at most two versions a share, e.g. `--to 3=90 --to 4=10`.")
    if not shared:
        return Routes(ref.name("primary"), fallback=fallback, versions=every, jobs=ordered)
    main = ref.name(f"v{shared[0][1]}")
    if len(shared) == 1:
        return Routes(main, fallback=fallback, versions=every, jobs=ordered)
    weight = round(100 * shared[1][0] / (shared[0][0] + shared[1][0]))
    return Routes(main, ref.name(f"v{shared[1][1]}"), weight, fallback, every, ordered)


def _new_version(record: Record, spec: JobSpec, fallback: bool, now: float) -> Record:
    number = record.last_version + 1
    versions = {**record.versions, number: {"number": number, "image": spec.artifact.ref, "created": now,
                                            "fallback": fallback, "spec": spec.to_json()}}
    return replace(record, versions=versions, last_version=number)


def _check_access(access: str | None, config: Any) -> None:
    """A cluster's URL is reachable by whoever reaches its ingress, and mlserve's tokens and rate limits
    live in its own gateway: a project goes to a cluster only when it is meant to be public."""
    if access != "public":
        raise UsageError("on a cluster, mlserve's bearer tokens are not checked (they live in mlserve's own gateway): "
                         "the project would be open to anyone who reaches the cluster's ingress",
                         "If it is meant to be public, say so with `--access public` (or `access: public` in "
                         "mlserve.yml); protect it with your ingress's own authentication otherwise.")
    if config.rate is not None or config.cors is not None:
        raise UsageError("mlserve.yml's limits.rate and cors are applied by mlserve's own gateway, not on a cluster",
                         "Remove them for the cluster, or set them on your ingress controller.")


def _pod_state(pod: dict[str, Any]) -> tuple[str, int]:
    """What a pod is doing, in a word or two (a waiting reason with its message), and its restarts."""
    status = pod.get("status") or {}
    restarts = 0
    for container in status.get("containerStatuses") or []:
        restarts += int(container.get("restartCount") or 0)
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            message = printable(str(waiting.get("message") or ""))[:160]
            reason = printable(str(waiting["reason"]))[:60]
            return (f"{reason}: {message}" if message else reason), restarts
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"Unschedulable: {printable(str(condition.get('message') or ''))[:160]}", restarts
    phase = str(status.get("phase") or "Pending")
    return ("starting" if phase in ("Pending", "Running") else phase.lower()), restarts
