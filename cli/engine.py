"""The one door to the Docker SDK: connection, API and timeout errors become advice."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import docker
import docker.errors
import requests.exceptions

from mlserve.errors import EngineUnavailableError, MlserveError

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
