"""Instances as locked-down Docker containers, found again by their labels."""

from __future__ import annotations

from datetime import datetime
from typing import Iterator

import docker
import docker.errors

from mlserve.constants import (
    CONTAINER_UID,
    INSTANCE_APP_DIR,
    INSTANCE_OUTPUT_DIR,
    INSTANCE_RUN_DIR,
    INSTANCE_VENV,
    LABEL_HOME,
    LABEL_JOB,
    LABEL_NAME,
    LABEL_PROJECT,
    SOCKET_DIR,
    SOCKET_NAME,
)
from mlserve.engine import engine_errors
from mlserve.runtimes import InstanceSpec, InstanceState, write_uwsgi_ini

DEFAULT_LIMITS = {"memory": "2g", "cpus": 2.0, "pids": 512, "tmp": "256m"}


def _parse_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; datetime takes microseconds.
    trimmed = value.rstrip("Z").split(".")[0]
    return datetime.fromisoformat(trimmed + "+00:00").timestamp()


class DockerRuntime:
    name = "docker"

    def __init__(self, client: docker.DockerClient, home_label: str) -> None:
        self.client = client
        self.home_label = home_label

    def _container_name(self, spec: InstanceSpec) -> str:
        owner, _, project, number = spec.name.split("/")
        return f"mlserve-{owner}-{project}-{number}-{spec.job_id[:8]}"

    def start(self, spec: InstanceSpec) -> str:
        write_uwsgi_ini(spec, socket=f"{INSTANCE_RUN_DIR}/{SOCKET_NAME}", app_dir=INSTANCE_APP_DIR, venv=INSTANCE_VENV)
        limits = {**DEFAULT_LIMITS, **{k: v for k, v in spec.limits.items() if v is not None}}
        volumes = {
            # Read-only but for the socket's folder: the instance cannot rewrite its own configuration.
            str(spec.run_dir): {"bind": INSTANCE_RUN_DIR, "mode": "ro"},
            str(spec.socket.parent): {"bind": f"{INSTANCE_RUN_DIR}/{SOCKET_DIR}", "mode": "rw"},
            str(spec.output_dir): {"bind": INSTANCE_OUTPUT_DIR, "mode": "rw"},
        }
        for mount in spec.data:
            volumes[mount.source] = {"bind": mount.mount, "mode": "ro"}
        with engine_errors(f"starting a container for {spec.name}"):
            container = self.client.containers.run(
                spec.image,
                name=self._container_name(spec),
                detach=True,
                labels={
                    LABEL_HOME: self.home_label,
                    LABEL_JOB: spec.job_id,
                    LABEL_NAME: spec.name,
                    LABEL_PROJECT: spec.project_key,
                },
                environment=spec.env,
                volumes=volumes,
                user=f"{CONTAINER_UID}:{CONTAINER_UID}",
                read_only=True,
                tmpfs={"/tmp": f"rw,size={limits['tmp']},mode=1777"},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit=limits["memory"],
                nano_cpus=int(float(limits["cpus"]) * 1e9),
                pids_limit=int(limits["pids"]),
                log_config={"type": "json-file", "config": {"max-size": "20m", "max-file": "3"}},
            )
        return container.id

    def restart(self, spec: InstanceSpec, handle: str | None) -> str:
        container = self._get(spec.job_id, handle)
        if container is None:
            return self.start(spec)
        with engine_errors(f"restarting the container of {spec.name}"):
            container.restart(timeout=5)
        return container.id

    def _get(self, job_id: str, handle: str | None):  # -> Container | None
        with engine_errors(f"looking up the container of job {job_id}"):
            if handle:
                try:
                    return self.client.containers.get(handle)
                except docker.errors.NotFound:
                    pass
            found = self.client.containers.list(
                all=True, filters={"label": [f"{LABEL_HOME}={self.home_label}", f"{LABEL_JOB}={job_id}"]}
            )
            return found[0] if found else None

    def stop(self, job_id: str, handle: str | None, timeout: int) -> None:
        container = self._get(job_id, handle)
        if container is None:
            return
        with engine_errors(f"stopping the container of job {job_id}"):
            try:
                container.stop(timeout=timeout)
                container.remove(force=True)
            except docker.errors.NotFound:
                pass

    def _state(self, container) -> InstanceState:
        state = container.attrs.get("State", {})
        running = bool(state.get("Running"))
        if running:
            status = "running"
        else:
            status = f"exited ({state.get('ExitCode')})"
            if state.get("OOMKilled"):
                status += ", out of memory"
        return InstanceState(
            job_id=container.labels.get(LABEL_JOB, ""),
            handle=container.id,
            running=running,
            status=status,
            started_at=_parse_time(state.get("StartedAt")),
        )

    def inspect(self, job_id: str, handle: str | None) -> InstanceState:
        container = self._get(job_id, handle)
        if container is None:
            return InstanceState(job_id, handle or "", False, "gone (no container)")
        return self._state(container)

    def instances(self) -> list[InstanceState]:
        with engine_errors("listing containers"):
            containers = self.client.containers.list(all=True, filters={"label": f"{LABEL_HOME}={self.home_label}"})
        return [self._state(c) for c in containers if c.labels.get(LABEL_JOB)]

    def logs(self, job_id: str, handle: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        container = self._get(job_id, handle)
        if container is None:
            return iter(())
        with engine_errors(f"reading the logs of job {job_id}"):
            stream = container.logs(stream=True, follow=follow, tail="all" if tail is None else tail)
        return _lines(stream)


def _lines(stream: Iterator[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in stream:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")
