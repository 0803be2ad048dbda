"""Build a serving image with the Docker SDK: render the Dockerfile, pack the context, stream the build."""

from __future__ import annotations

import configparser
import hashlib
import io
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import (
    CONTAINER_UID,
    ENVIRONMENTS,
    INSTANCE_APP_DIR,
    INSTANCE_RUN_DIR,
    INSTANCE_VENV,
    LABEL_HOME,
    LABEL_PROJECT,
    LOCAL_BASE_IMAGE,
)
from .errors import BuildError, BuildInterrupted
from .project import context_files, context_size, linked_folders
from .render import render
from .text import log_line

if TYPE_CHECKING:
    from .engine import Engine

RUNTIME_PACKAGES = ("pyuwsgi", "filelock", "a2wsgi")
CA_ENV_VARS = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
TAIL_LINES = 25


@dataclass(frozen=True)
class BuildResult:
    tag: str
    seconds: float
    steps: int
    cached: int
    context_bytes: int


def runtime_packages() -> list[str]:
    """uwsgi and the runtime's deps, pinned to the versions the host runs (known to work together)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def find_ca_bundle(explicit: str | None = None) -> Path | None:
    """The CA bundle pip must trust inside the build: --ca-bundle, else PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise BuildError(f"CA bundle {explicit} does not exist", "Pass an existing PEM file to --ca-bundle.")
        return path
    for var in CA_ENV_VARS:
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


def host_pip_index_env() -> dict[str, str]:
    """Index URLs from the host's pip settings that make sense inside a container (http/https only)."""
    found: dict[str, str] = {}
    config = configparser.ConfigParser()
    for path in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", str(Path.home() / ".config/pip/pip.conf"), str(Path.home() / ".pip/pip.conf")):
        try:
            config.read(path)
        except configparser.Error:
            continue
    for key, env_name in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"), ("trusted-host", "PIP_TRUSTED_HOST")):
        value = os.environ.get(env_name) or (config.get("global", key) if config.has_option("global", key) else "")
        if key == "trusted-host":
            urls = value.split()
        else:
            urls = [url for url in value.split() if url.startswith(("http://", "https://"))]
        if urls:
            found[env_name] = " ".join(urls)
    return found


def resolve_base_image(engine: Engine, env: str, report: Callable[[str], None]) -> str:
    """Map ``--env`` (a named environment or an image reference) to an image present on the engine."""
    ref = ENVIRONMENTS.get(env, env)
    if engine.image_exists(ref):
        return ref
    if env in ENVIRONMENTS and engine.image_exists(LOCAL_BASE_IMAGE):
        report(f"Environment {env}: {ref} is not on this engine, using the local base {LOCAL_BASE_IMAGE}")
        return LOCAL_BASE_IMAGE
    try:
        report(f"Pulling {ref} ...")
        engine.pull(ref)
        return ref
    except Exception as exc:  # noqa: BLE001 - any pull failure means the same advice
        hint = (
            f"Run `mlserve setup` to build the local Debian base {LOCAL_BASE_IMAGE}"
            if env in ENVIRONMENTS
            else "Pass an image that exists locally (`docker images`) and has python3 with venv, or a named environment: "
            + ", ".join(sorted(ENVIRONMENTS))
        )
        raise BuildError(f"base image {ref} is not available and could not be pulled ({exc})", hint) from None


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def runtime_sources() -> Iterable[tuple[str, bytes]]:
    root = resources.files("mlserve_runtime")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            yield entry.name, entry.read_bytes()


class ImageBuilder:
    """Builds ``mlserve/<owner>-<project>:<hash>`` images; layers are cached by the engine."""

    def __init__(self, engine: Engine, home_label: str, report: Callable[[str], None]) -> None:
        self.engine = engine
        self.home_label = home_label
        self.report = report

    def dockerfile(self, base_image: str, requirements: str | None, ca_bundle: bool, pip_env: dict[str, str]) -> str:
        return render(
            "Dockerfile.j2",
            base_image=base_image,
            requirements=requirements,
            ca_bundle=ca_bundle,
            pip_env=pip_env,
            runtime_packages=runtime_packages(),
            venv=INSTANCE_VENV,
            app_dir=INSTANCE_APP_DIR,
            run_dir=INSTANCE_RUN_DIR,
            uid=CONTAINER_UID,
        )

    def context(self, project_dir: Path, dockerfile: str, ca_bundle: Path | None) -> tuple[bytes, int]:
        """The build context as an uncompressed tar: app/ (the project, ignore rules applied) and .mlserve/.

        Project files are regular files in it: a link that stays inside the project is followed.
        Raises UsageError before packing anything when a link leads out of the project (context_files).
        """
        # Imported here only until it joins the module's import of context_files.

        files = context_files(project_dir)
        size = context_size(files)
        for rel in linked_folders(project_dir):
            self.report(f"Note: {rel} is a symbolic link to a folder; mlserve does not follow those, so its files "
                        "are not in the image (replace the link with the folder, or mount it with --data).")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            _add_bytes(tar, ".mlserve/Dockerfile", dockerfile.encode())
            for name, data in runtime_sources():
                _add_bytes(tar, f".mlserve/runtime/{name}", data)
            if ca_bundle:
                _add_bytes(tar, ".mlserve/ca.crt", ca_bundle.read_bytes())
            for path, rel in files:
                with open(path, "rb") as handle:  # through a link: the image gets the target's content
                    stat = os.fstat(handle.fileno())
                    info = tarfile.TarInfo(f"app/{rel}")
                    info.size = stat.st_size
                    # Fixed mtime/owner so identical content hits the layer cache; readable by the instance user.
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    info.mode = 0o755 if stat.st_mode & 0o111 else 0o644
                    tar.addfile(info, handle)
        return buffer.getvalue(), size

    def build(
        self,
        project_dir: Path,
        repository: str,
        base_image: str,
        requirements: str | None,
        ca_bundle: Path | None,
        project_key: str,
    ) -> BuildResult:
        """Build and tag the image. Raises BuildError with the log's tail, BuildInterrupted on Ctrl-C."""
        dockerfile = self.dockerfile(base_image, requirements, ca_bundle is not None, host_pip_index_env())
        context, size = self.context(project_dir, dockerfile, ca_bundle)
        tag = f"{repository}:{hashlib.sha256(context).hexdigest()[:12]}"
        self.report(f"Uploading build context: {_human(size)}")
        started = time.monotonic()
        steps = cached = 0
        log: list[str] = []
        stream = None
        try:
            from .engine import engine_errors  # the Docker SDK: imported by the commands that build only

            with engine_errors("building the image"):
                stream = self.engine.build(
                    fileobj=io.BytesIO(context),
                    custom_context=True,
                    dockerfile=".mlserve/Dockerfile",
                    tag=tag,
                    rm=True,
                    forcerm=True,
                    labels={LABEL_HOME: self.home_label, LABEL_PROJECT: project_key},
                )
                for chunk in stream:
                    if "error" in chunk:
                        detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                        raise BuildError(
                            f"image build failed: {log_line(detail.strip())}",
                            "Build output (tail):\n" + "\n".join(log[-TAIL_LINES:]),
                        )
                    text = chunk.get("stream", "")
                    for line in text.splitlines():
                        # FROM is a step that is never "Using cache"; it is not rebuilt either.
                        if re.match(r"^Step \d+/\d+ : (?!FROM )", line):
                            steps += 1
                        elif "Using cache" in line:
                            cached += 1
                        if line.strip():
                            log.append(log_line(line.rstrip()))  # the app's import errors: shown, never acted on
        except KeyboardInterrupt:
            # Closing the stream makes the engine cancel the build; forcerm removes its containers.
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            raise BuildInterrupted("build interrupted (Ctrl-C): nothing was started") from None
        return BuildResult(tag, time.monotonic() - started, steps, cached, size)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"
