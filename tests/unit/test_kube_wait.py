"""How long a cluster command waits for new pods: passing states are waited out, hopeless ones end it."""

from __future__ import annotations

import time

import pytest

from mlserve.kube import deploy
from mlserve.kube.api import ClusterError
from mlserve.kube.deploy import ClusterDeployer, LiveJob
from mlserve.kube.render import ClusterJob, ProjectRef
from mlserve.kube.target import ClusterTarget

REF = ProjectRef("alice", "hello")
JOB = ClusterJob("a" * 22, 1, 1)


def _deployer(states: list[str]) -> ClusterDeployer:
    """A deployer whose cluster reports ``states`` for the job, one per look (the last one stays)."""
    kube = ClusterDeployer.__new__(ClusterDeployer)
    kube.target = ClusterTarget("prod", "/k", None, "r/ml", "models", "http://m")
    looks = iter(states)
    last = [states[0]]

    def jobs(ref=None):
        last[0] = next(looks, last[0])
        return [LiveJob(REF, JOB, last[0] == "ready", last[0], 0, "", "pod-1")]

    kube.jobs = jobs  # type: ignore[method-assign]
    kube._problem = lambda live: f"{live.name}: {live.state}"  # type: ignore[method-assign]
    return kube


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(deploy, "POLL_S", 0.01)
    monkeypatch.setattr(deploy, "LASTING_S", 0.3)


def test_a_passing_state_is_waited_out():
    kube = _deployer(["starting", "CreateContainerConfigError: failed to sync secret cache"] * 3 + ["ready"])
    kube.wait_ready(REF, [JOB], timeout_s=5)


def test_a_lasting_state_ends_the_wait_with_what_the_cluster_says():
    kube = _deployer(["ErrImagePull: pull access denied"])
    started = time.monotonic()
    with pytest.raises(ClusterError, match="cannot start") as caught:
        kube.wait_ready(REF, [JOB], timeout_s=30)
    assert 0.3 <= time.monotonic() - started < 5
    assert "pull access denied" in str(caught.value.hint)


def test_a_crash_loop_ends_it_at_once():
    kube = _deployer(["CrashLoopBackOff: back-off 10s restarting failed container"])
    started = time.monotonic()
    with pytest.raises(ClusterError, match="cannot start"):
        kube.wait_ready(REF, [JOB], timeout_s=30)
    assert time.monotonic() - started < 0.3


def test_time_running_out():
    kube = _deployer(["Unschedulable: 0/3 nodes are available"])
    with pytest.raises(ClusterError, match="not ready after 0.2 s"):
        kube.wait_ready(REF, [JOB], timeout_s=0.2)
