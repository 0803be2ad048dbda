"""The state store: schema versioning, job numbers, and serialised concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

from mlserve.home import Home
from mlserve.spec import Artifact, JobSpec
from mlserve.state import MIGRATIONS, Job, StateStore


def _job(job_id: str, number: int, state: str = "running") -> Job:
    spec = JobSpec(runtime="docker", artifact=Artifact("img:1"), project_dir="/p", workers=2)
    return Job(id=job_id, owner="alice", project="p", number=number, state=state, healthy=True, handle="c1", spec=spec)


def test_fresh_database_is_at_the_latest_schema(tmp_path):
    store = StateStore(Home(tmp_path))
    assert store.schema_version == len(MIGRATIONS)
    reopened = StateStore(Home(tmp_path))
    assert reopened.schema_version == len(MIGRATIONS)


def test_jobs_round_trip_and_filters(tmp_path):
    store = StateStore(Home(tmp_path))
    store.add_job(_job("a" * 22, 1))
    store.add_job(_job("b" * 22, 2, state="stopped"))
    store.update_job("a" * 22, healthy=False, reason="probe failed")
    job = store.get_job("a" * 22)
    assert job is not None and job.healthy is False and job.reason == "probe failed"
    assert job.spec.workers == 2 and job.spec.artifact.ref == "img:1" and job.name == "alice/projects/p/1"
    assert [j.number for j in store.jobs()] == [1, 2]
    assert [j.number for j in store.jobs(active_only=True)] == [1]
    assert store.jobs(project="other") == []


def test_job_numbers_are_never_reused(tmp_path):
    store = StateStore(Home(tmp_path))
    assert [store.next_number("alice", "p") for _ in range(3)] == [1, 2, 3]
    assert store.next_number("alice", "q") == 1
    store.delete_job("nothing")
    assert store.next_number("alice", "p") == 4


def test_a_duplicate_number_is_refused(tmp_path):
    store = StateStore(Home(tmp_path))
    store.add_job(_job("a" * 22, 1))
    try:
        store.add_job(_job("c" * 22, 1))
    except sqlite3.IntegrityError:
        return
    raise AssertionError("a second job 1 of one project was accepted")


def _reserve(root: str, count: int, queue) -> None:
    store = StateStore(Home(__import__("pathlib").Path(root)))
    queue.put([store.next_number("alice", "p") for _ in range(count)])


def test_concurrent_processes_never_double_assign(tmp_path):
    StateStore(Home(tmp_path))
    queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_reserve, args=(str(tmp_path), 25, queue)) for _ in range(4)]
    for w in workers:
        w.start()
    numbers = sum((queue.get(timeout=60) for _ in workers), [])
    for w in workers:
        w.join()
    assert sorted(numbers) == list(range(1, 101))


def test_settings(tmp_path):
    store = StateStore(Home(tmp_path))
    assert store.get_setting("gateway.port", "8000") == "8000"
    store.set_setting("gateway.port", "8123")
    store.set_setting("gateway.port", "8124")
    assert store.get_setting("gateway.port") == "8124"


def test_the_home_is_private(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setenv("MLSERVE_HOME", str(tmp_path / "home"))
    home = Home.from_env()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    os.chmod(home.root, 0o755)
    Home.from_env()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
