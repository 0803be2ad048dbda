"""Serving jobs: run, scale, stop, observe. The core behind the click commands."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import docker
import docker.errors

from mlserve.builder import ImageBuilder, find_ca_bundle, resolve_base_image
from mlserve.constants import (
    CONTAINER_UID,
    DEFAULT_LOG_FILE_MAX_BYTES,
    DEFAULT_WORKERS,
    ENDPOINT_ID_LENGTH,
    INSTANCE_APP_DIR,
    INSTANCE_OUTPUT_DIR,
    INSTANCE_RUN_DIR,
    DEFAULT_MAX_RUNTIME_S,
    DRAIN_GRACE_S,
    MANIFEST_NAME,
)
from mlserve.engine import engine_errors
from mlserve.errors import EngineUnavailableError, JobNotFoundError, JobStartError, UsageError
from mlserve.gateway import Route
from mlserve.health import wait_healthy
from mlserve.platform import Platform
from mlserve.project import (
    default_project_name,
    load_config,
    parse_data_mount,
    parse_duration,
    validate_project_name,
)
from mlserve.runtimes import DataMount, InstanceSpec, InstanceState
from mlserve.runtimes.local import LocalBuilder
from mlserve.state import Job
from mlserve.validate import validate_app

BASE62 = string.digits + string.ascii_letters
START_TIMEOUT_S = int(os.environ.get("MLSERVE_START_TIMEOUT", "120"))
LOG_TAIL = 20


def new_endpoint_id() -> str:
    """22 characters of a cryptographic random base62 string (about 131 bits)."""
    return "".join(secrets.choice(BASE62) for _ in range(ENDPOINT_ID_LENGTH))


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
    build: dict


class JobService:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.report = platform.report

    # endpoints --------------------------------------------------------------

    def endpoint(self, job: Job) -> str:
        return f"{self.platform.gateway.url}/serve/{job.id}"

    def project_endpoint(self, owner: str, project: str) -> str:
        return f"{self.platform.gateway.url}/serve/{owner}/projects/{project}"

    # run --------------------------------------------------------------------

    def run(self, request: RunRequest) -> Deployment:
        """Validate, build and start one serving job. Raises an MlserveError and leaves nothing behind on failure."""
        project_dir = request.project_dir.resolve()
        config = load_config(project_dir)
        project = validate_project_name(request.project or config.project or default_project_name(project_dir))
        owner = self.platform.owner
        report = validate_app(project_dir)
        self.report(f"Validating app.py ... ok (global {report.kind} app)" if report.kind else "Validating app.py ... ok")
        mounts = [parse_data_mount(spec, Path.cwd()) for spec in request.data]
        mounts += [parse_data_mount(spec, project_dir) for spec in config.data]
        _check_unique_mounts(mounts)
        requirements = config.requirements or "requirements.txt"
        requirements = requirements if (project_dir / requirements).is_file() else None
        # A project stays on the runtime its jobs run on: a brief engine outage must not move it.
        serving = self.state.jobs(active_only=True, owner=owner, project=project)
        runtime = self.platform.choose_runtime(request.runtime or (serving[-1].runtime if serving else None))
        self._gateway_preflight()

        slug = f"{owner}-{project}"
        started = time.monotonic()
        if runtime == "docker":
            client = self.platform.docker
            base = resolve_base_image(client, request.env or config.env or "default", self.report)
            builder = ImageBuilder(client, self.platform.home_label, self.report)
            self.report(f"Building image mlserve/{slug} on {base} ...")
            result = builder.build(
                project_dir, f"mlserve/{slug}", base, requirements,
                find_ca_bundle(request.ca_bundle), f"{owner}/projects/{project}",
            )
            image, venv = result.tag, None
            build = {"image": image, "seconds": round(result.seconds, 2), "steps": result.steps, "cached": result.cached,
                     "context_bytes": result.context_bytes}
            self.report(f"Built {image} in {result.seconds:.1f}s ({result.cached}/{result.steps} steps cached)")
        else:
            if request.env:
                self.report("Notice: --env is ignored by --runtime local (it uses this machine's python3).")
            image, venv = LocalBuilder(self.platform.home, self.report).prepare(project_dir, slug, requirements)
            build = {"image": image, "seconds": round(time.monotonic() - started, 2)}

        settings = {
            "runtime": runtime,
            "image": image,
            "venv": venv,
            "project_dir": str(project_dir),
            "workers": request.workers or config.workers or DEFAULT_WORKERS,
            "preload": bool(config.preload),
            "env_vars": dict(config.env_vars or {}),
            "data": [{"source": str(m.source), "mount": m.mount} for m in mounts],
            "limits": dict(config.limits or {}),
            "health": dict(config.health or {}),
            "options": dict(config.options or {}),
            "max_runtime_s": parse_duration(
                request.max_runtime if request.max_runtime is not None else config.max_runtime, DEFAULT_MAX_RUNTIME_S
            ),
        }
        with self.state.lock():
            try:
                jobs = self._start(owner, project, settings, count=1)
            except BaseException:
                if runtime == "docker" and not any(j.image == image for j in self.state.jobs()):
                    _untag(self.platform.docker, image)  # a tag no job runs is a leftover
                raise
        return Deployment(jobs, {j.id: self.endpoint(j) for j in jobs}, self.project_endpoint(owner, project), build)

    def _gateway_preflight(self) -> None:
        """Fail before building when the gateway cannot come up (nginx missing, port taken)."""
        gateway = self.platform.gateway
        if not gateway.is_running():
            gateway.preflight()

    # starting instances -------------------------------------------------------

    def _start(self, owner: str, project: str, settings: dict, count: int) -> list[Job]:
        """Start ``count`` jobs with ``settings``, wait until all answer, then route them. All or nothing."""
        runtime = self.platform.runtime(settings["runtime"])
        gateway = self.platform.gateway.settings
        settings = {**settings, "body_limit_mb": gateway.body_limit_mb, "timeout_s": gateway.timeout_s}
        jobs: list[Job] = []
        try:
            for _ in range(count):
                number = self.state.next_number(owner, project)
                job = Job(
                    id=new_endpoint_id(), owner=owner, project=project, number=number,
                    runtime=settings["runtime"], image=settings["image"], state="starting", healthy=False,
                    handle=None, settings=settings, created_at=time.time(),
                )
                self.state.add_job(job)
                jobs.append(job)
                self.report(f"Starting {job.name} ...")
                job.handle = runtime.start(self.spec(job))
                self.state.update_job(job.id, handle=job.handle)
            self._wait_healthy(jobs)
            now = time.time()
            for job in jobs:
                job.state, job.healthy, job.started_at = "running", True, now
                self.state.update_job(job.id, state="running", healthy=True, started_at=now)
            self.apply_routes()
        except BaseException:
            for job in jobs:
                self._discard(job)
            if jobs:
                self.apply_routes(start=False)
            raise
        return jobs

    def spec(self, job: Job) -> InstanceSpec:
        """How to start (or restart) the instance of ``job``; writes its manifest."""
        s = job.settings
        home = self.platform.home
        run_dir, output_dir = home.run_dir(job.id), home.output_dir(job.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The instance writes only its socket's folder and its output folder.
        for path in (home.socket(job.id).parent, output_dir):
            path.mkdir(parents=True, exist_ok=True)
            if s["runtime"] == "docker":
                _give_to_instance_user(path)
        in_container = s["runtime"] == "docker"
        inst_run = INSTANCE_RUN_DIR if in_container else str(run_dir)
        inst_out = INSTANCE_OUTPUT_DIR if in_container else str(output_dir)
        app_dir = INSTANCE_APP_DIR if in_container else s["image"]
        manifest = {
            "job": job.name,
            "id": job.id,
            "project": job.project_key,
            "endpoint": self.endpoint(job),
            "project_endpoint": self.project_endpoint(job.owner, job.project),
            "data": s["data"] if in_container else [{**d, "mount": d["source"]} for d in s["data"]],
            "options": s["options"],
            "workers": s["workers"],
        }
        (run_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        env = {
            **s["env_vars"],
            "MLSERVE_APP_DIR": app_dir,
            "MLSERVE_JOB": job.name,
            "MLSERVE_ENDPOINT_ID": job.id,
            "OUTPUT_DIR": inst_out,
            "LOG_FILE": f"{inst_out}/app.log",
            "LOG_FILE_MAX_BYTES": str(DEFAULT_LOG_FILE_MAX_BYTES),
            "MANIFEST_FILE": f"{inst_run}/{MANIFEST_NAME}",
        }
        if s["health"].get("path"):
            env["MLSERVE_HEALTH_PATH"] = s["health"]["path"]
            env["MLSERVE_HEALTH_METHOD"] = s["health"].get("method", "GET")
        return InstanceSpec(
            job_id=job.id,
            name=job.name,
            project_key=job.project_key,
            image=s["image"],
            run_dir=run_dir,
            output_dir=output_dir,
            uwsgi={
                "workers": s["workers"],
                "timeout_s": s["timeout_s"],
                "body_limit_bytes": s["body_limit_mb"] * 1024 * 1024,
                "preload": s["preload"],
            },
            env=env,
            data=tuple(DataMount(d["source"], d["mount"]) for d in s["data"]),
            limits=s["limits"],
            venv=s.get("venv"),
        )

    def _wait_healthy(self, jobs: list[Job]) -> None:
        runtime = self.platform.runtime(jobs[0].runtime)
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(jobs)
        while pending:
            job = pending[0]
            socket = str(self.platform.home.socket(job.id))
            result = wait_healthy(
                socket, min(deadline, time.monotonic() + 1.0),
            )
            if result.ok:
                pending.pop(0)
                continue
            instance = runtime.inspect(job.id, job.handle)
            if not instance.running or time.monotonic() >= deadline:
                why = f"it exited: {instance.status}" if not instance.running else f"no answer in {START_TIMEOUT_S}s ({result.detail})"
                tail = "\n".join(list(runtime.logs(job.id, job.handle, follow=False, tail=LOG_TAIL)))
                raise JobStartError(f"{job.name} did not become healthy: {why}", f"Last log lines:\n{tail}")
            pending.append(pending.pop(0))

    def _discard(self, job: Job) -> None:
        """Undo a job that never served: stop its instance, forget its row and files."""
        try:
            self.platform.runtime(job.runtime).stop(job.id, job.handle, timeout=5)
        finally:
            self.state.delete_job(job.id)
            shutil.rmtree(self.platform.home.run_dir(job.id), ignore_errors=True)
            shutil.rmtree(self.platform.home.output_dir(job.id), ignore_errors=True)

    # routes -----------------------------------------------------------------

    def routes(self) -> list[Route]:
        """Active jobs as the gateway routes them: only healthy running ones take traffic."""
        return [
            Route(job.id, job.name, job.project_key, str(self.platform.home.socket(job.id)),
                  job.healthy and job.state == "running", job.reason or job.state)
            for job in self.state.jobs(active_only=True)
            if job.state != "stopping"
        ]

    def apply_routes(self, start: bool = True) -> None:
        """Render the gateway from the state; starts it (and the supervisor) when ``start`` and it is not running."""
        from mlserve import supervisor  # it drives this service: a top-level import would be circular

        gateway = self.platform.gateway
        if start or gateway.is_running():
            gateway.apply(self.routes(), self.state.projects())
            if start:
                supervisor.ensure_running(self.platform.home)

    def revive(self) -> list[str]:
        """After a crash or a reboot: bring back the gateway's routes and the supervisor if jobs should serve.

        Returns notices of what had to be restored.
        """
        from mlserve import supervisor

        if not self.state.jobs(active_only=True):
            return []
        notes = []
        supervised = supervisor.pid(self.platform.home) is not None
        if not self.platform.gateway.is_running():
            with self.state.lock():
                self.apply_routes()  # starts the supervisor too
            notes.append("the gateway was not running; its routes were restored from the state")
        else:
            supervisor.ensure_running(self.platform.home)  # also replaces one left by older code
        if not supervised:
            notes.append("the supervisor was not running; it was started again "
                         f"(its log: {self.platform.home.gateway_dir / supervisor.LOGFILE})")
        return notes

    # scale and stop -----------------------------------------------------------

    def scale(self, owner: str, project: str, replicas: int | None = None, add: int | None = None) -> list[Job]:
        """Make the project have ``replicas`` active jobs (or ``add`` more): new ones copy the newest job."""
        with self.state.lock():
            active = [j for j in self.state.jobs(active_only=True, owner=owner, project=project) if j.state != "stopping"]
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
                settings = {k: v for k, v in newest.settings.items() if k not in ("body_limit_mb", "timeout_s")}
                self._start(owner, project, settings, count=target - len(active))
            elif target < len(active):
                self.stop_locked(sorted(active, key=lambda j: (j.created_at, j.number))[: len(active) - target])
            return [j for j in self.state.jobs(active_only=True, owner=owner, project=project)]

    def stop(self, jobs: list[Job]) -> list[Job]:
        with self.state.lock():
            current = [self.state.get_job(j.id) for j in jobs]
            return self.stop_locked([j for j in current if j is not None and j.active])

    def stop_locked(self, jobs: list[Job], reason: str | None = None, final_state: str = "stopped") -> list[Job]:
        """Drain, then stop: leave the rotation first, let requests on their way land, then SIGTERM
        (uWSGI finishes in-flight requests, up to the timeout). The instance's log is kept."""
        if not jobs:
            return []
        for job in jobs:
            self.state.update_job(job.id, state="stopping", healthy=False, reason=reason)
        if self.platform.gateway.is_running():
            self.apply_routes(start=False)
            time.sleep(DRAIN_GRACE_S)
        timeout = self.platform.gateway.settings.timeout_s + 5
        for job in jobs:
            runtime = self.platform.runtime(job.runtime)
            if job.runtime == "docker":
                _save_log(self.platform.home.run_dir(job.id), runtime.logs(job.id, job.handle, follow=False, tail=1000))
            runtime.stop(job.id, job.handle, timeout=timeout)
            self.state.update_job(job.id, state=final_state, healthy=False, stopped_at=time.time())
            self.report(f"Stopped {job.name}" + (f" ({reason})" if reason else ""))
        return [self.state.get_job(j.id) for j in jobs]  # type: ignore[misc]

    def fail(self, job: Job, reason: str) -> None:
        """Give up on a job that keeps failing: stop it, keep its last log lines in the reason."""
        tail = list(self.platform.runtime(job.runtime).logs(job.id, job.handle, follow=False, tail=LOG_TAIL))
        self.stop_locked([job], reason=reason + ("\nlast log lines:\n" + "\n".join(tail) if tail else ""),
                         final_state="failed")

    # observing ----------------------------------------------------------------

    def status(self, include_stopped: bool = False) -> tuple[list["JobView"], list[InstanceState]]:
        """Jobs joined with what really runs (labels are the truth), and instances no job claims."""
        jobs = self.state.jobs(active_only=not include_stopped)
        seen: dict[str, InstanceState] = {}
        engine_note = None
        if any(j.runtime == "docker" for j in jobs) or not include_stopped:
            try:
                seen = {i.job_id: i for i in self.platform.runtime("docker").instances()}
            except EngineUnavailableError as exc:
                engine_note = exc.message
        views = []
        for job in jobs:
            instance = None
            if job.active:
                if job.runtime == "docker":
                    instance = seen.get(job.id) or InstanceState(
                        job.id, "", False, "unknown (engine unreachable)" if engine_note else "gone (no container)"
                    )
                else:
                    instance = self.platform.runtime(job.runtime).inspect(job.id, job.handle)
            views.append(JobView.of(job, instance, self.endpoint(job)))
        known = {j.id for j in self.state.jobs(active_only=True)}
        orphans = [i for i in seen.values() if i.job_id not in known]
        return views, orphans

    def remove_orphans(self) -> int:
        """Stop and remove instances that carry this home's labels but belong to no active job."""
        _, orphans = self.status()
        runtime = self.platform.runtime("docker") if orphans else None
        for orphan in orphans:
            runtime.stop(orphan.job_id, orphan.handle, timeout=10)  # type: ignore[union-attr]
            self.report(f"Removed container {orphan.handle[:12]} (no job)")
        return len(orphans)

    # lookups ----------------------------------------------------------------

    def resolve(self, ref: str, cwd: Path | None = None) -> Job:
        """A job by endpoint id, full name, ``project/N`` or ``N`` (project from the folder)."""
        owner = self.platform.owner
        job = self.state.get_job(ref) if len(ref) == ENDPOINT_ID_LENGTH else None
        if job:
            return job
        parts = ref.strip("/").split("/")
        try:
            if len(parts) == 4 and parts[1] == "projects":
                owner, project, number = parts[0], parts[2], int(parts[3])
            elif len(parts) == 2:
                project, number = parts[0], int(parts[1])
            elif len(parts) == 1:
                number = int(parts[0])
                project = self.folder_project(cwd or Path.cwd())
            else:
                raise ValueError
        except ValueError:
            raise JobNotFoundError(
                f"no job matches {ref!r}",
                "Name a job as owner/projects/project/N, project/N, N (inside the project folder) or by its endpoint id; "
                "`mlserve status` lists them.",
            ) from None
        for job in self.state.jobs(owner=owner, project=project):
            if job.number == number:
                return job
        raise JobNotFoundError(f"no job {owner}/projects/{project}/{number}", "`mlserve status --all` lists every job.")

    def folder_project(self, folder: Path) -> str:
        config = load_config(folder) if (folder / "mlserve.yml").exists() else None
        return validate_project_name((config.project if config else None) or default_project_name(folder))

    def logs(self, job: Job, follow: bool, tail: int | None) -> Iterator[str]:
        if job.active:
            yield from self.platform.runtime(job.runtime).logs(job.id, job.handle, follow=follow, tail=tail)
            return
        saved = self.platform.home.run_dir(job.id) / "instance.log"
        if saved.exists():
            lines = saved.read_text(errors="replace").splitlines()
            yield from lines[-tail:] if tail else lines


@dataclass(frozen=True)
class JobView:
    """One job as `status` and `info` show it: the record, corrected by what really runs."""

    job: Job
    status: str
    healthy: bool
    uptime: float | None
    endpoint: str

    @classmethod
    def of(cls, job: Job, instance: InstanceState | None, endpoint: str) -> "JobView":
        if not job.active:
            return cls(job, job.state, False, None, endpoint)
        if instance is not None and not instance.running:
            # Drift: the record says it runs, the runtime says it does not.
            return cls(job, instance.status, False, None, endpoint)
        status = job.state
        uptime = time.time() - job.started_at if job.started_at else None
        return cls(job, status, job.healthy and job.state == "running", uptime, endpoint)

    @property
    def expires_in(self) -> float | None:
        """Seconds until the job's maximum runtime is over (None: no limit, or not running)."""
        limit = self.job.settings.get("max_runtime_s")
        if not limit or self.uptime is None:
            return None
        return max(0.0, limit - self.uptime)

    def as_dict(self) -> dict:
        job = self.job
        return {
            "job": job.name,
            "id": job.id,
            "owner": job.owner,
            "project": job.project,
            "number": job.number,
            "state": self.status,
            "healthy": self.healthy,
            "runtime": job.runtime,
            "image": job.image,
            "created": job.created_at,
            "uptime": round(self.uptime, 1) if self.uptime is not None else None,
            "endpoint": self.endpoint,
            "restarts": job.restarts,
            "reason": job.reason,
            "expires_in": round(self.expires_in) if self.expires_in is not None else None,
        }


def _check_unique_mounts(mounts: list) -> None:
    seen: set[str] = set()
    for mount in mounts:
        if mount.mount in seen:
            raise UsageError(f"two data sources are mounted at {mount.mount}", "Give each --data a different mount point.")
        seen.add(mount.mount)


def _give_to_instance_user(path: Path) -> None:
    # The instance runs as an unprivileged uid and must create its socket and files here.
    if os.geteuid() == 0:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
    else:
        path.chmod(0o777)


def _save_log(run_dir: Path, lines: Iterator[str]) -> None:
    try:
        with open(run_dir / "instance.log", "w") as handle:
            for line in lines:
                handle.write(line + "\n")
    except OSError:
        pass


def _untag(client: docker.DockerClient, image: str) -> None:
    # noprune keeps the parent layers, so the next build still starts from the cache.
    with engine_errors(f"removing the image {image}"):
        try:
            client.images.remove(image, noprune=True)
        except docker.errors.APIError:
            pass
