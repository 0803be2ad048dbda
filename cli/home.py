"""Where mlserve keeps its state: everything lives under MLSERVE_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .constants import SOCKET_NAME
from .privileges import gateway_group, seal_home


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        # Resolved: the home's path is matched in nginx's and the supervisor's command lines and in
        # container labels, so `/tmp/a/../b` and `/tmp/b` must be one home.
        root = Path(os.environ.get("MLSERVE_HOME") or Path.home() / ".mlserve").expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        # Private: sockets, the state and the instances' stats (which show requests in flight) are in here.
        # Containers reach their folders through bind mounts, not through this path; under root, the
        # gateway's workers pass through it to the sockets (privileges.py).
        seal_home(root, gateway_group())
        return cls(root)

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def lock(self) -> Path:
        return self.root / "state.lock"

    @property
    def gateway_dir(self) -> Path:
        return self.root / "gateway"

    @property
    def venvs_dir(self) -> Path:
        return self.root / "venvs"

    def run_dir(self, job_id: str) -> Path:
        """Per-job dir shared with the instance: socket, uwsgi.ini, manifest (mounted at /run/mlserve)."""
        return self.root / "run" / job_id

    def socket(self, job_id: str) -> Path:
        """The job's uwsgi socket, which the gateway and the health checks connect to."""
        return self.run_dir(job_id) / SOCKET_NAME

    def output_dir(self, job_id: str) -> Path:
        """Per-job writable dir, mounted at /output in the instance."""
        return self.root / "output" / job_id
