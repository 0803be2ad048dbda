"""One isolated mlserve per benchmark (its own home, gateway port and owner `bench`), removed afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import docker
from results import one_line

from tests.harness import Mlserve, make_mlserve, teardown_mlserve

COMMAND_TIMEOUT_S = 300


@contextmanager
def sandbox() -> Iterator[Mlserve]:
    """An isolated mlserve; nothing of its home outlives the block, as far as the engine answers."""
    ms = make_mlserve(owner="bench", timeout=COMMAND_TIMEOUT_S)
    try:
        yield ms
    finally:
        client = docker.from_env()  # a new one: an engine restart breaks the connections of the old
        try:
            teardown_mlserve(ms, client)
        except (subprocess.TimeoutExpired, docker.errors.DockerException) as exc:
            # A benchmark's numbers matter more than its clean-up (the engine may not have come back).
            print(f"   clean-up of {ms.home} incomplete: {one_line(exc)}", flush=True)
        finally:
            client.close()
