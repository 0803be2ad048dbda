"""The reconcile plan, the health state machine and the supervisor's isolation of one bad job."""

from __future__ import annotations

import time

import pytest

from mlserve import supervisor as supervisor_module
from mlserve.actors import actor_alive, this_actor
from mlserve.config import HealthPolicy
from mlserve.constants import MAX_RESTART_STREAK, RESTART_AFTER_FAILURES
from mlserve.health import Liveness, ProbeResult
from mlserve.home import Home
from mlserve.platform import Platform
from mlserve.reconcile import Observation, Plan, plan
from mlserve.routing import STOPPED_BY_USER
from mlserve.runtimes import InstanceState
from mlserve.spec import Artifact, JobSpec
from mlserve.state import Job
from mlserve.watch import Decision, Watch

NOW = 1_000_000.0


def _job(n: int, state: str = "running", runtime: str = "docker", actor: str | None = None, healthy: bool = True,
         started_at: float | None = NOW - 10, max_runtime_s: int = 3600) -> Job:
    spec = JobSpec(runtime=runtime, artifact=Artifact("img"), project_dir="/p", max_runtime_s=max_runtime_s)
    return Job(id=f"job{n}".ljust(22, "x"), owner="o", project="p", number=n, state=state, healthy=healthy,
               handle=f"h{n}", spec=spec, started_at=started_at, actor=actor)


def _running(job: Job) -> InstanceState:
    return InstanceState(job.id, job.handle or "", True, "running", runtime=job.runtime)


def _plan(jobs: list[Job], instances: list[InstanceState], unreachable: dict[str, str] | None = None,
          alive: set[str] = frozenset()) -> Plan:  # type: ignore[assignment]
    seen = Observation(jobs, {i.job_id: i for i in instances}, unreachable or {}, NOW)
    return plan(seen, alive=lambda actor: actor in alive)


def test_a_job_in_sync_needs_nothing():
    job = _job(1)
    assert _plan([job], [_running(job)]).empty


def test_a_start_whose_command_died_is_discarded_and_a_live_one_left_alone():
    dead, live = _job(1, "starting", actor="1:1"), _job(2, "starting", actor="2:2")
    result = _plan([dead, live], [_running(dead), _running(live)], alive={"2:2"})
    assert result.discard == [dead] and not result.restart and not result.orphans


def test_a_stop_whose_command_died_is_finished():
    dead, live = _job(1, "stopping", actor="1:1"), _job(2, "stopping", actor="2:2")
    assert _plan([dead, live], [], alive={"2:2"}).finish_stop == [dead]


def test_a_dead_instance_is_restarted_and_routed_out_if_it_was_in():
    healthy, sick = _job(1), _job(2, healthy=False)
    dead = InstanceState(healthy.id, "h1", False, "exited (137)")
    result = _plan([healthy, sick], [dead])
    assert [(j.id, why) for j, why in result.restart] == [(healthy.id, "instance exited (137)"),
                                                          (sick.id, "instance gone (none found)")]
    assert result.reroute == [healthy]


def test_instances_no_active_job_claims_are_orphans():
    job = _job(1)
    stray = InstanceState("z" * 22, "c9", True, "running", runtime="docker")
    assert _plan([job], [_running(job), stray]).orphans == [stray]


def test_an_unreachable_runtime_is_left_alone():
    job = _job(1, "starting", actor="1:1")
    assert _plan([job, _job(2)], [], unreachable={"docker": "engine down"}).empty


def test_a_job_past_its_maximum_runtime_expires():
    old = _job(1, started_at=NOW - 7200)
    unlimited = _job(2, started_at=NOW - 10**6, max_runtime_s=0)
    result = _plan([old, unlimited], [_running(old), _running(unlimited)])
    assert result.expire == [old] and not result.restart


def test_actors_survive_pid_reuse():
    me = this_actor()
    pid, _, ticks = me.partition(":")
    assert actor_alive(me)
    assert not actor_alive(f"{pid}:{int(ticks) + 1}")  # the same pid, started at another time
    assert not actor_alive(None) and not actor_alive("garbage")


# -- the health state machine --------------------------------------------------------------------


def test_watch_joins_on_a_pass_and_leaves_after_the_policy_failures():
    watch, policy = Watch(), HealthPolicy(failures=2)
    assert watch.checked(True, "", NOW, in_rotation=False, policy=policy) == Decision("join")
    assert watch.checked(True, "", NOW, in_rotation=True, policy=policy) is None
    assert watch.checked(False, "boom", NOW, in_rotation=True, policy=policy) is None
    assert watch.checked(False, "boom", NOW, in_rotation=True, policy=policy) == Decision(
        "leave", "health check failed 2x: boom")


def test_watch_restarts_with_backoff_and_fails_after_a_streak():
    watch, policy = Watch(), HealthPolicy()
    decision = None
    for _ in range(RESTART_AFTER_FAILURES):
        decision = watch.checked(False, "x", NOW, in_rotation=False, policy=policy)
    assert decision is not None and decision.action == "restart"
    watch.restarted(NOW)
    assert watch.dead("gone", NOW + 1) is None  # backoff
    assert watch.dead("gone", NOW + 3) == Decision("restart", "gone")
    watch.streak = MAX_RESTART_STREAK
    assert watch.dead("gone", NOW + 100).action == "fail"  # type: ignore[union-attr]


BUSY = Liveness(alive=True, busy=True, detail="2 of 2 workers busy, the longest request for 12s")
IDLE = Liveness(alive=True, busy=False, detail="1 of 2 workers idle")
GONE = Liveness(alive=False, busy=False, detail="the uWSGI master does not answer (ConnectionRefusedError)")


def test_watch_a_busy_job_counts_no_failure_keeps_its_place_and_is_never_restarted():
    watch, policy = Watch(), HealthPolicy(failures=2)
    decisions = [watch.checked(False, "timed out", NOW + 2 * i, in_rotation=True, policy=policy, life=BUSY)
                 for i in range(RESTART_AFTER_FAILURES * 10)]
    assert decisions == [None] * len(decisions)  # no leave, no restart, ever
    assert watch.failures == 0 and watch.busy_since == NOW
    assert watch.checked(True, "", NOW + 200, in_rotation=True, policy=policy, life=IDLE) is None
    assert watch.busy_since is None


def test_watch_a_master_that_is_gone_is_restarted_even_after_a_busy_spell():
    watch, policy = Watch(), HealthPolicy(failures=2)
    for i in range(5):
        assert watch.checked(False, "timed out", NOW + i, in_rotation=True, policy=policy, life=BUSY) is None
    decisions = [watch.checked(False, "ConnectionRefusedError", NOW + 10 + i, in_rotation=True, policy=policy,
                               life=GONE) for i in range(RESTART_AFTER_FAILURES)]
    assert decisions[0] is None
    assert decisions[1] == Decision("leave", "health check failed 2x: ConnectionRefusedError; " + GONE.detail)
    last = decisions[-1]
    assert last is not None and last.action == "restart" and "does not answer" in (last.reason or "")
    # And when the runtime says the instance is gone, it is restarted without waiting for checks.
    fresh = Watch()
    fresh.checked(False, "timed out", NOW, in_rotation=True, policy=policy, life=BUSY)
    assert fresh.dead("instance exited (137), out of memory", NOW) == Decision(
        "restart", "instance exited (137), out of memory")


def test_watch_a_probe_failure_with_idle_workers_counts_as_before():
    watch, policy = Watch(), HealthPolicy(failures=2)
    decisions = [watch.checked(False, "503", NOW + i, in_rotation=True, policy=policy, life=IDLE)
                 for i in range(RESTART_AFTER_FAILURES)]
    assert decisions[0] is None
    assert decisions[1] == Decision("leave", "health check failed 2x: 503; 1 of 2 workers idle")
    assert decisions[2] is not None and decisions[2].action == "leave"
    assert decisions[-1] == Decision("restart", f"health check failed {RESTART_AFTER_FAILURES}x: 503; 1 of 2 workers idle")


def test_watch_a_busy_check_between_failures_neither_passes_nor_fails():
    watch, policy = Watch(), HealthPolicy(failures=2)
    assert watch.checked(False, "503", NOW, in_rotation=True, policy=policy, life=IDLE) is None
    assert watch.checked(False, "not probed", NOW + 2, in_rotation=True, policy=policy, life=BUSY) is None
    assert watch.checked(False, "503", NOW + 4, in_rotation=True, policy=policy, life=IDLE) == Decision(
        "leave", "health check failed 2x: 503; 1 of 2 workers idle")


def test_watch_leaves_the_rotation_while_a_restart_waits_for_its_backoff():
    watch, policy = Watch(), HealthPolicy(failures=2)
    watch.restarted(NOW)  # backoff until NOW + 2
    for i in range(RESTART_AFTER_FAILURES - 1):
        watch.checked(False, "x", NOW + 0.1 * i, in_rotation=False, policy=policy, life=IDLE)
    assert watch.checked(False, "x", NOW + 1, in_rotation=True, policy=policy, life=IDLE) == Decision(
        "leave", f"health check failed {RESTART_AFTER_FAILURES}x: x; 1 of 2 workers idle")


# -- the supervisor: one bad job never stops the round for the others ---------------------------------


def test_a_job_whose_check_raises_does_not_stop_the_others(tmp_path, monkeypatch):
    platform = Platform(Home(tmp_path), report=lambda _: None)
    platform.state.set_setting(STOPPED_BY_USER, "1")  # no gateway in this unit test
    bad, good = _job(1, healthy=False, runtime="local"), _job(2, healthy=False, runtime="local")
    for job in (bad, good):
        platform.state.add_job(job)
    sup = supervisor_module.Supervisor(platform)
    seen = Observation([bad, good], {j.id: _running(j) for j in (bad, good)}, {}, time.time())
    monkeypatch.setattr(sup.reconciler, "converge", lambda problems: (seen, Plan()))
    monkeypatch.setattr(sup.platform.gateway, "cap_logs", lambda max_bytes: [])

    def probe(socket: str, timeout: float) -> ProbeResult:
        if bad.id in socket:
            raise RuntimeError("a stored value this code cannot use")
        return ProbeResult(True, 200, "ok")

    monkeypatch.setattr(supervisor_module, "probe", probe)
    problems = sup.tick()
    assert problems == [f"{bad.name}: RuntimeError: a stored value this code cannot use"]
    assert platform.state.get_job(good.id).healthy is True  # type: ignore[union-attr]
    assert platform.state.get_job(bad.id).healthy is False  # type: ignore[union-attr]


@pytest.mark.parametrize("problems", [[], ["p: boom"]])
def test_the_heartbeat_carries_the_rounds_problems(tmp_path, problems):
    from mlserve import daemons

    home = Home(tmp_path)
    home.gateway_dir.mkdir()
    daemons.beat(home, problems)
    beat = daemons.heartbeat(home)
    assert beat is not None and beat.problems == problems and beat.age_s < 5
