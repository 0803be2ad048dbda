"""Wiring for one command: the home, the state, the Docker client (made once), runtimes and the gateway."""

from __future__ import annotations

import getpass
import os
from functools import cached_property
from typing import Callable

import docker

from mlserve import engine
from mlserve.constants import DEFAULT_BODY_LIMIT_MB, DEFAULT_GATEWAY_HOST, DEFAULT_GATEWAY_PORT, DEFAULT_TIMEOUT_S
from mlserve.errors import EngineUnavailableError, UsageError
from mlserve.gateway import Gateway, GatewaySettings
from mlserve.home import Home
from mlserve.project import validate_owner
from mlserve.runtimes import Runtime
from mlserve.runtimes.docker import DockerRuntime
from mlserve.runtimes.local import LocalRuntime
from mlserve.state import StateStore

RUNTIMES = ("docker", "local")


class Platform:
    def __init__(self, home: Home | None = None, report: Callable[[str], None] = print) -> None:
        self.home = home or Home.from_env()
        self.report = report

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self.home)

    @cached_property
    def owner(self) -> str:
        return validate_owner(os.environ.get("MLSERVE_OWNER") or getpass.getuser())

    @property
    def home_label(self) -> str:
        return str(self.home.root)

    @cached_property
    def docker(self) -> docker.DockerClient:
        return engine.connect()

    def runtime(self, name: str) -> Runtime:
        if name == "docker":
            return DockerRuntime(self.docker, self.home_label)
        if name == "local":
            return LocalRuntime(self.home)
        raise UsageError(f"unknown runtime {name!r}", f"Use one of: {', '.join(RUNTIMES)}.")

    def choose_runtime(self, requested: str | None) -> str:
        """``--runtime``, or Docker when an engine answers and local otherwise (with a one-line notice)."""
        if requested:
            if requested == "docker":
                self.docker  # fail now, before anything is built
            return requested
        try:
            self.docker
            return "docker"
        except EngineUnavailableError as exc:
            self.report(f"Notice: {exc.message}; serving with --runtime local instead.")
            return "local"

    def gateway_settings(self) -> GatewaySettings:
        state = self.state
        env_port = os.environ.get("MLSERVE_GATEWAY_PORT")
        try:
            port = int(env_port or state.get_setting("gateway.port") or DEFAULT_GATEWAY_PORT)
        except ValueError:
            raise UsageError(f"MLSERVE_GATEWAY_PORT={env_port!r} is not a port number") from None
        return GatewaySettings(
            host=state.get_setting("gateway.host") or DEFAULT_GATEWAY_HOST,
            port=port,
            body_limit_mb=int(state.get_setting("gateway.body_limit_mb") or DEFAULT_BODY_LIMIT_MB),
            timeout_s=int(state.get_setting("gateway.timeout_s") or DEFAULT_TIMEOUT_S),
        )

    @cached_property
    def gateway(self) -> Gateway:
        return Gateway(self.home, self.gateway_settings())
