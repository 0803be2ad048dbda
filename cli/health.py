"""Ask an instance two questions: is it ready (take traffic?) and is it alive (restart?).

The probes themselves live in ``mlserve_runtime.health`` (standard library only), so the same code
runs here, in the supervisor, and inside a pod as Kubernetes exec probes; this module re-exports
them for the host side and adds what only the host does: waiting for a new instance.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mlserve_runtime.health import (
    STATS_MAX_BYTES,
    Liveness,
    ProbeResult,
    Worker,
    judge,
    liveness,
    probe,
    read_stats,
)

__all__ = ["STATS_MAX_BYTES", "Liveness", "ProbeResult", "Worker", "judge", "liveness", "probe", "read_stats",
           "wait_healthy"]


def wait_healthy(socket_path: str, deadline: float, alive: Callable[[], bool] | None = None) -> ProbeResult:
    """Probe until a pass or ``deadline`` (time.monotonic); stop early when ``alive()`` says the instance died."""
    result = ProbeResult(False, None, "not probed yet")
    while time.monotonic() < deadline:
        result = probe(socket_path, timeout=max(0.5, min(3.0, deadline - time.monotonic())))
        if result.ok:
            return result
        if alive is not None and not alive():
            return ProbeResult(False, result.status, "the instance exited")
        time.sleep(0.1)
    return result
