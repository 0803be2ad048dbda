"""Wiring for one command: the home, the state, the Docker engine (connected once), runtimes and the gateway."""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

from .constants import DEFAULT_BODY_LIMIT_MB, DEFAULT_GATEWAY_HOST, DEFAULT_GATEWAY_PORT, DEFAULT_TIMEOUT_S
from .errors import UsageError
from .gateway import Gateway, GatewaySettings
from .home import Home
from .project import validate_owner
from .runtimes import Runtime
from .runtimes.local import LocalRuntime
from .state import StateStore

if TYPE_CHECKING:
    from .engine import Engine


def _docker_runtime(platform: Platform) -> Runtime:
    from .runtimes.docker import DockerRuntime  # the Docker SDK is slow to import: only commands that use it do

    return DockerRuntime(platform.engine, platform.home)


# Each runtime is made from the platform; the core only ever names one by its job's spec.
RUNTIME_FACTORIES: dict[str, Callable[[Platform], Runtime]] = {
    "docker": _docker_runtime,
    "local": lambda platform: LocalRuntime(platform.home),
}
RUNTIMES = tuple(RUNTIME_FACTORIES)


class Platform:
    def __init__(self, home: Home | None = None, report: Callable[[str], None] = print) -> None:
        self.home: Home = home or Home.from_env()
        self.report = report
        self._runtimes: dict[str, Runtime] = {}

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self.home)

    @cached_property
    def owner(self) -> str:
        return validate_owner(os.environ.get("MLSERVE_OWNER") or getpass.getuser())

    @cached_property
    def engine(self) -> Engine:
        from .engine import Engine

        return Engine.connect()

    def reconnect(self) -> None:
        """Forget the engine connection (it may be restarting); the next use connects again."""
        self.__dict__.pop("engine", None)
        self._runtimes.clear()

    def runtime(self, name: str) -> Runtime:
        if name not in self._runtimes:
            factory = RUNTIME_FACTORIES.get(name)
            if factory is None:
                raise UsageError(f"unknown runtime {name!r}", f"Use one of: {', '.join(RUNTIMES)}.")
            self._runtimes[name] = factory(self)
        return self._runtimes[name]

    def choose_runtime(self, requested: str | None) -> str:
        """``--runtime``, else Docker. An engine that does not answer fails now, before anything is built,
        with advice: serving on the host without a container is the user's explicit choice (`--runtime
        local`), never a silent fallback."""
        name = requested or "docker"
        self.runtime(name)
        return name

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
            tls=state.get_setting("gateway.tls") is not None,
            public_url=state.get_setting("gateway.public_url"),
        )

    @cached_property
    def gateway(self) -> Gateway:
        return Gateway(self.home, self.gateway_settings())

    def forget_gateway(self) -> None:
        """Read the gateway's settings again on next use (`gateway start` may have changed them)."""
        self.__dict__.pop("gateway", None)

    def endpoint(self, job_id: str) -> str:
        """A job's unique endpoint."""
        return f"{self.gateway.url}/serve/{job_id}"

    def project_endpoint(self, project_key: str) -> str:
        """The project's endpoint (``owner/projects/project``), round-robin over its healthy jobs."""
        return f"{self.gateway.url}/serve/{project_key}"

    def version_endpoint(self, project_key: str, version: int) -> str:
        """One version's own endpoint: round robin over its healthy jobs, whatever its traffic share."""
        return f"{self.project_endpoint(project_key)}/v/{version}"
