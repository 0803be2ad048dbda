"""The stored job spec: versioned, upgraded from version 1 rows, refused when newer."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mlserve.config import HealthPolicy, Limits
from mlserve.errors import StateError
from mlserve.home import Home
from mlserve.spec import SPEC_VERSION, Artifact, DataMount, JobSpec
from mlserve.state import MIGRATIONS, StateStore

V1_SETTINGS = {
    "runtime": "docker", "image": "mlserve/a-p:1", "venv": None, "project_dir": "/p", "workers": 2,
    "preload": False, "env_vars": {"A": "1"}, "data": [{"source": "/d", "mount": "/input"}],
    "limits": {"memory": "1g", "cpus": 1}, "health": {"path": "/h", "interval": "soon"},
    "options": {"k": [1, 2]}, "max_runtime_s": 600, "body_limit_mb": 100, "timeout_s": 60,
}


def test_spec_round_trips_through_json():
    spec = JobSpec(runtime="local", artifact=Artifact("/snap", "/venv"), project_dir="/p", workers=3,
                   env_vars=(("A", "1"),), mounts=(DataMount("/d", "/input"),), limits=Limits(cpus=0.5),
                   health=HealthPolicy(path="/h"), options={"x": {"y": 1}}, max_runtime_s=0)
    stored = json.loads(spec.to_json())
    assert stored["version"] == SPEC_VERSION
    assert JobSpec.from_json(spec.to_json()) == spec


def test_a_spec_from_a_newer_mlserve_is_refused():
    text = json.dumps({**json.loads(JobSpec("docker", Artifact("i"), "/p").to_json()), "version": SPEC_VERSION + 1})
    with pytest.raises(StateError, match="version"):
        JobSpec.from_json(text)


def _v1_database(tmp_path, settings: dict) -> Home:
    home = Home(tmp_path)
    db = sqlite3.connect(str(home.db))
    for statement in MIGRATIONS[0].split(";"):  # type: ignore[union-attr]
        if statement.strip():
            db.execute(statement)
    db.execute(
        "INSERT INTO jobs (id, owner, project, number, runtime, image, state, healthy, handle, settings, created_at)"
        " VALUES ('a', 'alice', 'p', 1, 'docker', 'mlserve/a-p:1', 'running', 1, 'c1', ?, 1.0)",
        (json.dumps(settings),),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    return home


def test_version_1_rows_are_upgraded_and_bad_values_defaulted_with_a_note(tmp_path):
    store = StateStore(_v1_database(tmp_path, V1_SETTINGS))
    assert store.schema_version == len(MIGRATIONS)
    job = store.get_job("a")
    assert job is not None
    spec = job.spec
    assert spec.artifact == Artifact("mlserve/a-p:1") and spec.mounts == (DataMount("/d", "/input"),)
    assert spec.limits == Limits(memory_bytes=1 << 30, cpus=1.0)
    assert spec.health == HealthPolicy(path="/h")  # the interval was "soon": the default, noted
    assert spec.env_vars == (("A", "1"),) and spec.options == {"k": [1, 2]} and spec.max_runtime_s == 600
    assert job.reason is not None and "health.interval='soon' was invalid" in job.reason


def test_a_database_from_a_newer_mlserve_is_refused_and_left_alone(tmp_path):
    home = Home(tmp_path)
    StateStore(home).close()
    db = sqlite3.connect(str(home.db))
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer mlserve"):
        StateStore(home)
    db = sqlite3.connect(str(home.db))
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
