"""Serving jobs' instances: reserve, launch, wait until healthy, drain and stop.

The state lock is held only to read and write the record: callers reserve jobs (or mark them
stopping) under it, then launch, wait and drain without it. A job in a passing state names its
actor (this process), so the reconcile step can undo or finish what a killed command left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .actors import actor_alive, this_actor
from .constants import DRAIN_GRACE_S, ENDPOINT_ID_LENGTH, KEEP_VERSIONS, MANIFEST_NAME
from .errors import JobStartError, MlserveError
from .health import wait_healthy
from .platform import Platform
from .privileges import share_sockets
from .project import check_data_source
from .quota import OutputVolume
from .routing import Router
from .runtimes import InstanceSpec, UwsgiSettings, instance_environment
from .secrets import Secrets
from .state import Job, Version

BASE62 = string.digits + string.ascii_letters
START_TIMEOUT_S = int(os.environ.get("MLSERVE_START_TIMEOUT", "120"))
LOG_TAIL = 20
START_PARALLELISM = 8  # instances started at once (starting is CPU-bound on a small machine)
STOP_PARALLELISM = 16  # instances stopped at once (a stop mostly waits for uWSGI to end)


def new_endpoint_id() -> str:
    """22 characters of a cryptographic random base62 string (about 131 bits)."""
    return "".join(secrets.choice(BASE62) for _ in range(ENDPOINT_ID_LENGTH))


class Instances:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state
        self.router = Router(platform)
        self.report = platform.report

    # starting -------------------------------------------------------------------------------

    def reserve(self, version: Version, count: int) -> list[Job]:
        """Record ``count`` new jobs of ``version`` as starting, owned by this process. The caller holds
        the state lock."""
        owner, project, spec = version.owner, version.project, version.spec
        runtime = self.platform.runtime(spec.runtime)
        if not runtime.has(spec.artifact):
            raise JobStartError(
                f"version {version.number} of {version.project_key} has no image any more ({spec.artifact.ref})",
                f"mlserve keeps the images of a project's newest {KEEP_VERSIONS} versions and of every serving job "
                "(or a concurrent run cleaned it up); run it again from its folder with `mlserve run --mode serve`.")
        settings = self.platform.gateway.settings
        spec = spec.with_gateway(settings.body_limit_mb, settings.timeout_s)
        actor, jobs = this_actor(), []
        for _ in range(count):
            job = Job(id=new_endpoint_id(), owner=owner, project=project, number=self.state.next_number(owner, project),
                      state="starting", healthy=False, handle=None, spec=spec, created_at=time.time(), actor=actor,
                      version=version.number)
            self.state.add_job(job)
            jobs.append(job)
        return jobs

    def launch(self, jobs: list[Job]) -> list[Job]:
        """Start reserved jobs, wait until all answer, then route them. All or nothing: on any failure
        (or Ctrl-C) every one of them is stopped and forgotten, and the error is raised."""
        try:
            self._start_instances(jobs)
            self._wait_healthy(jobs)
            with self.state.lock():
                gone = [j.name for j in jobs if (self.state.get_job(j.id) or j).state != "starting"]
                if gone:
                    raise JobStartError(f"{', '.join(gone)} stopped while starting (another command stopped it)")
                now = time.time()
                for job in jobs:
                    job.state, job.healthy, job.started_at, job.actor = "running", True, now, None
                    self.state.update_job(job.id, state="running", healthy=True, started_at=now, actor=None)
                self.router.apply(start=True)
        except BaseException:
            self.discard(jobs)
            raise
        return jobs

    def instance_spec(self, job: Job) -> InstanceSpec:
        """How to start (or restart) the instance of ``job``; writes its manifest."""
        spec, home = job.spec, self.platform.home
        runtime = self.platform.runtime(spec.runtime)
        run_dir, output_dir, socket_dir = home.run_dir(job.id), home.output_dir(job.id), home.socket(job.id).parent
        for path in (run_dir, socket_dir, output_dir):
            path.mkdir(parents=True, exist_ok=True)
        OutputVolume.of(home, job.id).mount(spec.limits.output_bytes)  # /output: a filesystem of the limit's size
        runtime.prepare(socket_dir, output_dir)  # the instance writes only these two
        share_sockets(run_dir, socket_dir)  # the gateway's workers reach the sockets, nothing else here
        for mount in spec.mounts:  # a data folder may have become a link to somewhere else since the run
            check_data_source(Path(mount.source).resolve(), home.root)
        view = runtime.view(spec.artifact, run_dir, output_dir, spec.mounts)
        manifest = {
            "job": job.name,
            "id": job.id,
            "project": job.project_key,
            "endpoint": self.platform.endpoint(job.id),
            "project_endpoint": self.platform.project_endpoint(job.project_key),
            "version": job.version,
            "version_endpoint": self.platform.version_endpoint(job.project_key, job.version),
            "data": [{"source": m.source, "mount": m.mount} for m in view.mounts],
            "options": dict(spec.options),
            "workers": spec.workers,
        }
        (run_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        # Secrets are read now, at each start: never part of the job spec (it is stored in the state).
        env = {**instance_environment(spec, name=job.name, job_id=job.id, version=job.version, app_dir=view.app_dir,
                                      output_dir=view.output_dir, manifest_file=f"{view.run_dir}/{MANIFEST_NAME}"),
               **Secrets(home, job.owner, job.project).environment()}
        uwsgi = UwsgiSettings(spec.workers, spec.timeout_s, spec.body_limit_mb * 1024 * 1024, spec.preload)
        return InstanceSpec(job.id, job.name, job.project_key, spec.artifact, run_dir, output_dir, uwsgi, env,
                            spec.mounts, spec.limits, spec.network)

    def _wait_healthy(self, jobs: list[Job]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(jobs)
        while pending:
            job = pending[0]
            result = wait_healthy(str(self.platform.home.socket(job.id)), min(deadline, time.monotonic() + 1.0))
            if result.ok:
                pending.pop(0)
                continue
            runtime = self.platform.runtime(job.runtime)
            instance = runtime.inspect(job.id, job.handle)
            if not instance.running or time.monotonic() >= deadline:
                why = (f"it exited: {instance.status}" if not instance.running
                       else f"no answer in {START_TIMEOUT_S}s ({result.detail})")
                tail = "\n".join(runtime.logs(job.id, job.handle, follow=False, tail=LOG_TAIL))
                raise JobStartError(f"{job.name} did not become healthy: {why}", f"Last log lines:\n{tail}")
            pending.append(pending.pop(0))

    def discard(self, jobs: Iterable[Job]) -> None:
        """Undo jobs that never served: stop their instances, forget their rows and files."""
        jobs = list(jobs)
        if not jobs:
            return
        try:
            self._stop_instances(jobs, timeout=5)
        finally:
            with self.state.lock():
                for job in jobs:
                    self.state.delete_job(job.id)
                self.reroute_after_error()
            for job in jobs:
                shutil.rmtree(self.platform.home.run_dir(job.id), ignore_errors=True)
                OutputVolume.of(self.platform.home, job.id).delete()  # unmounted first, then its folder and image

    def reroute_after_error(self) -> None:
        """Apply the routes while cleaning up after an error: that error is the one to show, so the
        gateway's own only becomes a notice. The caller holds the state lock."""
        try:
            self.router.apply()
        except MlserveError as exc:
            self.report(f"Notice: the gateway could not be updated: {exc.message}")

    # stopping -------------------------------------------------------------------------------

    def begin_stop(self, jobs: Iterable[Job], reason: str | None = None) -> list[Job]:
        """Take jobs out of the rotation and mark them stopping, owned by this process. The caller holds
        the state lock. Returns the jobs that were still active (a job another live command is
        already stopping is left to it)."""
        actor, taken = this_actor(), []
        for job in jobs:
            current = self.state.get_job(job.id)
            if current is None or not current.active:
                continue
            if current.state == "stopping" and current.actor != actor and actor_alive(current.actor):
                continue
            self.state.update_job(job.id, state="stopping", healthy=False, reason=reason, actor=actor)
            current.state, current.reason = "stopping", reason
            taken.append(current)
        if taken:
            self.router.apply()
        return taken

    def finish_stop(self, jobs: list[Job], final_state: str = "stopped", drain: bool = True) -> list[Job]:
        """Let requests on their way land, stop the instances in parallel (uWSGI finishes in-flight
        requests, up to the timeout), then record ``final_state``. The instances' logs are kept."""
        if not jobs:
            return []
        if drain and self.platform.gateway.is_running():
            time.sleep(DRAIN_GRACE_S)
        self._stop_instances(jobs, timeout=self.platform.gateway.settings.timeout_s + 5)
        for job in jobs:  # a stopped job's output stays, in its image; it holds no loop device
            OutputVolume.of(self.platform.home, job.id).unmount()
        now = time.time()
        with self.state.lock():
            for job in jobs:
                self.state.update_job(job.id, state=final_state, healthy=False, stopped_at=now, actor=None)
        for job in jobs:
            self.report(f"Stopped {job.name}" + (f" ({job.reason.splitlines()[0]})" if job.reason else ""))
        return [self.state.get_job(j.id) or j for j in jobs]

    def stop(self, jobs: Iterable[Job], reason: str | None = None, final_state: str = "stopped") -> list[Job]:
        """Drain, then stop. Returns the jobs stopped (those no longer active are skipped)."""
        with self.state.lock():
            taken = self.begin_stop(jobs, reason)
        return self.finish_stop(taken, final_state)

    def fail(self, job: Job, reason: str) -> None:
        """Give up on a job that keeps failing: stop it, keep its last log lines in the reason."""
        tail = list(self.platform.runtime(job.runtime).logs(job.id, job.handle, follow=False, tail=LOG_TAIL))
        self.stop([job], reason=reason + ("\nlast log lines:\n" + "\n".join(tail) if tail else ""), final_state="failed")

    def _start_instances(self, jobs: list[Job]) -> None:
        """Start every job's instance at once, then record their handles (the state is this thread's)."""
        def start_one(job: Job) -> None:
            self.report(f"Starting {job.name} ...")
            job.handle = self.platform.runtime(job.runtime).start(self.instance_spec(job))

        try:
            _each_at_once(jobs, start_one, "starting an instance", START_PARALLELISM)
        finally:
            for job in jobs:
                if job.handle:
                    self.state.update_job(job.id, handle=job.handle)

    def _stop_instances(self, jobs: list[Job], timeout: int) -> None:
        """Stop every job's instance at once."""
        def stop_one(job: Job) -> None:
            self.platform.runtime(job.runtime).stop(job.id, job.handle, timeout=timeout)

        _each_at_once(jobs, stop_one, "stopping an instance", STOP_PARALLELISM)


def _each_at_once(jobs: list[Job], action: Callable[[Job], None], what: str, parallelism: int) -> None:
    """``action`` on every job, ``parallelism`` at a time; raises the first error after all were tried."""
    with ThreadPoolExecutor(max_workers=min(parallelism, len(jobs))) as pool:
        futures = [pool.submit(action, job) for job in jobs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        first = errors[0]
        raise first if isinstance(first, MlserveError) else MlserveError(f"{what} failed: {first}")
