"""The state store: schema versioning, job numbers, and serialised concurrent writers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3

from mlserve.home import Home
from mlserve.spec import Artifact, JobSpec
from mlserve.state import MIGRATIONS, Job, StateStore
from mlserve.traffic import Traffic


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
    monkeypatch.setattr("mlserve.home.gateway_group", lambda: None)  # with the gateway's: test_privileges.py
    home = Home.from_env()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    os.chmod(home.root, 0o755)
    Home.from_env()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700


def _spec(image: str) -> JobSpec:
    return JobSpec(runtime="docker", artifact=Artifact(image), project_dir="/p")


def test_versions_are_numbered_per_project(tmp_path):
    store = StateStore(Home(tmp_path))
    assert [store.add_version("alice", "p", _spec(f"img:{n}")).number for n in range(3)] == [1, 2, 3]
    assert store.add_version("alice", "q", _spec("img:q"), fallback=True).number == 1
    store.delete_version("alice", "p", 3)
    assert [(v.number, v.spec.artifact.ref, v.fallback) for v in store.versions("alice", "p")] == [
        (1, "img:0", False), (2, "img:1", False)]
    assert [v.project_key for v in store.versions()] == ["alice/projects/p"] * 2 + ["alice/projects/q"]
    assert store.add_version("alice", "p", _spec("img:4")).number == 4  # 3 is never reused
    assert store.next_number("alice", "p") == 1  # job numbers count on their own


def test_traffic_round_trip(tmp_path):
    store = StateStore(Home(tmp_path))
    assert store.traffic("alice", "p") == Traffic()
    store.set_traffic("alice", "p", Traffic({12: 90, 3: 10}, sticky=True))
    assert store.traffic("alice", "p") == Traffic({3: 10, 12: 90}, sticky=True)
    store.set_traffic("alice", "p", Traffic(None, sticky=True))
    assert store.traffic("alice", "p") == Traffic(None, sticky=True)
    assert store.traffic("alice", "other") == Traffic()


def test_images_of_the_newest_versions_and_of_active_jobs_are_kept(tmp_path):
    store = StateStore(Home(tmp_path))
    for n in range(1, 6):
        store.add_version("alice", "p", _spec(f"img:{n}"))
    store.add_job(_job("a" * 22, 1))  # runs img:1
    assert store.artifacts_in_use(keep_versions=2) == {"img:1", "img:4", "img:5"}
    assert store.artifacts_in_use() == {"img:1"}


def test_jobs_from_before_versions_are_grouped_into_versions_by_image(tmp_path):
    home = Home(tmp_path)
    db = sqlite3.connect(str(home.db))
    for step in MIGRATIONS[:2]:
        for statement in step.split(";"):  # type: ignore[union-attr]
            if statement.strip():
                db.execute(statement)
    spec = _spec("img:a").to_json()
    for number, image, created in ((1, "img:a", 1.0), (2, "img:b", 2.0), (3, "img:a", 3.0)):
        db.execute("INSERT INTO jobs (id, owner, project, number, runtime, image, state, settings, spec_version,"
                   " created_at) VALUES (?, 'alice', 'p', ?, 'docker', ?, 'running', ?, 2, ?)",
                   (f"j{number}", number, image, spec, created))
    db.execute("PRAGMA user_version = 3")  # schema 2 plus its spec upgrade step
    db.commit()
    db.close()
    store = StateStore(home)
    assert [(j.number, j.version) for j in store.jobs()] == [(1, 1), (2, 2), (3, 1)]
    assert [v.number for v in store.versions("alice", "p")] == [1, 2]
    assert store.add_version("alice", "p", _spec("img:c")).number == 3


def test_versions_without_jobs_are_forgotten_with_their_share(tmp_path):
    store = StateStore(Home(tmp_path))
    serving = store.add_version("alice", "p", _spec("img:1"))
    store.add_job(dataclasses.replace(_job("a" * 22, 1), version=serving.number))
    left = store.add_version("alice", "p", _spec("img:2"))  # its run died before any job was recorded
    store.set_traffic("alice", "p", Traffic({serving.number: 90, left.number: 10}))
    assert [v.number for v in store.forget_versions_without_jobs()] == [left.number]
    assert [v.number for v in store.versions("alice", "p")] == [serving.number]
    assert store.traffic("alice", "p") == Traffic({serving.number: 90})
    assert store.forget_versions_without_jobs() == []
