"""Instances as locked-down Docker containers, found again by their labels."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from docker.models.containers import Container

from .. import firewall
from ..builder import TAIL_LINES, ImageBuilder, find_ca_bundle, resolve_base_image
from ..constants import (
    CONTAINER_UID,
    DEFAULT_ENV,
    INSTANCE_APP_DIR,
    INSTANCE_LOG_NAME,
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
from ..engine import Engine
from ..errors import BuildError, BuildInterrupted
from ..home import Home
from ..text import log_line
from . import Artifact, BuildRequest, Built, DataMount, InstanceSpec, InstanceState, InstanceView, write_uwsgi_ini

NETWORK_RECHECK_S = 30.0
IMPORT_CHECK_TIMEOUT_S = 600
_NETWORK_MODES = {"none": "none", "open": "default"}  # the isolated network's mode is its name
KEPT_LOG_LINES = 1000  # of a stopped container, kept in its run dir for `mlserve logs`
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _parse_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; datetime takes microseconds.
    trimmed = value.rstrip("Z").split(".")[0]
    return datetime.fromisoformat(trimmed + "+00:00").timestamp()


class DockerRuntime:
    name = "docker"

    def __init__(self, engine: Engine, home: Home) -> None:
        self.engine = engine
        self.home = home
        self.home_label = str(home.root)
        self._network_checked = -NETWORK_RECHECK_S  # when the isolated network and its firewall were made sure of

    # building -------------------------------------------------------------------------------

    def build(self, request: BuildRequest) -> Built:
        base = resolve_base_image(self.engine, request.env or DEFAULT_ENV, request.report)
        builder = ImageBuilder(self.engine, self.home_label, request.report)
        request.report(f"Building image mlserve/{request.slug} on {base} ...")
        result = builder.build(request.project_dir, f"mlserve/{request.slug}", base, request.requirements,
                               find_ca_bundle(request.ca_bundle), request.project_key)
        request.report(f"Built {result.tag} in {result.seconds:.1f}s ({result.cached}/{result.steps} steps cached)")
        self._check_import(result.tag, request.network, request.environment)
        summary = {"image": result.tag, "seconds": round(result.seconds, 2), "steps": result.steps,
                   "cached": result.cached, "context_bytes": result.context_bytes}
        return Built(Artifact(result.tag), summary)

    def _check_import(self, tag: str, network: str, environment: Mapping[str, str]) -> None:
        """Import app.py in the new image as an instance will: the instance's user, a read-only root,
        no capabilities, the instance's network policy (never this host). An app that does not import
        fails the run now, with its traceback's tail, rather than a 502 later; its image is untagged
        (it stays if a serving job runs it: the engine refuses)."""
        try:
            status, output = self.engine.run_to_end(
                tag, "the import check", IMPORT_CHECK_TIMEOUT_S,
                command=[f"{INSTANCE_VENV}/bin/python", "-m", "mlserve_runtime.check", INSTANCE_APP_DIR],
                user=f"{CONTAINER_UID}:{CONTAINER_UID}", read_only=True, tmpfs={"/tmp": "rw,size=256m,mode=1777"},
                cap_drop=["ALL"], security_opt=["no-new-privileges"], environment={**environment, "HOME": "/tmp"},
                **self._network(network),
            )
        except KeyboardInterrupt:
            self.engine.untag(tag)
            raise BuildInterrupted("build interrupted (Ctrl-C): nothing was started") from None
        except BaseException:
            self.engine.untag(tag)
            raise
        if status != 0:
            self.engine.untag(tag)
            lines = [log_line(line) for line in output.splitlines() if line.strip()]
            why = next((line for line in reversed(lines) if line.startswith("mlserve: ")), "")
            raise BuildError(
                f"app.py did not import in the image{f' ({why[9:]})' if why else ''}"
                + ("" if status is not None else f": no end after {IMPORT_CHECK_TIMEOUT_S} s"),
                "The import check's output (tail):\n" + "\n".join(lines[-TAIL_LINES:]))

    def discard(self, artifact: Artifact) -> None:
        self.engine.untag(artifact.ref)

    def has(self, artifact: Artifact) -> bool:
        return self.engine.image_exists(artifact.ref)

    def view(self, artifact: Artifact, run_dir: Path, output_dir: Path, mounts: tuple[DataMount, ...]) -> InstanceView:
        return InstanceView(INSTANCE_RUN_DIR, INSTANCE_OUTPUT_DIR, INSTANCE_APP_DIR, mounts)

    def prepare(self, *writable: Path) -> None:
        # The instance runs as an unprivileged uid and must create its socket and files here.
        for path in writable:
            if os.geteuid() == 0:
                os.chown(path, CONTAINER_UID, CONTAINER_UID)
            else:
                path.chmod(0o777)

    # instances ------------------------------------------------------------------------------

    def _container_name(self, spec: InstanceSpec) -> str:
        owner, _, project, number = spec.name.split("/")
        return f"mlserve-{owner}-{project}-{number}-{spec.job_id[:8]}"

    def start(self, spec: InstanceSpec) -> str:
        write_uwsgi_ini(spec, socket=f"{INSTANCE_RUN_DIR}/{SOCKET_NAME}", app_dir=INSTANCE_APP_DIR, venv=INSTANCE_VENV)
        volumes = {
            # Read-only but for the socket's folder: the instance cannot rewrite its own configuration.
            str(spec.run_dir): {"bind": INSTANCE_RUN_DIR, "mode": "ro"},
            str(spec.socket.parent): {"bind": f"{INSTANCE_RUN_DIR}/{SOCKET_DIR}", "mode": "rw"},
            str(spec.output_dir): {"bind": INSTANCE_OUTPUT_DIR, "mode": "rw"},
        }
        for mount in spec.mounts:
            volumes[mount.source] = {"bind": mount.mount, "mode": "ro"}
        limits = spec.limits
        container = self.engine.run(
            spec.artifact.ref,
            spec.name,
            name=self._container_name(spec),
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
            tmpfs={"/tmp": f"rw,size={limits.tmp_bytes},mode=1777"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=limits.memory_bytes,
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            log_config={"type": "json-file", "config": {"max-size": "20m", "max-file": "3"}},
            **self._network(spec.network),
        )
        return str(container.id)

    def _network(self, policy: str, recheck: bool = False) -> dict[str, Any]:
        """The container options of a network policy (config.NETWORKS); the isolated network and its
        firewall are made sure of first (at most every NETWORK_RECHECK_S in one process, or with
        ``recheck``: the supervisor lives long, and a firewall may be flushed meanwhile)."""
        if policy == "none":
            return {"network_mode": "none"}
        if policy == "open":
            return {}
        if recheck or time.monotonic() - self._network_checked > NETWORK_RECHECK_S:
            self.engine.ensure_network(firewall.NETWORK_NAME, firewall.NETWORK_OPTIONS)
            firewall.ensure()
            self._network_checked = time.monotonic()
        # The firewall's rules are IPv4; an instance gets no IPv6 (not even link-local) to go around them.
        return {"network": firewall.NETWORK_NAME, "sysctls": {"net.ipv6.conf.all.disable_ipv6": "1",
                                                               "net.ipv6.conf.default.disable_ipv6": "1"}}

    def restart(self, spec: InstanceSpec, handle: str | None) -> str:
        container = self._get(spec.job_id, handle)
        if container is None:
            return self.start(spec)
        self._network(spec.network, recheck=True)  # a flushed firewall (a reboot) is restored before it runs again
        if _network_mode(container) != _NETWORK_MODES.get(spec.network, firewall.NETWORK_NAME):
            # Made before its policy was (an older mlserve): a new container, on the network it should have.
            self.engine.stop(container, timeout=5)
            return self.start(spec)
        self.engine.restart(container, timeout=5)
        return str(container.id)

    def _get(self, job_id: str, handle: str | None) -> Container | None:
        container = self.engine.container(handle) if handle else None
        if container is None:
            found = self.engine.containers({LABEL_HOME: self.home_label, LABEL_JOB: job_id})
            container = found[0] if found else None
        return container

    def stop(self, job_id: str, handle: str | None, timeout: int) -> None:
        container = self._get(job_id, handle)
        if container is None:
            return
        self._keep_log(job_id, container)
        self.engine.stop(container, timeout=timeout)

    def _keep_log(self, job_id: str, container: Container) -> None:
        # The container is removed on stop; its last lines stay readable by `mlserve logs`.
        try:
            with open(self.home.run_dir(job_id) / INSTANCE_LOG_NAME, "w") as kept:
                for line in _lines(self.engine.logs(container, follow=False, tail=KEPT_LOG_LINES)):
                    kept.write(line + "\n")
        except OSError:
            pass

    def _state(self, container: Container) -> InstanceState:
        state = container.attrs.get("State", {})
        running = bool(state.get("Running"))
        oom_kills: int | None
        if running:
            status = "running"
            oom_kills = oom_kills_of(str(container.id), state.get("Pid"))
        else:
            status = f"exited ({state.get('ExitCode')})"
            oom_kills = None
            if state.get("OOMKilled"):
                status += ", out of memory"
                oom_kills = 1  # its main process, the uWSGI master (its cgroup and count are gone)
        return InstanceState(
            job_id=container.labels.get(LABEL_JOB, ""),
            handle=str(container.id),
            running=running,
            status=status,
            started_at=_parse_time(state.get("StartedAt")),
            oom_kills=oom_kills,
        )

    def inspect(self, job_id: str, handle: str | None) -> InstanceState:
        container = self._get(job_id, handle)
        if container is None:
            return InstanceState(job_id, handle or "", False, "gone (no container)")
        return self._state(container)

    def instances(self) -> list[InstanceState]:
        containers = self.engine.containers({LABEL_HOME: self.home_label})
        return [self._state(c) for c in containers if c.labels.get(LABEL_JOB)]

    def logs(self, job_id: str, handle: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        container = self._get(job_id, handle)
        if container is None:
            yield from _kept_log(self.home.run_dir(job_id) / INSTANCE_LOG_NAME, tail)
            return
        yield from _lines(self.engine.logs(container, follow=follow, tail=tail))


def _cgroup_counters(container_id: str, pid: object, root: Path) -> list[Path]:
    """Where a container's memory cgroup keeps its out-of-memory kill count (cgroup v1's
    memory.oom_control, v2's memory.events): where /proc/<its pid>/cgroup says, else where the
    cgroupfs and systemd drivers put it."""
    scopes = []
    if isinstance(pid, int) and pid > 0:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            # Never "/": the root cgroup counts the whole machine's kills.
            if (controllers == "" or "memory" in controllers.split(",")) and path.strip("/"):
                scopes.append(path.strip("/"))
    scopes += [f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"]
    candidates = []
    for scope in dict.fromkeys(scopes):
        candidates += [root / "memory" / scope / "memory.oom_control", root / scope / "memory.events",
                       root / "unified" / scope / "memory.events"]
    return candidates


def oom_kills_of(container_id: str, pid: object = None, root: Path = CGROUP_ROOT) -> int | None:
    """Processes of a running container the kernel killed for memory since it started (its memory
    cgroup's ``oom_kill``); None when no cgroup of it is found."""
    for path in _cgroup_counters(container_id, pid, root):
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _network_mode(container: Container) -> str:
    mode = str(container.attrs.get("HostConfig", {}).get("NetworkMode") or "default")
    return "default" if mode == "bridge" else mode


def _kept_log(path: Path, tail: int | None) -> Iterator[str]:
    if path.exists():
        lines = path.read_text(errors="replace").splitlines()
        yield from map(log_line, lines[-tail:] if tail else lines)


def _lines(stream: Iterator[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in stream:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield log_line(line.decode("utf-8", "replace"))
    if pending:
        yield log_line(pending.decode("utf-8", "replace"))
