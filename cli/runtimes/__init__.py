"""Runtimes start, stop and observe serving instances: in Docker containers, or as host processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from mlserve.constants import SOCKET_NAME


@dataclass(frozen=True)
class DataMount:
    source: str
    mount: str


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance of a job."""

    job_id: str
    name: str  # owner/projects/project/N
    project_key: str
    image: str  # docker image tag, or the local app snapshot dir
    run_dir: Path  # host dir: socket, uwsgi.ini, manifest
    output_dir: Path
    uwsgi: dict  # ini variables common to both runtimes (workers, timeout_s, body_limit_bytes, preload)
    env: dict[str, str] = field(default_factory=dict)
    data: tuple[DataMount, ...] = ()
    limits: dict = field(default_factory=dict)
    venv: str | None = None  # local runtime only

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


class Runtime(Protocol):
    name: str

    def start(self, spec: InstanceSpec) -> str:
        """Start the instance, return its handle (container id or pid)."""

    def stop(self, job_id: str, handle: str | None, timeout: int) -> None:
        """Stop gracefully (SIGTERM, in-flight requests finish), then remove what was started."""

    def inspect(self, job_id: str, handle: str | None) -> InstanceState:
        """What runs for this job now."""

    def instances(self) -> list[InstanceState]:
        """Every instance this runtime knows of under this MLSERVE_HOME (for drift)."""

    def logs(self, job_id: str, handle: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        """The instance's output lines."""

    def restart(self, spec: InstanceSpec, handle: str | None) -> str:
        """Bring a dead or sick instance back (the same one when it still exists); return its handle."""


def write_uwsgi_ini(spec: InstanceSpec, *, socket: str, app_dir: str, venv: str) -> Path:
    """Render templates/uwsgi.ini.j2 into the job's run dir, with paths as the instance sees them."""
    from mlserve.constants import UWSGI_INI_NAME
    from mlserve.render import render

    text = render(
        "uwsgi.ini.j2",
        socket=socket,
        app_dir=app_dir,
        venv=venv,
        python=f"{venv}/bin/python",
        env={},
        **spec.uwsgi,
    )
    path = spec.run_dir / UWSGI_INI_NAME
    path.write_text(text)
    return path
