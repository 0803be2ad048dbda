"""The record of what should run: a versioned SQLite schema and all of mlserve's SQL.

Mutating commands hold ``StateStore.lock()`` (a file lock beside the database) while they read,
decide and write the record, so concurrent ``mlserve`` calls never double-assign a job number
or lose an update. The lock guards records only: nobody holds it across a build, a health wait
or a drain. A job in a passing state (starting, stopping) names its ``actor``, the command
process moving it, so that the reconcile step can finish or undo what a killed command left.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from .errors import StateError
from .guard import Cors, Guard, RateLimit, Token
from .home import Home
from .kube.target import ClusterTarget
from .spec import SPEC_VERSION, JobSpec, upgrade_v1
from .traffic import Traffic


def _upgrade_job_specs(db: sqlite3.Connection) -> None:
    """Version-1 rows kept an unchecked settings dict: check it into a version-2 spec."""
    rows = db.execute("SELECT id, settings, reason FROM jobs WHERE spec_version = 1").fetchall()
    for job_id, settings, reason in rows:
        spec, notes = upgrade_v1(json.loads(settings))
        if notes:
            reason = "; ".join(filter(None, [reason, "settings upgraded: " + ", ".join(notes)]))
        db.execute("UPDATE jobs SET settings = ?, spec_version = 2, reason = ? WHERE id = ?", (spec, reason, job_id))


def _add_versions(db: sqlite3.Connection) -> None:
    """Schema 3: versions of a project, a version per job, and the project's traffic split. Jobs from
    before are grouped into versions by their image, oldest first."""
    db.execute("""
        CREATE TABLE versions (
            owner      TEXT NOT NULL,
            project    TEXT NOT NULL,
            number     INTEGER NOT NULL,
            image      TEXT NOT NULL,              -- the artifact ref, for queries; the spec holds it
            spec       TEXT NOT NULL,              -- JSON: the job spec every job of the version starts from
            fallback   INTEGER NOT NULL DEFAULT 0, -- takes traffic only when no primary version can
            created_at REAL NOT NULL,
            PRIMARY KEY (owner, project, number)
        )""")
    db.execute("""
        CREATE TABLE traffic (
            owner   TEXT NOT NULL,
            project TEXT NOT NULL,
            shares  TEXT,                          -- JSON {version: percent}; NULL: equal turns per job
            sticky  INTEGER NOT NULL DEFAULT 0,    -- a cookie keeps a browser on one version
            PRIMARY KEY (owner, project)
        )""")
    db.execute("ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
    # Version numbers are never reused either (a sticky cookie or a printed /v/N must not change model).
    db.execute("ALTER TABLE project_counters ADD COLUMN last_version INTEGER NOT NULL DEFAULT 0")
    numbers: dict[tuple[str, str, str], int] = {}
    rows = db.execute("SELECT id, owner, project, image, settings, created_at FROM jobs ORDER BY created_at, number")
    for job_id, owner, project, image, settings, created_at in rows.fetchall():
        key = (owner, project, image)
        if key not in numbers:
            numbers[key] = 1 + sum(1 for k in numbers if k[:2] == (owner, project))
            db.execute("INSERT INTO versions (owner, project, number, image, spec, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (owner, project, numbers[key], image, settings, created_at))
        db.execute("UPDATE jobs SET version = ? WHERE id = ?", (numbers[key], job_id))
    db.execute("INSERT INTO project_counters (owner, project, last) SELECT owner, project, MAX(number) FROM jobs"
               " WHERE true GROUP BY owner, project ON CONFLICT (owner, project) DO NOTHING")
    db.execute("UPDATE project_counters SET last_version = (SELECT COALESCE(MAX(number), 0) FROM versions"
               " WHERE versions.owner = project_counters.owner AND versions.project = project_counters.project)")


def _add_guards(db: sqlite3.Connection) -> None:
    """Schema 4: who may call a project (access, rate limit, CORS origins) and its tokens' hashes."""
    db.execute("""
        CREATE TABLE guards (
            owner   TEXT NOT NULL,
            project TEXT NOT NULL,
            access  TEXT,                          -- public | token; NULL: as the gateway (public on loopback)
            rate    REAL,                          -- requests a second for the whole project; NULL: no limit
            burst   INTEGER,
            cors    TEXT,                          -- JSON list of origins; NULL: no cross-origin calls
            PRIMARY KEY (owner, project)
        )""")
    db.execute("""
        CREATE TABLE tokens (
            owner      TEXT NOT NULL,
            project    TEXT NOT NULL,
            name       TEXT NOT NULL,
            digest     TEXT NOT NULL UNIQUE,       -- base64 SHA-256 of the token; the token is never stored
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL,
            rate       REAL,                       -- this token's own limit, on top of the project's
            burst      INTEGER,
            PRIMARY KEY (owner, project, name)
        )""")


def _add_clusters(db: sqlite3.Connection) -> None:
    """Schema 5: Kubernetes clusters jobs may go to (`mlserve cluster add`). What runs there is read
    back from the cluster itself, never kept here."""
    db.execute("""
        CREATE TABLE clusters (
            name          TEXT PRIMARY KEY,
            kubeconfig    TEXT NOT NULL,           -- absolute path
            context       TEXT,                    -- NULL: the kubeconfig's current context
            registry      TEXT NOT NULL,           -- where images are pushed: host[:port]/path
            namespace     TEXT NOT NULL,
            url           TEXT NOT NULL,           -- what endpoints start with
            ingress_class TEXT NOT NULL,
            created_at    REAL NOT NULL
        )""")


Migration = str | Callable[[sqlite3.Connection], None]

# Each entry upgrades the schema by one version; never edit a released entry, append one.
MIGRATIONS: list[Migration] = [
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
    """
    ALTER TABLE jobs ADD COLUMN spec_version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN actor TEXT;  -- pid:start-time of the command in a passing state
    """,
    _upgrade_job_specs,
    _add_versions,
    _add_guards,
    _add_clusters,
]

ACTIVE_STATES = ("starting", "running", "stopping")


@dataclass
class Job:
    id: str
    owner: str
    project: str
    number: int
    state: str
    healthy: bool
    handle: str | None
    spec: JobSpec
    reason: str | None = None
    restarts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None
    actor: str | None = None
    version: int = 0

    @property
    def runtime(self) -> str:
        return self.spec.runtime

    @property
    def project_key(self) -> str:
        return f"{self.owner}/projects/{self.project}"

    @property
    def name(self) -> str:
        return f"{self.project_key}/{self.number}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class Version:
    """One `run` of a project: its artifact and the spec every job of the version starts from."""

    owner: str
    project: str
    number: int
    spec: JobSpec
    fallback: bool = False
    created_at: float = 0.0

    @property
    def project_key(self) -> str:
        return f"{self.owner}/projects/{self.project}"


def _row_to_guard(access: str | None, rate: float | None, burst: int | None, cors: str | None) -> Guard:
    return Guard(access, RateLimit(rate, burst or 1) if rate is not None else None,
                 Cors(tuple(json.loads(cors))) if cors is not None else None)


def _row_to_version(row: sqlite3.Row) -> Version:
    return Version(row["owner"], row["project"], row["number"], JobSpec.from_json(row["spec"]), bool(row["fallback"]),
                   row["created_at"])


def _row_to_job(row: sqlite3.Row) -> Job:
    data = dict(row)
    for column in ("runtime", "image", "spec_version"):
        data.pop(column)  # the spec says these; the columns are there for queries
    data["healthy"] = bool(data["healthy"])
    data["spec"] = JobSpec.from_json(data.pop("settings"))
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
    def project_lock(self, owner: str, project: str) -> Iterator[None]:
        """Serialise the commands that start jobs of one project (run, scale), across their health
        waits, so that each sees what the one before it did. Other projects, `stop` and the
        supervisor never wait for it. Taken before the state lock, never inside it."""
        folder = self.home.root / "locks"
        folder.mkdir(exist_ok=True)
        with FileLock(str(folder / f"{owner}--{project}.lock")):
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
        """Upgrade an older database in place; refuse one written by a newer mlserve."""
        if self.schema_version == len(MIGRATIONS):
            return
        with self._lock, self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StateError(
                    f"{self.home.db} was written by a newer mlserve (schema {version}; this one knows up to "
                    f"{len(MIGRATIONS)}), so it is left untouched",
                    "Upgrade mlserve, or point MLSERVE_HOME at another folder.",
                )
            for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
                if callable(step):
                    step(db)
                else:
                    for statement in step.split(";"):
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
                " settings, spec_version, reason, restarts, created_at, started_at, stopped_at, actor, version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id, job.owner, job.project, job.number, job.spec.runtime, job.spec.artifact.ref, job.state,
                    int(job.healthy), job.handle, job.spec.to_json(), SPEC_VERSION, job.reason,
                    job.restarts, job.created_at or time.time(), job.started_at, job.stopped_at, job.actor, job.version,
                ),
            )

    _UPDATABLE = {"state", "healthy", "handle", "reason", "restarts", "started_at", "stopped_at", "actor"}

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
        clauses: list[str] = []
        params: list[str] = []
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

    def artifacts_in_use(self, keep_versions: int = 0) -> set[str]:
        """Artifact refs that must not be discarded: those of active jobs, and those of each project's
        newest ``keep_versions`` versions (so that `scale --version N` can bring one back)."""
        placeholders = ", ".join("?" * len(ACTIVE_STATES))
        rows = self._conn.execute(f"SELECT DISTINCT image FROM jobs WHERE state IN ({placeholders})", ACTIVE_STATES)
        kept = self._conn.execute(
            "SELECT image FROM (SELECT image, ROW_NUMBER() OVER (PARTITION BY owner, project ORDER BY number DESC) AS"
            " newest FROM versions) WHERE newest <= ?", (keep_versions,))
        return {row[0] for row in rows} | {row[0] for row in kept}

    def projects(self) -> list[str]:
        """Every project with a job on record (running or not), as owner/projects/project."""
        rows = self._conn.execute("SELECT DISTINCT owner, project FROM jobs ORDER BY owner, project")
        return [f"{owner}/projects/{project}" for owner, project in rows]

    # versions and traffic -------------------------------------------------

    def add_version(self, owner: str, project: str, spec: JobSpec, fallback: bool = False) -> Version:
        """Record the project's next version (numbers are never reused). The caller holds the state lock."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO project_counters (owner, project, last, last_version) VALUES (?, ?, 0, 1) "
                "ON CONFLICT (owner, project) DO UPDATE SET last_version = last_version + 1",
                (owner, project),
            )
            row = db.execute("SELECT last_version FROM project_counters WHERE owner = ? AND project = ?",
                             (owner, project)).fetchone()
            version = Version(owner, project, int(row[0]), spec, fallback, time.time())
            db.execute(
                "INSERT INTO versions (owner, project, number, image, spec, fallback, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (owner, project, version.number, spec.artifact.ref, spec.to_json(), int(fallback), version.created_at),
            )
        return version

    def delete_version(self, owner: str, project: str, number: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM versions WHERE owner = ? AND project = ? AND number = ?", (owner, project, number))

    def versions(self, owner: str | None = None, project: str | None = None) -> list[Version]:
        """Versions oldest first, of one project or of all."""
        if owner is None or project is None:
            rows = self._conn.execute("SELECT * FROM versions ORDER BY owner, project, number")
        else:
            rows = self._conn.execute("SELECT * FROM versions WHERE owner = ? AND project = ? ORDER BY number",
                                      (owner, project))
        return [_row_to_version(row) for row in rows]

    def forget_versions_without_jobs(self) -> list[Version]:
        """Delete the versions no job row names (a run killed before its jobs served left them), and
        their shares. Every run records its version and its jobs in one locked step, so under the state
        lock (the caller holds it) only such leftovers have none."""
        rows = self._conn.execute(
            "SELECT * FROM versions v WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.owner = v.owner"
            " AND j.project = v.project AND j.version = v.number)").fetchall()
        gone = [_row_to_version(row) for row in rows]
        for version in gone:
            traffic = self.traffic(version.owner, version.project)
            if traffic.shares and version.number in traffic.shares:
                shares = {v: p for v, p in traffic.shares.items() if v != version.number}
                self.set_traffic(version.owner, version.project, Traffic(shares or None, traffic.sticky))
            self.delete_version(version.owner, version.project, version.number)
        return gone

    def fallback_versions(self) -> frozenset[tuple[str, str, int]]:
        """(owner, project, number) of every fallback version."""
        rows = self._conn.execute("SELECT owner, project, number FROM versions WHERE fallback = 1")
        return frozenset((owner, project, int(number)) for owner, project, number in rows)

    def traffic(self, owner: str, project: str) -> Traffic:
        row = self._conn.execute("SELECT shares, sticky FROM traffic WHERE owner = ? AND project = ?",
                                 (owner, project)).fetchone()
        if row is None:
            return Traffic()
        shares = None if row[0] is None else {int(v): int(p) for v, p in json.loads(row[0]).items()}
        return Traffic(shares, bool(row[1]))

    def set_traffic(self, owner: str, project: str, traffic: Traffic) -> None:
        shares = None if traffic.shares is None else json.dumps({str(v): p for v, p in sorted(traffic.shares.items())})
        with self._tx() as db:
            db.execute(
                "INSERT INTO traffic (owner, project, shares, sticky) VALUES (?, ?, ?, ?) ON CONFLICT (owner, project)"
                " DO UPDATE SET shares = excluded.shares, sticky = excluded.sticky",
                (owner, project, shares, int(traffic.sticky)),
            )

    # guards and tokens ----------------------------------------------------

    def guard(self, owner: str, project: str) -> Guard:
        row = self._conn.execute("SELECT access, rate, burst, cors FROM guards WHERE owner = ? AND project = ?",
                                 (owner, project)).fetchone()
        return Guard() if row is None else _row_to_guard(*row)

    def guards(self) -> dict[str, Guard]:
        """Every project on record (owner/projects/project) with its guard, in one query."""
        rows = self._conn.execute(
            "SELECT DISTINCT j.owner, j.project, g.access, g.rate, g.burst, g.cors FROM jobs j"
            " LEFT JOIN guards g ON g.owner = j.owner AND g.project = j.project ORDER BY j.owner, j.project")
        return {f"{owner}/projects/{project}": _row_to_guard(access, rate, burst, cors)
                for owner, project, access, rate, burst, cors in rows}

    def set_guard(self, owner: str, project: str, guard: Guard) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO guards (owner, project, access, rate, burst, cors) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (owner, project) DO UPDATE SET access = excluded.access, rate = excluded.rate,"
                " burst = excluded.burst, cors = excluded.cors",
                (owner, project, guard.access, guard.rate.per_s if guard.rate else None,
                 guard.rate.burst if guard.rate else None,
                 json.dumps(list(guard.cors.origins)) if guard.cors else None),
            )

    def tokens(self, owner: str | None = None, project: str | None = None) -> list[Token]:
        query, args = "SELECT * FROM tokens WHERE true", []
        for column, value in (("owner", owner), ("project", project)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        rows = self._conn.execute(query + " ORDER BY owner, project, created_at, name", args).fetchall()
        return [Token(r["owner"], r["project"], r["name"], r["digest"], r["created_at"], r["expires_at"],
                      r["revoked_at"], RateLimit(r["rate"], r["burst"]) if r["rate"] is not None else None)
                for r in rows]

    def add_token(self, token: Token) -> None:
        """Record a token; one of the same name that is no longer active (revoked, expired) gives way."""
        with self._tx() as db:
            db.execute("DELETE FROM tokens WHERE owner = ? AND project = ? AND name = ?"
                       " AND (revoked_at IS NOT NULL OR expires_at <= ?)",
                       (token.owner, token.project, token.name, time.time()))
            db.execute(
                "INSERT INTO tokens (owner, project, name, digest, created_at, expires_at, revoked_at, rate, burst)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token.owner, token.project, token.name, token.digest, token.created_at, token.expires_at,
                 token.revoked_at, token.rate.per_s if token.rate else None, token.rate.burst if token.rate else None),
            )

    def revoke_token(self, owner: str, project: str, name: str, when: float) -> bool:
        """Mark an active token revoked; False when there is no such token or it was revoked already."""
        with self._tx() as db:
            done = db.execute("UPDATE tokens SET revoked_at = ? WHERE owner = ? AND project = ? AND name = ?"
                              " AND revoked_at IS NULL", (when, owner, project, name))
        return done.rowcount > 0

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

    # cluster targets ---------------------------------------------------------------------------

    def clusters(self) -> list[ClusterTarget]:
        rows = self._conn.execute("SELECT name, kubeconfig, context, registry, namespace, url, ingress_class, created_at"
                                  " FROM clusters ORDER BY name").fetchall()
        return [ClusterTarget(*row) for row in rows]

    def cluster(self, name: str) -> ClusterTarget | None:
        return next((c for c in self.clusters() if c.name == name), None)

    def add_cluster(self, target: ClusterTarget) -> None:
        """Record a target; one of the same name is replaced."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO clusters (name, kubeconfig, context, registry, namespace, url,"
                       " ingress_class, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (target.name, target.kubeconfig, target.context, target.registry, target.namespace, target.url,
                        target.ingress_class, target.created_at))

    def remove_cluster(self, name: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM clusters WHERE name = ?", (name,)).rowcount > 0
