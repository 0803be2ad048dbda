"""Who moves a job through a passing state: the command's process, named so it survives pid reuse."""

from __future__ import annotations

import os
from pathlib import Path


def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (start time); the command name in field 2 may contain spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def this_actor() -> str:
    """``pid:start-time`` of this process."""
    return f"{os.getpid()}:{_start_ticks(os.getpid())}"


def actor_alive(actor: str | None) -> bool:
    """Whether the process named by ``actor`` still runs (a reused pid does not count)."""
    if not actor:
        return False
    pid, _, ticks = actor.partition(":")
    try:
        return _start_ticks(int(pid)) == ticks
    except ValueError:
        return False
