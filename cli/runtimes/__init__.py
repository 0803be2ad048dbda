"""Runtimes build, start, stop and observe serving instances: in Docker containers, or as host processes.

Everything that differs between them lives behind ``Runtime``: how the app is built, where an
instance sees its folders, how its logs are kept, how a build is thrown away. The core that
runs, scales and stops jobs never asks which runtime it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ..config import Limits
from ..constants import DEFAULT_LOG_FILE_MAX_BYTES, SOCKET_NAME, STATS_SOCKET_NAME, UWSGI_INI_NAME
from ..render import render
from ..spec import Artifact, DataMount, JobSpec

__all__ = ["Artifact", "BuildRequest", "Built", "DataMount", "InstanceSpec", "InstanceState", "InstanceView",
           "Runtime", "UwsgiSettings", "instance_environment", "uwsgi_ini", "write_uwsgi_ini"]


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the project folder and how its environment is made."""

    project_dir: Path
    slug: str  # owner-project: names the image repository or the venv
    project_key: str  # owner/projects/project
    env: str | None  # --env: a named environment or an image reference
    requirements: str | None  # relative to project_dir, when there is one
    ca_bundle: str | None  # --ca-bundle
    report: Callable[[str], None]
    network: str = "isolated"  # config.NETWORKS: the import check runs on the instances' network
    # The import check's environment, as the instances will have it (mlserve.yml's env_vars, the
    # project's secrets): given to the check's container only, never written into the image.
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    artifact: Artifact
    summary: dict[str, Any]  # what `run --json` shows under "build"


@dataclass(frozen=True)
class InstanceView:
    """Where an instance sees its folders (inside a container they are mounted elsewhere)."""

    run_dir: str
    output_dir: str
    app_dir: str
    mounts: tuple[DataMount, ...]


@dataclass(frozen=True)
class UwsgiSettings:
    workers: int
    timeout_s: int
    body_limit_bytes: int
    preload: bool


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance of a job."""

    job_id: str
    name: str  # owner/projects/project/N
    project_key: str
    artifact: Artifact
    run_dir: Path  # host dir: socket, uwsgi.ini, manifest
    output_dir: Path
    uwsgi: UwsgiSettings
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[DataMount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network: str = "isolated"  # config.NETWORKS

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME


@dataclass(frozen=True)
class InstanceState:
    """What really runs, as the runtime sees it."""

    job_id: str
    handle: str
    running: bool
    status: str  # e.g. running, exited (code 1), gone
    started_at: float | None = None
    runtime: str = ""  # which runtime found it (set by the reconcile step)
    # Processes of the instance the kernel killed for memory (its limit) since it started; uWSGI
    # respawns a killed worker silently. None: the runtime cannot tell.
    oom_kills: int | None = None


class Runtime(Protocol):
    name: str

    def build(self, request: BuildRequest) -> Built:
        """Make the artifact instances start from. Raises BuildError (and nothing is left behind)."""

    def discard(self, artifact: Artifact) -> None:
        """Throw away an artifact no job runs any more (build caches may stay)."""

    def has(self, artifact: Artifact) -> bool:
        """Whether the artifact is still there to start from."""

    def view(self, artifact: Artifact, run_dir: Path, output_dir: Path, mounts: tuple[DataMount, ...]) -> InstanceView:
        """The instance's own paths for these host folders."""

    def prepare(self, *writable: Path) -> None:
        """Make host folders writable by the instance's user."""

    def start(self, spec: InstanceSpec) -> str:
        """Start the instance, return its handle (container id or pid)."""

    def stop(self, job_id: str, handle: str | None, timeout: int) -> None:
        """Stop gracefully (SIGTERM, in-flight requests finish), then remove what was started; keeps its log."""

    def inspect(self, job_id: str, handle: str | None) -> InstanceState:
        """What runs for this job now, with its out-of-memory kills where the runtime can count them."""

    def instances(self) -> list[InstanceState]:
        """Every instance this runtime knows of under this MLSERVE_HOME, found by its labels (as ``inspect``)."""

    def logs(self, job_id: str, handle: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        """The instance's output lines (after it was stopped: the kept log), with control characters shown
        escaped (text.log_line): an app's log never reaches the terminal as escape sequences."""

    def restart(self, spec: InstanceSpec, handle: str | None) -> str:
        """Bring a dead or sick instance back (the same one when it still exists); return its handle."""


def instance_environment(spec: JobSpec, *, name: str, job_id: str, version: int, app_dir: str, output_dir: str,
                         manifest_file: str) -> dict[str, str]:
    """The environment every instance gets, wherever it runs: mlserve.yml's env_vars, then what
    mlserve tells the app (paths as the instance sees them). Secrets are added by the runtime's caller."""
    env = {
        **dict(spec.env_vars),
        "MLSERVE_APP_DIR": app_dir,
        "MLSERVE_JOB": name,
        "MLSERVE_ENDPOINT_ID": job_id,
        "MLSERVE_VERSION": str(version),
        "OUTPUT_DIR": output_dir,
        "LOG_FILE": f"{output_dir}/app.log",
        "LOG_FILE_MAX_BYTES": str(DEFAULT_LOG_FILE_MAX_BYTES),
        "MANIFEST_FILE": manifest_file,
    }
    if spec.health.path:
        env["MLSERVE_HEALTH_PATH"] = spec.health.path
        env["MLSERVE_HEALTH_METHOD"] = spec.health.method
    return env


def uwsgi_ini(uwsgi: UwsgiSettings, *, socket: str, app_dir: str, venv: str, http_socket: str | None = None) -> str:
    """templates/uwsgi.ini.j2 with paths as the instance sees them. The master's stats socket is next
    to ``socket``, in the one folder the instance may write. ``http_socket`` (on a cluster: ``:8080``)
    also answers HTTP, for routers that do not speak the uwsgi protocol."""
    return render(
        "uwsgi.ini.j2",
        socket=socket,
        stats=str(PurePosixPath(socket).parent / PurePosixPath(STATS_SOCKET_NAME).name),
        http_socket=http_socket,
        app_dir=app_dir,
        venv=venv,
        env={},
        workers=uwsgi.workers,
        timeout_s=uwsgi.timeout_s,
        body_limit_bytes=uwsgi.body_limit_bytes,
        preload=uwsgi.preload,
    )


def write_uwsgi_ini(spec: InstanceSpec, *, socket: str, app_dir: str, venv: str) -> Path:
    """Render the instance's uwsgi.ini into the job's run dir."""
    path = spec.run_dir / UWSGI_INI_NAME
    path.write_text(uwsgi_ini(spec.uwsgi, socket=socket, app_dir=app_dir, venv=venv))
    return path
