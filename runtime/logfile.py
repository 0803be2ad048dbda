"""LOG_FILE handling: the file the app may write is truncated when it passes its maximum size."""

from __future__ import annotations

import os
import threading
import time

DEFAULT_MAX_BYTES = 1 << 30
CHECK_EVERY_S = 10.0


def truncate_if_large(path: str, max_bytes: int) -> bool:
    """Empty ``path`` when it is larger than ``max_bytes``; True when it did.

    Writers that opened it in append mode go on at the new end; it never grows without bound.
    """
    try:
        if os.path.getsize(path) <= max_bytes:
            return False
        with open(path, "r+b") as handle:
            handle.truncate(0)
    except OSError:
        return False
    print(f"mlserve: {path} passed {max_bytes} bytes and was truncated", flush=True)
    return True


def start_watcher(path: str | None, max_bytes: int, interval: float = CHECK_EVERY_S) -> threading.Thread | None:
    """Check ``path`` every ``interval`` seconds in a daemon thread (one per instance is enough)."""
    if not path:
        return None

    def watch() -> None:
        while True:
            truncate_if_large(path, max_bytes)
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="mlserve-logfile", daemon=True)
    thread.start()
    return thread
