"""One error family: the core raises these, the CLI turns them into a message and an exit code."""

from __future__ import annotations


class MlserveError(Exception):
    """Base of every error mlserve reports to the user.

    ``hint`` is advice the user can act on; ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MlserveError):
    exit_code = 2


class AppValidationError(MlserveError):
    exit_code = 3


class ProjectConfigError(MlserveError):
    exit_code = 3


class BuildError(MlserveError):
    exit_code = 4


class BuildInterrupted(BuildError):
    exit_code = 130


class EngineUnavailableError(MlserveError):
    exit_code = 5


class GatewayError(MlserveError):
    exit_code = 6


class NginxNotInstalledError(GatewayError):
    pass


class GatewayPortInUseError(GatewayError):
    pass


class JobNotFoundError(MlserveError):
    exit_code = 7


class JobStartError(MlserveError):
    exit_code = 8


class SetupError(MlserveError):
    exit_code = 9


class StateError(MlserveError):
    """The state database cannot be read as this mlserve knows it (newer, or damaged)."""

    exit_code = 10
