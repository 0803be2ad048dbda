"""Set up the host mlserve runs on: apt packages, a running Docker engine, a base image to build on.

Written for Debian 12 as root with no systemd: packages come from apt, the engine is a
``dockerd`` started in the background, and where no registry answers the base image is
made locally with debootstrap. Every step checks first, so a second run is quick.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors
import requests.exceptions
from docker.utils import parse_repository_tag

from mlserve import engine
from mlserve.constants import DEFAULT_ENV, ENVIRONMENTS, LABEL_PREFIX, LOCAL_BASE_IMAGE
from mlserve.errors import EngineUnavailableError, SetupError

Report = Callable[[str], None]


@dataclass(frozen=True)
class Package:
    name: str  # apt package
    program: str  # what tells us it is installed
    purpose: str


PACKAGES = (
    Package("docker.io", "dockerd", "the Docker engine"),
    Package("nginx-light", "nginx", "the gateway"),
    Package("debootstrap", "debootstrap", "building the local base image"),
    Package("wrk", "wrk", "the benchmarks"),
)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
SYSTEM_NGINX_PIDFILE = Path("/run/nginx.pid")

DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKER_PIDFILE = Path("/var/run/docker.pid")
DOCKERD_LOG = Path("/var/log/mlserve-dockerd.log")
PROBE_TIMEOUT_S = 10

PULL_TIMEOUT_S = 20.0
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
LABEL_BASE = f"{LABEL_PREFIX}.base"  # on images `mlserve setup` made; value: how
BASE_IMAGE_CHANGES = (
    f"LABEL {LABEL_BASE}=debootstrap-{DEBIAN_SUITE}",
    f"ENV PATH={SYSTEM_PATH}",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)


def setup(report: Report) -> None:
    """Install what is missing, start the engine, make sure a base image exists.

    Idempotent, and about a second when everything is already there.
    Raises SetupError or EngineUnavailableError with advice.
    """
    started = time.monotonic()
    ensure_packages(report)
    client = ensure_engine(report)
    try:
        base = ensure_base_image(report, client)
    finally:
        client.close()
    report(f"Ready in {time.monotonic() - started:.1f}s: builds start from {base}.")


# -- packages --------------------------------------------------------------------------------


def find_program(name: str) -> str | None:
    """Path of ``name`` on PATH or in the system directories (sbin is often off a user's PATH)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), SYSTEM_PATH]))


def missing_packages() -> list[Package]:
    return [package for package in PACKAGES if find_program(package.program) is None]


def apt_install_command(names: list[str]) -> list[str]:
    return [
        "apt-get", "install", "-y",
        "-o", "DPkg::Lock::Timeout=300",  # wait for another apt run rather than fail
        "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
        *names,
    ]


def ensure_packages(report: Report) -> list[str]:
    """apt-get install whatever of PACKAGES is missing; returns the names installed.

    Raises SetupError when something is missing and we are not root, apt-get is absent,
    or apt-get fails.
    """
    missing = missing_packages()
    if not missing:
        report(f"Packages: {', '.join(p.name for p in PACKAGES)} ... ok")
        return []
    names = [p.name for p in missing]
    what = ", ".join(f"{p.name} ({p.purpose})" for p in missing)
    if os.geteuid() != 0:
        raise SetupError(
            f"missing packages: {what}",
            f"Install them as root: `apt-get update && apt-get install -y {' '.join(names)}`, "
            "or run `mlserve setup` as root.",
        )
    if find_program("apt-get") is None:
        raise SetupError(
            f"missing packages: {what}, and apt-get is not available",
            "mlserve setup knows Debian and Ubuntu; elsewhere install "
            + ", ".join(p.program for p in missing) + " with your package manager.",
        )
    report(f"Installing {' '.join(names)} with apt-get (a minute or two) ...")
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _services_held_back():
        for command in (["apt-get", "update"], apt_install_command(names)):
            result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if result.returncode != 0:
                raise SetupError(
                    f"`{' '.join(command)}` failed (exit {result.returncode})",
                    _tail(result.stdout + result.stderr) + "\nFix the apt problem above, then run `mlserve setup` again.",
                )
    still = missing_packages()
    if still:
        raise SetupError(
            f"apt-get installed {' '.join(names)} but {', '.join(p.program for p in still)} is still not found",
            f"Check `dpkg -L {still[0].name}`.",
        )
    if "nginx-light" in names:
        _stop_system_nginx(report)
    report(f"Installed {' '.join(names)} in {time.monotonic() - started:.0f}s")
    return names


@contextmanager
def _services_held_back() -> Iterator[None]:
    """Keep apt from starting services: a default nginx on port 80, a dockerd we did not start.

    mlserve runs its own nginx instances and starts dockerd itself (there is no systemd).
    """
    if POLICY_RC_D.exists():  # the machine already has a policy; respect it
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# mlserve setup: no service starts while it installs packages\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def _stop_system_nginx(report: Report) -> None:
    """Stop the distribution's default nginx if installing it started one anyway."""
    pid = _live_pid(SYSTEM_NGINX_PIDFILE)
    if pid is None:
        return
    report(f"Stopping the default nginx the package started (pid {pid}); mlserve runs its own.")
    os.kill(pid, signal.SIGQUIT)  # what `nginx -s quit` sends: finish requests, then exit
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- the Docker engine -----------------------------------------------------------------------


def ensure_engine(report: Report, timeout: float = 60) -> docker.DockerClient:
    """Return a client of an answering engine, starting a local ``dockerd`` if there is none.

    dockerd is only started when DOCKER_HOST names no other engine, it is installed, and we
    are root. Raises EngineUnavailableError otherwise, or when it does not answer in ``timeout``.
    """
    problem = engine_problem()
    if problem is None:
        report(f"Docker engine at {_where()} ... ok")
        return engine.connect()
    host = os.environ.get("DOCKER_HOST")
    if host and host not in (f"unix://{DOCKER_SOCKET}", f"unix://{DOCKER_SOCKET.resolve()}"):
        raise EngineUnavailableError(
            f"the Docker engine at DOCKER_HOST={host} does not answer ({problem})",
            "Start the engine DOCKER_HOST names, or unset DOCKER_HOST so that `mlserve setup` "
            "(as root) starts a local dockerd.",
        )
    dockerd = find_program("dockerd")
    if dockerd is None:
        raise EngineUnavailableError(
            f"no Docker engine answers at unix://{DOCKER_SOCKET} and dockerd is not installed",
            "Run `mlserve setup` as root (it installs docker.io), or set DOCKER_HOST to a running engine.",
        )
    if os.geteuid() != 0:
        raise EngineUnavailableError(
            f"no Docker engine answers at unix://{DOCKER_SOCKET} ({problem})",
            "Start it as root (`sudo mlserve setup`, or `sudo dockerd &`). If it runs already, "
            "join the docker group (`sudo usermod -aG docker $USER`, then log in again).",
        )
    process = None
    if _live_pid(DOCKER_PIDFILE) is not None:
        report("dockerd runs but does not answer yet; waiting for it ...")
    else:
        report(f"Starting dockerd in the background (log: {DOCKERD_LOG}) ...")
        process = _start_dockerd(dockerd)
    started = time.monotonic()
    _wait_for_engine(process, timeout)
    report(f"Docker engine answering after {time.monotonic() - started:.1f}s")
    return engine.connect()


def engine_problem() -> str | None:
    """None when the engine DOCKER_HOST (or the local socket) names answers a ping, else why not."""
    try:
        client = docker.from_env(timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _where() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"


def _start_dockerd(dockerd: str) -> subprocess.Popen[bytes]:
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": os.pathsep.join([SYSTEM_PATH, os.environ.get("PATH", "")])}
    with DOCKERD_LOG.open("ab") as log:
        # A session of its own: it outlives this command and a Ctrl-C of the terminal.
        return subprocess.Popen(
            [dockerd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env,
        )


def _wait_for_engine(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise EngineUnavailableError(
                f"dockerd exited with code {process.returncode} while starting",
                f"The end of {DOCKERD_LOG}:\n{_tail(_read(DOCKERD_LOG))}",
            )
        if DOCKER_SOCKET.exists() and engine_problem() is None:
            return
        if time.monotonic() > deadline:
            raise EngineUnavailableError(
                f"dockerd did not answer on {DOCKER_SOCKET} within {timeout:g}s",
                f"The end of {DOCKERD_LOG}:\n{_tail(_read(DOCKERD_LOG))}",
            )
        time.sleep(0.25)


# -- the base image --------------------------------------------------------------------------


def ensure_base_image(report: Report, client: docker.DockerClient, tag: str = LOCAL_BASE_IMAGE) -> str:
    """Make sure builds have a base: the default environment's image, else the local ``tag``.

    Tries a pull of the default image (bounded by PULL_TIMEOUT_S), then builds ``tag`` with
    debootstrap. Returns the image builds will start from. Raises SetupError.
    """
    default = ENVIRONMENTS[DEFAULT_ENV]
    if _image_exists(client, default):
        report(f"Base image {default} ... ok")
        return default
    if _image_exists(client, tag):
        report(f"Base image {tag} ... ok ({default} is not on this engine)")
        return tag
    if pull(client, default, report):
        return default
    if os.geteuid() != 0:
        raise SetupError(
            f"neither {default} nor the local base {tag} is on the engine, and {default} cannot be pulled",
            "Run `mlserve setup` as root to build the local base with debootstrap.",
        )
    build_local_base(client, tag, report)
    return tag


def pull(client: docker.DockerClient, ref: str, report: Report, timeout: float = PULL_TIMEOUT_S) -> bool:
    """Try to pull ``ref`` for at most ``timeout`` seconds; False (with the reason reported) if not."""
    report(f"Pulling {ref} ...")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            client.images.pull(ref)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means "build locally"
            outcome.append(exc)

    # A thread, because an unreachable registry can hang the pull; a daemon, so it cannot hold us.
    worker = threading.Thread(target=attempt, name=f"pull {ref}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        report(f"  no answer within {timeout:.0f}s; building a local base instead")
        return False
    error = outcome[0]
    if error is None:
        report(f"  pulled {ref}")
        return True
    reason = error.explanation if isinstance(error, docker.errors.APIError) and error.explanation else str(error)
    report(f"  cannot pull ({_first_line(reason)}); building a local base instead")
    return False


def build_local_base(client: docker.DockerClient, tag: str, report: Report, mirror: str = DEBIAN_MIRROR) -> None:
    """Build Debian ``bookworm`` with python3 and venv by debootstrap and import it as ``tag``.

    Needs root, debootstrap and the Debian mirror (about 45 s and 300 MB). Raises SetupError.
    """
    debootstrap = find_program("debootstrap")
    if debootstrap is None:
        raise SetupError("debootstrap is not installed", "Run `mlserve setup` as root, or `apt-get install -y debootstrap`.")
    report(f"Building the local base image {tag}: Debian {DEBIAN_SUITE} by debootstrap (about a minute) ...")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mlserve-base-", dir="/var/tmp"))
    root.chmod(0o755)  # it becomes the image's /, which the unprivileged user must traverse
    try:
        command = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE, str(root), mirror]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise SetupError(
                f"debootstrap failed (exit {result.returncode})",
                _tail(result.stdout + result.stderr) + f"\nCheck that {mirror} is reachable, then run `mlserve setup` again.",
            )
        _trim(root)
        report(f"  debootstrap done in {time.monotonic() - started:.0f}s; importing into Docker ...")
        import_tree(client, root, tag)
    finally:
        _remove_tree(root, report)
    report(f"Built {tag} in {time.monotonic() - started:.0f}s")


def import_tree(client: docker.DockerClient, root: Path, tag: str) -> None:
    """``tar -C root -c . | docker import - tag`` through the SDK (the docker CLI may be absent)."""
    repository, version = parse_repository_tag(tag)
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: tar's warnings must not block it
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE, stderr=err)
        out = tar.stdout
        assert out is not None

        def chunks() -> Iterator[bytes]:
            while block := out.read(1 << 20):
                yield block

        try:
            with engine.engine_errors(f"importing {tag}"):
                answer = client.api.import_image(
                    src=chunks(), repository=repository, tag=version or "latest",
                    changes=list(BASE_IMAGE_CHANGES), stream_src=True,
                )
        finally:
            out.close()  # if the engine gave up, tar stops on a broken pipe
            code = tar.wait()
        if code != 0:
            err.seek(0)
            raise SetupError(f"tar of {root} failed (exit {code})", _tail(err.read().decode(errors="replace")))
    if not _image_exists(client, tag):
        raise SetupError(f"the engine did not create {tag}", _tail(str(answer)))


def _image_exists(client: docker.DockerClient, ref: str) -> bool:
    with engine.engine_errors(f"looking up image {ref}"):
        try:
            client.images.get(ref)
            return True
        except docker.errors.ImageNotFound:
            return False


def _trim(root: Path) -> None:
    """Drop apt's downloaded packages and lists, as Debian's own images do."""
    for folder in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
        for path in folder.glob("*"):
            if path.is_file() and path.name != "lock":
                path.unlink()


def _remove_tree(root: Path, report: Report) -> None:
    """Delete the debootstrap tree, never crossing into something still mounted inside it."""
    def mounted() -> list[str]:
        return [m for m in _mount_points() if m == str(root) or m.startswith(f"{root}/")]

    for point in sorted(mounted(), reverse=True):  # a failed debootstrap can leave proc, sys, dev
        subprocess.run(["umount", "-l", point], capture_output=True)
    if mounted():
        report(f"Warning: left {root} in place; something is still mounted inside it")
        return
    shutil.rmtree(root, ignore_errors=True)


def _mount_points() -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    # The file escapes spaces and the like as octal (\040).
    return [line.split()[1].encode().decode("unicode_escape") for line in lines if len(line.split()) > 1]


# -- small helpers ---------------------------------------------------------------------------


def _live_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited already; it only waits for its parent to reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"
