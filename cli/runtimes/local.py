"""Instances as uwsgi processes on the host, in a per-project virtual environment (no Docker)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from ..builder import runtime_packages, runtime_sources
from ..constants import CONTAINER_UID, INSTANCE_LOG_NAME, UWSGI_INI_NAME
from ..errors import BuildError
from ..home import Home
from ..project import context_files
from ..text import log_line
from . import (
    Artifact,
    BuildRequest,
    Built,
    DataMount,
    InstanceSpec,
    InstanceState,
    InstanceView,
    confinement,
    write_uwsgi_ini,
)

TAIL_LINES = 25


def _install_runtime(venv: Path) -> None:
    """Copy mlserve_runtime into the venv, as the image build does, so both run the same code."""
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    target = Path(purelib) / "mlserve_runtime"
    target.mkdir(parents=True, exist_ok=True)
    for name, data in runtime_sources():
        (target / name).write_bytes(data)


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
        raise BuildError(f"{what} failed", tail)


class LocalBuilder:
    """Prepares a venv (runtime + requirements) and an immutable snapshot of the app code."""

    def __init__(self, home: Home, report: Callable[[str], None]) -> None:
        self.home = home
        self.report = report

    def prepare(self, project_dir: Path, slug: str, requirements: str | None) -> tuple[str, str]:
        """Return (app snapshot dir, venv dir); raises BuildError with pip's or the import check's tail."""
        req_text = (project_dir / requirements).read_bytes() if requirements else b""
        runtime = b"".join(name.encode() + data for name, data in runtime_sources())
        req_hash = hashlib.sha256(req_text + " ".join(runtime_packages()).encode() + runtime).hexdigest()[:12]
        venv = self.home.venvs_dir / f"{slug}-{req_hash}"
        self.home.venvs_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{venv}.lock"):  # concurrent runs of one project share the venv
            if not (venv / ".ready").exists():
                self.report(f"Creating virtual environment {venv} ...")
                shutil.rmtree(venv, ignore_errors=True)
                try:
                    _run([sys.executable, "-m", "venv", str(venv)], "creating the virtual environment")
                    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                    _run(pip + runtime_packages(), "installing uwsgi into the virtual environment")
                    if requirements:
                        _run(pip + ["-r", str(project_dir / requirements)], f"pip install -r {requirements}")
                    _install_runtime(venv)
                except BaseException:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise
                (venv / ".ready").touch()
        files = context_files(project_dir)
        digest = hashlib.sha256()
        for path, rel in files:
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
        snapshot = self.home.root / "apps" / f"{slug}-{digest.hexdigest()[:12]}"
        if not snapshot.exists():
            staging = snapshot.with_name(snapshot.name + f".tmp{os.getpid()}")
            for path, rel in files:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                target.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)  # as in an image: its user reads it
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            check = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "mlserve_runtime.check", str(staging)],
                capture_output=True, text=True, env=env, cwd=staging,
            )
            if check.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise BuildError("app.py failed the import check", (check.stdout + check.stderr).strip())
            try:
                staging.rename(snapshot)
            except OSError:  # a concurrent run made the same snapshot first
                shutil.rmtree(staging, ignore_errors=True)
        return str(snapshot), str(venv)


def _alive(pid: int, ini: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(ini).encode() in cmdline


class LocalRuntime:
    name = "local"

    def __init__(self, home: Home) -> None:
        self.home = home

    def build(self, request: BuildRequest) -> Built:
        started = time.monotonic()
        if request.env:
            request.report("Notice: --env is ignored by --runtime local (it uses this machine's python3).")
        snapshot, venv = LocalBuilder(self.home, request.report).prepare(
            request.project_dir, request.slug, request.requirements
        )
        return Built(Artifact(snapshot, venv), {"image": snapshot, "seconds": round(time.monotonic() - started, 2)})

    def discard(self, artifact: Artifact) -> None:
        # The venv is shared by every snapshot with the same requirements: it stays as the cache.
        shutil.rmtree(artifact.ref, ignore_errors=True)

    def has(self, artifact: Artifact) -> bool:
        return Path(artifact.ref).is_dir() and bool(artifact.venv) and Path(f"{artifact.venv}/bin/uwsgi").exists()

    def view(self, artifact: Artifact, run_dir: Path, output_dir: Path, mounts: tuple[DataMount, ...]) -> InstanceView:
        # A host process sees the host's paths: data is read where it lies.
        return InstanceView(str(run_dir), str(output_dir), artifact.ref,
                            tuple(DataMount(m.source, m.source) for m in mounts))

    def prepare(self, *writable: Path) -> None:
        # As root, the instance runs as the unprivileged uid (see start); else as the caller, who owns these.
        if os.geteuid() == 0:
            for path in writable:
                os.chown(path, CONTAINER_UID, CONTAINER_UID)

    def start(self, spec: InstanceSpec) -> str:
        venv = spec.artifact.venv
        if not venv:
            raise BuildError(f"{spec.name} has no virtual environment to run in", "Run it again with `mlserve run`.")
        ini = write_uwsgi_ini(spec, socket=str(spec.socket), app_dir=spec.artifact.ref, venv=venv)
        # A clean environment: what the job spec gives the instance, not the caller's (tokens, keys...).
        env = {"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(spec.run_dir),
               **spec.env, "PYTHONDONTWRITEBYTECODE": "1"}
        command = [f"{venv}/bin/uwsgi", "--ini", str(ini)]
        with open(spec.run_dir / INSTANCE_LOG_NAME, "ab") as log:
            if os.geteuid() == 0:  # never root: the unprivileged uid, seeing only its own folders of mlserve's
                process = confinement.start(
                    command, env, log, uid=CONTAINER_UID, gid=CONTAINER_UID,
                    readable=[spec.artifact.ref, venv, *filter(None, [confinement.python_home(venv)]),
                              *(m.source for m in spec.mounts)],
                    writable=[str(spec.run_dir), str(spec.output_dir)])
            else:  # mlserve is not root: the instance runs as the caller (it cannot be anyone else)
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=spec.artifact.ref, start_new_session=True,
                )
        return str(process.pid)

    def restart(self, spec: InstanceSpec, handle: str | None) -> str:
        self.stop(spec.job_id, handle, timeout=5)
        return self.start(spec)

    def _ini(self, job_id: str) -> Path:
        return self.home.run_dir(job_id) / UWSGI_INI_NAME

    def stop(self, job_id: str, handle: str | None, timeout: int) -> None:
        if not handle or not _alive(int(handle), self._ini(job_id)):
            return
        pid = int(handle)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid, self._ini(job_id)):
            time.sleep(0.1)
            _reap(pid)
        if _alive(pid, self._ini(job_id)):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)

    def inspect(self, job_id: str, handle: str | None) -> InstanceState:
        running = bool(handle) and _alive(int(handle), self._ini(job_id))  # type: ignore[arg-type]
        return InstanceState(job_id, handle or "", running, "running" if running else "gone (process exited)")

    def instances(self) -> list[InstanceState]:
        """uWSGI masters started for this home, found by the ini path in their command line (the local
        runtime's labels): ``<home>/run/<job id>/uwsgi.ini``. Workers share it; their parent is a master."""
        prefix, suffix = f"{self.home.root / 'run'}/".encode(), f"/{UWSGI_INI_NAME}".encode()
        matching: dict[int, tuple[str, int]] = {}  # pid -> (job id, parent pid)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            ini = next((arg for arg in argv if arg.startswith(prefix) and arg.endswith(suffix)), None)
            if ini is not None:
                matching[int(proc.name)] = (ini[len(prefix):].split(b"/")[0].decode(errors="replace"), parent)
        return [InstanceState(job_id, str(pid), True, "running")
                for pid, (job_id, parent) in matching.items() if parent not in matching]

    def logs(self, job_id: str, handle: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        path = self.home.run_dir(job_id) / INSTANCE_LOG_NAME
        if not path.exists():
            return
        with open(path, errors="replace") as handle_:
            lines = handle_.readlines()
            for line in lines[-tail:] if tail else lines:
                yield log_line(line.rstrip("\n"))
            while follow:
                line = handle_.readline()
                if line:
                    yield log_line(line.rstrip("\n"))
                else:
                    time.sleep(0.2)


def _reap(pid: int) -> None:
    # Our own child when started by this process (tests); otherwise init reaps it.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
