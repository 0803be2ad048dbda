"""Set up the host mlserve runs on: apt packages, the gateway's user, a Docker engine, a base image to build on.

Written for Debian 12 as root with no systemd. Each step lives in its own module and checks
first, so a second run is quick: ``apt`` installs what is missing, ``privileges`` makes the user the
gateway's nginx workers run as, ``dockerd`` starts the engine in the background, ``base_image`` pulls
or makes (debootstrap) the image builds start from.
"""

from __future__ import annotations

import time

from .apt import ensure_packages
from .base_image import ensure_base_image
from .dockerd import ensure_engine
from .privileges import gateway_account
from .programs import Report, find_program

__all__ = ["ensure_base_image", "ensure_engine", "ensure_packages", "find_program", "setup"]


def setup(report: Report) -> None:
    """Install what is missing, start the engine, make sure a base image exists.

    Idempotent, and about a second when everything is already there.
    Raises SetupError or EngineUnavailableError with advice.
    """
    started = time.monotonic()
    ensure_packages(report)
    gateway_account(report)
    engine = ensure_engine(report)  # the one connection of the set-up
    try:
        base = ensure_base_image(report, engine)
    finally:
        engine.close()
    report(f"Ready in {time.monotonic() - started:.1f}s: builds start from {base}.")
