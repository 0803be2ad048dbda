"""The one door to the Docker SDK: connection, API and timeout errors become advice.

A command creates one ``Engine`` (``Platform.engine``) and passes it to what needs Docker; nothing
else calls the SDK, so every failure reads the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.utils import parse_repository_tag

from .errors import EngineUnavailableError, MlserveError
from .text import printable

START_ADVICE = (
    "Start the engine (as root: `mlserve setup`, or `dockerd &`), point DOCKER_HOST at a running one, "
    "or use `--runtime local` to serve without Docker."
)


def _where() -> str:
    host = os.environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={host}" if host else "unix:///var/run/docker.sock (DOCKER_HOST is not set)"


@contextmanager
def engine_errors(action: str) -> Iterator[None]:
    """Turn what the Docker SDK raises while doing ``action`` into an MlserveError."""
    try:
        yield
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise EngineUnavailableError(
            f"the Docker engine at {_where()} is not reachable while {action}", START_ADVICE
        ) from exc
    except requests.exceptions.Timeout as exc:
        raise EngineUnavailableError(
            f"the Docker engine at {_where()} did not answer in time while {action}",
            "The engine may be overloaded; try again, or check `docker info`.",
        ) from exc
    except docker.errors.DockerException as exc:
        if isinstance(exc, docker.errors.APIError):
            detail = exc.explanation or str(exc)
        else:
            detail = str(exc)
        if "Connection aborted" in detail or "Error while fetching server API version" in detail:
            raise EngineUnavailableError(
                f"the Docker engine at {_where()} is not reachable while {action}", START_ADVICE
            ) from exc
        raise MlserveError(f"Docker failed while {action}: {detail}") from exc


def connect(timeout: int = 120) -> docker.DockerClient:
    """Create the one Docker client of a command; raises EngineUnavailableError when no engine answers."""
    with engine_errors("connecting"):
        client = docker.from_env(timeout=timeout)
        client.ping()
    return client


def _labels(labels: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in labels.items()]


class Engine:
    """The Docker SDK calls mlserve makes, each turned into an MlserveError on failure."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, timeout: int = 120) -> Engine:
        return cls(connect(timeout))

    def close(self) -> None:
        """Close the client's connections; the engine and what runs in it are not touched."""
        with engine_errors("closing the connection"):
            self.client.close()

    # containers ---------------------------------------------------------------------------

    def run(self, image: str, what: str, **options: Any) -> Container:
        with engine_errors(f"starting a container for {what}"):
            return self.client.containers.run(image, detach=True, **options)

    def run_to_end(self, image: str, what: str, timeout: float, **options: Any) -> tuple[int | None, str]:
        """Run a container until it ends (``None`` as its status after ``timeout`` s: it is killed),
        then remove it; its exit status and output. On Ctrl-C it is removed, then the interrupt raised."""
        container = self.run(image, what, **options)
        try:
            with engine_errors(what):
                try:
                    status: int | None = int(container.wait(timeout=timeout).get("StatusCode", 1))
                except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):  # timed out
                    container.kill()
                    status = None
                output = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
        finally:
            with engine_errors(f"removing the container of {what}"):
                try:
                    container.remove(force=True)
                except docker.errors.NotFound:
                    pass
        return status, output

    def ensure_network(self, name: str, options: dict[str, str]) -> None:
        """A bridge network ``name`` with ``options``, created when missing (another command may create
        it at the same moment: that is fine)."""
        with engine_errors(f"setting up the network {name}"):
            found = self._network(name)
            if found is None:
                try:
                    self.client.networks.create(name, driver="bridge", options=options, check_duplicate=True)
                except docker.errors.APIError:
                    if self._network(name) is None:
                        raise
                found = self._network(name)
            have = (found.attrs.get("Options") or {}) if found is not None else {}
            if any(have.get(key) != value for key, value in options.items()):
                raise MlserveError(f"the Docker network {name} exists with other settings than mlserve's "
                                   f"({', '.join(f'{k}={have.get(k)}' for k in options)})",
                                   f"Remove it (`docker network rm {name}`, with no container on it) and run again.")

    def _network(self, name: str) -> Any:
        """The network called exactly ``name`` (the engine's name filter also matches longer names)."""
        return next((n for n in self.client.networks.list(names=[name]) if n.name == name), None)

    def container(self, container_id: str) -> Container | None:
        with engine_errors(f"looking up container {container_id[:12]}"):
            try:
                return self.client.containers.get(container_id)
            except docker.errors.NotFound:
                return None

    def containers(self, labels: dict[str, str]) -> list[Container]:
        """Containers (running or not) that carry all of ``labels``; one removed while they are listed
        is left out (the SDK's own list fails on it)."""
        found = []
        with engine_errors("listing containers"):
            for summary in self.client.api.containers(all=True, filters={"label": _labels(labels)}):
                try:
                    found.append(self.client.containers.get(summary["Id"]))
                except docker.errors.NotFound:
                    continue
        return found

    def stop(self, container: Container, timeout: int) -> None:
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and remove; a container already gone is fine."""
        with engine_errors(f"stopping container {container.id[:12]}"):
            try:
                container.stop(timeout=timeout)
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: another mlserve process is removing it already
                    raise

    def restart(self, container: Container, timeout: int) -> None:
        with engine_errors(f"restarting container {container.id[:12]}"):
            container.restart(timeout=timeout)

    def logs(self, container: Container, follow: bool, tail: int | None) -> Iterator[bytes]:
        with engine_errors(f"reading the logs of container {container.id[:12]}"):
            return container.logs(stream=True, follow=follow, tail="all" if tail is None else tail)

    # images -------------------------------------------------------------------------------

    def image_exists(self, ref: str) -> bool:
        with engine_errors(f"looking up image {ref}"):
            try:
                self.client.images.get(ref)
                return True
            except docker.errors.ImageNotFound:
                return False

    def pull(self, ref: str) -> None:
        with engine_errors(f"pulling {ref}"):
            self.client.images.pull(ref)

    def push(self, source: str, ref: str) -> str:
        """Tag image ``source`` as ``ref`` and push it; its registry digest (sha256:...). The local tag
        ``ref`` goes again afterwards. Raises MlserveError with the registry's words when it refuses."""
        repository, tag = parse_repository_tag(ref)
        digest = ""
        try:
            with engine_errors(f"pushing {ref}"):
                self.client.images.get(source).tag(repository, tag)
                for event in self.client.api.push(repository, tag=tag, stream=True, decode=True):
                    if event.get("error"):
                        raise MlserveError(f"the registry refused the push of {ref}: {printable(event['error'])[:300]}",
                                           "Check the registry's address and that `docker login` has its credentials.")
                    digest = (event.get("aux") or {}).get("Digest") or digest
        finally:
            self.untag(ref)
        if not digest.startswith("sha256:"):
            raise MlserveError(f"the registry gave no digest for {ref}", "Check the registry with `docker push` by hand.")
        return digest

    def registry_has(self, ref: str) -> bool:
        """Whether the registry answers for ``ref`` (name@digest) as a node's pull would ask it."""
        with engine_errors(f"asking the registry for {ref}"):
            try:
                self.client.images.get_registry_data(ref)
                return True
            except docker.errors.APIError:
                return False

    def untag(self, ref: str) -> None:
        """Remove a tag; noprune keeps the parent layers, so the next build still starts from the cache."""
        with engine_errors(f"removing the image {ref}"):
            try:
                self.client.images.remove(ref, noprune=True)
            except docker.errors.APIError:
                pass  # gone already, or still used by a container: it stays

    def build(self, **options: Any) -> Iterator[dict[str, Any]]:
        """Start a build; the decoded progress stream. Errors while streaming stay the caller's to read."""
        with engine_errors("building the image"):
            return self.client.api.build(decode=True, **options)

    def import_image(self, chunks: Iterable[bytes], ref: str, changes: Sequence[str] = ()) -> str:
        """``docker import - ref``: an image from a tar stream of a root file system.

        ``changes`` are Dockerfile instructions (LABEL, ENV, CMD ...) applied to it. Returns the
        engine's answer. Raises EngineUnavailableError, or MlserveError when the engine refuses it.
        """
        repository, tag = parse_repository_tag(ref)
        with engine_errors(f"importing {ref}"):
            answer = self.client.api.import_image(  # an iterator, which requests streams (a list it would form-encode)
                src=iter(chunks), repository=repository, tag=tag or "latest", changes=list(changes), stream_src=True,
            )
        return str(answer)
