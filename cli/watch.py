"""The health state machine of one job: what the supervisor remembers between checks and decides.

Pure: it is told what a probe or the runtime found and answers join, leave, restart or fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import HealthPolicy
from .constants import HEALTHY_SPELL_S, MAX_RESTART_STREAK, RESTART_AFTER_FAILURES


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

    def due(self, now: float, policy: HealthPolicy) -> bool:
        """Whether a check is due; if so, the next one is scheduled."""
        if now < self.next_check:
            return False
        self.next_check = now + policy.interval_s
        return True

    def checked(self, ok: bool, detail: str, now: float, in_rotation: bool, policy: HealthPolicy) -> Decision | None:
        """A probe's result: join after a pass, leave after ``policy.failures``, restart after more."""
        if ok:
            self.failures = 0
            self.healthy_since = self.healthy_since or now
            if now - self.healthy_since >= HEALTHY_SPELL_S:
                self.streak = 0
            return None if in_rotation else Decision("join")
        self.failures += 1
        self.healthy_since = None
        reason = f"health check failed {self.failures}x: {detail}"
        if self.failures >= RESTART_AFTER_FAILURES:
            return self.dead(reason, now)
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
        self.not_before = now + min(2 ** self.streak, 60)
        self.next_check = now + 1
