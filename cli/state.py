"""The record of what should run: a versioned SQLite schema and all of mlserve's SQL.

Mutating commands hold ``StateStore.lock()`` (a file lock beside the database) for their
whole read-decide-write sequence, so concurrent ``mlserve`` calls never double-assign a job
number or lose an update.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from filelock import FileLock

from mlserve.home import Home

# Each entry upgrades the schema by one version; never edit a released entry, append one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,          -- endpoint id, 22 chars base62
        owner       TEXT NOT NULL,
        project     TEXT NOT NULL,
        number      INTEGER NOT NULL,
        runtime     TEXT NOT NULL,             -- docker | local
        image       TEXT NOT NULL,             -- image tag, or the local venv path
        state       TEXT NOT NULL,             -- starting | running | stopping | stopped | failed
        healthy     INTEGER NOT NULL DEFAULT 0,
        handle      TEXT,                      -- container id or pid
        settings    TEXT NOT NULL,             -- JSON: what is needed to start an identical job
        reason      TEXT,
        restarts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        started_at  REAL,
        stopped_at  REAL,
        UNIQUE (owner, project, number)
    );
    CREATE TABLE project_counters (
        owner   TEXT NOT NULL,
        project TEXT NOT NULL,
        last    INTEGER NOT NULL,
        PRIMARY KEY (owner, project)
    );
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]

ACTIVE_STATES = ("starting", "running", "stopping")


@dataclass
class Job:
    id: str
    owner: str
    project: str
    number: int
    runtime: str
    image: str
    state: str
    healthy: bool
    handle: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    restarts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None

    @property
    def project_key(self) -> str:
        return f"{self.owner}/projects/{self.project}"

    @property
    def name(self) -> str:
        return f"{self.project_key}/{self.number}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _row_to_job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["healthy"] = bool(data["healthy"])
    data["settings"] = json.loads(data["settings"])
    return Job(**data)


class StateStore:
    """SQLite state under MLSERVE_HOME. Every method is one short transaction."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._lock = FileLock(str(home.lock))
        self._conn = sqlite3.connect(str(home.db), timeout=30, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise a mutating command against every other mlserve process on this home."""
        with self._lock:
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock, self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    # jobs -----------------------------------------------------------------

    def next_number(self, owner: str, project: str) -> int:
        """Reserve the next job number of a project; numbers are never reused."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO project_counters (owner, project, last) VALUES (?, ?, 1) "
                "ON CONFLICT (owner, project) DO UPDATE SET last = last + 1",
                (owner, project),
            )
            row = db.execute(
                "SELECT last FROM project_counters WHERE owner = ? AND project = ?", (owner, project)
            ).fetchone()
        return int(row[0])

    def add_job(self, job: Job) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, owner, project, number, runtime, image, state, healthy, handle,"
                " settings, reason, restarts, created_at, started_at, stopped_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id, job.owner, job.project, job.number, job.runtime, job.image, job.state,
                    int(job.healthy), job.handle, json.dumps(job.settings, sort_keys=True), job.reason,
                    job.restarts, job.created_at or time.time(), job.started_at, job.stopped_at,
                ),
            )

    _UPDATABLE = {"state", "healthy", "handle", "reason", "restarts", "started_at", "stopped_at", "image"}

    def update_job(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - self._UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if "healthy" in fields:
            fields["healthy"] = int(bool(fields["healthy"]))
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def delete_job(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get_job(self, job_id: str) -> Job | None:
        row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def jobs(self, *, active_only: bool = False, owner: str | None = None, project: str | None = None) -> list[Job]:
        """Jobs oldest first, optionally only active ones of one project."""
        clauses, params = [], []
        if active_only:
            clauses.append(f"state IN ({', '.join('?' * len(ACTIVE_STATES))})")
            params.extend(ACTIVE_STATES)
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if project is not None:
            clauses.append("project = ?")
            params.append(project)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn.execute(f"SELECT * FROM jobs {where} ORDER BY created_at, number", params)
        return [_row_to_job(row) for row in rows]

    def projects(self) -> list[str]:
        """Every project with a job on record (running or not), as owner/projects/project."""
        rows = self._conn.execute("SELECT DISTINCT owner, project FROM jobs ORDER BY owner, project")
        return [f"{owner}/projects/{project}" for owner, project in rows]

    # settings -------------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete_setting(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM settings WHERE key = ?", (key,))
