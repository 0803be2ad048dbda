"""Programs and processes on the host, as `mlserve setup` and the gateway see them: where a program
is installed, whether the process a pid file names still runs, the tail of what a command printed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

Report = Callable[[str], None]  # where set-up steps say what they do, e.g. click.echo

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_program(name: str) -> str | None:
    """Path of ``name`` on PATH or in the system directories (sbin is often off a user's PATH)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), SYSTEM_PATH]))


def live_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process still runs; None when the file is absent, unreadable or stale."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie counts as exited)."""
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


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a command's output, for an error's hint."""
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"
