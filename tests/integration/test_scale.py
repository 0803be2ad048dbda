"""Scaling a project wide and back: instances start and stop in parallel, and `scale` says when the
machine's cores are oversubscribed. Timings are the benchmarks' (bench/), not asserted here."""

from __future__ import annotations

import os

import pytest
import requests

from tests.harness import labelled_containers

pytestmark = pytest.mark.integration


def test_scale_out_warns_about_cores_and_back_in_stops_all(mlserve, project, docker_client):
    mlserve("run", "--mode", "serve", cwd=project)
    wide = 8 * (os.cpu_count() or 1) // 2 + 1  # 2 workers each: just past 8 worker processes per core
    out = mlserve("scale", str(wide), cwd=project)
    assert f"{wide} serving job(s)" in out.stdout
    assert "Notice:" in out.stdout and "cores" in out.stdout
    jobs = mlserve.json("status")
    assert len(jobs) == wide and all(j["healthy"] for j in jobs)
    for job in jobs:
        assert requests.get(job["endpoint"], timeout=10).status_code == 200
    narrow = mlserve("scale", "1", cwd=project)
    assert "Notice:" not in narrow.stdout
    assert len(mlserve.json("status")) == 1
    assert len(labelled_containers(docker_client, mlserve.home)) == 1
