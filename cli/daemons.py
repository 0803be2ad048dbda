"""The supervisor as a background process: started, found, replaced after an upgrade, stopped.

What it does each round lives in ``supervisor``; this module only manages the process, so the
commands can start it without importing the job machinery it drives.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .home import Home

PIDFILE = "supervisor.pid"
LOGFILE = "supervisor.log"
HEARTBEAT = "supervisor.heartbeat"  # touched after every round; holds that round's problems
MODULE = "mlserve.supervisor"


@dataclass(frozen=True)
class Heartbeat:
    age_s: float  # since the last round ended
    problems: list[str]  # what went wrong in it (one line each); empty when all went well


def _pidfile(home: Home) -> Path:
    return home.gateway_dir / PIDFILE


def logfile(home: Home) -> Path:
    return home.gateway_dir / LOGFILE


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of mlserve's own code: a supervisor started by older code is replaced after an upgrade."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _running(home: Home) -> tuple[int, str] | None:
    """(pid, code fingerprint) of the supervisor running for this home."""
    try:
        value, _, fingerprint = _pidfile(home).read_text().strip().partition(" ")
        cmdline = Path(f"/proc/{int(value)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return (int(value), fingerprint) if MODULE.encode() in cmdline else None


def pid(home: Home) -> int | None:
    """The running supervisor's pid for this home, or None."""
    running = _running(home)
    return running[0] if running else None


def register(home: Home) -> None:
    """Called by the supervisor itself when it starts."""
    home.gateway_dir.mkdir(parents=True, exist_ok=True)
    _write_private(_pidfile(home), f"{os.getpid()} {code_fingerprint()}")


def unregister(home: Home) -> None:
    if pid(home) == os.getpid():
        _pidfile(home).unlink(missing_ok=True)


def beat(home: Home, problems: list[str]) -> None:
    """Record that a round ended, and what went wrong in it."""
    path = home.gateway_dir / HEARTBEAT
    tmp = path.with_suffix(".tmp")
    _write_private(tmp, json.dumps({"problems": problems}))
    tmp.replace(path)


def _write_private(path: Path, text: str) -> None:
    """Root's alone, like every file of the gateway's folder (its workers pass through it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def heartbeat(home: Home) -> Heartbeat | None:
    """The last round's heartbeat, or None if no round ever ended."""
    path = home.gateway_dir / HEARTBEAT
    try:
        age = time.time() - path.stat().st_mtime
        problems = json.loads(path.read_text() or "{}").get("problems", [])
    except (OSError, ValueError, AttributeError):
        return None
    return Heartbeat(age, [str(p) for p in problems] if isinstance(problems, list) else [])


def ensure_running(home: Home) -> int | None:
    """Start the supervisor for ``home`` unless it runs; returns the new pid, or None if it ran already.

    One started by other code (mlserve was upgraded meanwhile) is replaced.
    """
    running = _running(home)
    if running is not None and running[1] == code_fingerprint():
        return None
    if running is not None:
        stop(home)
    home.gateway_dir.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(logfile(home), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE],
            env={**os.environ, "MLSERVE_HOME": str(home.root)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd="/",
        )
    deadline = time.monotonic() + 5
    while pid(home) != process.pid and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    return process.pid


def stop(home: Home, timeout: float = 10) -> bool:
    """Stop the supervisor; False if it was not running."""
    value = pid(home)
    if value is None:
        return False
    os.kill(value, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid(home) == value and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
