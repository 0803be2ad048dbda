"""The health state machine of one job: what the supervisor remembers between checks and decides.

Pure: it is told what a check found (the readiness probe, the master's liveness answer) or what
the runtime found, and answers join, leave, restart or fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import HealthPolicy
from .constants import HEALTHY_SPELL_S, MAX_RESTART_STREAK, RESTART_AFTER_FAILURES
from .health import Liveness


@dataclass(frozen=True)
class Decision:
    action: str  # join | leave | restart | fail
    reason: str | None = None


@dataclass
class Watch:
    failures: int = 0  # consecutive failed checks
    streak: int = 0  # restarts since the last healthy spell
    next_check: float = 0.0
    not_before: float = 0.0  # backoff: no restart before this
    healthy_since: float | None = None
    busy_since: float | None = None  # every worker in requests since then: checks neither pass nor fail

    def due(self, now: float, policy: HealthPolicy) -> bool:
        """Whether a check is due; if so, the next one is scheduled."""
        if now < self.next_check:
            return False
        self.next_check = now + policy.interval_s
        return True

    def checked(self, ok: bool, detail: str, now: float, in_rotation: bool, policy: HealthPolicy,
                life: Liveness | None = None) -> Decision | None:
        """One check: the probe's result (``ok``, ``detail``) and the master's answer (``life``, if read).

        A pass joins the rotation. A failure while ``life`` says busy (every worker in a request
        inside the timeout) counts nothing: the probe waited behind clients' requests, and the job
        keeps its place and is never restarted for it. Any other failure counts: ``policy.failures``
        in a row leave the rotation, RESTART_AFTER_FAILURES restart.
        """
        if ok:
            self.failures = 0
            self.busy_since = None
            self.healthy_since = self.healthy_since or now
            if now - self.healthy_since >= HEALTHY_SPELL_S:
                self.streak = 0
            return None if in_rotation else Decision("join")
        if life is not None and life.busy:
            self.busy_since = now if self.busy_since is None else self.busy_since
            return None
        self.busy_since = None
        self.failures += 1
        self.healthy_since = None
        reason = f"health check failed {self.failures}x: {detail}"
        if life is not None:
            reason += f"; {life.detail}"
        if self.failures >= RESTART_AFTER_FAILURES:
            decision = self.dead(reason, now)
            if decision is not None:
                return decision
        if in_rotation and self.failures >= policy.failures:
            return Decision("leave", reason)
        return None

    def dead(self, why: str, now: float) -> Decision | None:
        """The instance is gone or stuck: restart it (with backoff), or give up after too many restarts."""
        if now < self.not_before:
            return None
        if self.streak >= MAX_RESTART_STREAK:
            return Decision("fail", f"restarted {self.streak} times without recovering; last: {why}")
        return Decision("restart", why)

    def restarted(self, now: float) -> None:
        self.streak += 1
        self.failures = 0
        self.busy_since = None
        self.not_before = now + min(2 ** self.streak, 60)
        self.next_check = now + 1
