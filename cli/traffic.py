"""How a project's endpoint splits its traffic between versions: pure rules, no I/O.

Until the user sets shares, every healthy job of a primary version takes an equal turn (FloydHub's
round robin). Shares (``traffic --to 3=90 --to 4=10``, ``run --canary 10``) split by version instead.
Either way a version without a healthy job takes nothing and its share goes to the others (and when
no version with a share has one, the healthy jobs of the others take equal turns); fallback versions
take traffic only when no primary version has a healthy job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import UsageError

SHARE_RE = re.compile(r"([0-9]{1,6})=([0-9]{1,3})")


@dataclass(frozen=True)
class Traffic:
    shares: Mapping[int, int] | None = None  # version -> percent (they sum to 100); None: equal turns per job
    sticky: bool = False  # a cookie keeps a browser on the version it first got

    @property
    def by_jobs(self) -> bool:
        return self.shares is None


def weights(traffic: Traffic, ready: Mapping[int, int]) -> dict[int, int]:
    """Who takes the project endpoint's traffic now: primary version -> weight, given how many ready
    jobs each primary version has. Versions at 0% take traffic only when no version with a share has
    a ready job. Empty when no primary version has one (the fallback's turn)."""
    by_jobs = {version: count for version, count in sorted(ready.items()) if count > 0}
    if traffic.shares is None:
        return by_jobs
    shared = {version: share for version, share in sorted(traffic.shares.items()) if share > 0 and ready.get(version, 0) > 0}
    # No version with a share can answer: healthy jobs of the others do, before any fallback.
    return shared or by_jobs


def percents(weights_: Mapping[int, int]) -> dict[int, float]:
    total = sum(weights_.values())
    return {version: round(100 * weight / total, 1) for version, weight in weights_.items()} if total else {}


def parse_shares(values: Iterable[str], known: Iterable[int]) -> dict[int, int]:
    """``--to N=P`` values as {version: percent}: known versions, whole percents that sum to 100."""
    known = set(known)
    shares: dict[int, int] = {}
    for value in values:
        match = SHARE_RE.fullmatch(value.strip())
        if not match:
            raise UsageError(f"--to {value!r} is not VERSION=PERCENT", "e.g. `--to 3=90 --to 4=10`.")
        version, percent = int(match[1]), int(match[2])
        if version not in known:
            raise UsageError(f"--to {value}: the project has no version {version}",
                             f"Its versions: {', '.join(map(str, sorted(known))) or 'none'} (`mlserve versions`).")
        if version in shares:
            raise UsageError(f"--to names version {version} twice")
        if percent > 100:
            raise UsageError(f"--to {value}: a share is a percent from 0 to 100")
        shares[version] = percent
    if sum(shares.values()) != 100:
        raise UsageError(f"the shares add up to {sum(shares.values())}%, not 100%",
                         "Give every version that should take traffic its percent, e.g. `--to 3=90 --to 4=10`.")
    return shares


def changed_shares(shares: Mapping[int, int] | None, versions: Mapping[int, bool], to: tuple[str, ...],
                   to_latest: bool, by_jobs: bool, project_key: str) -> Mapping[int, int] | None:
    """The shares after `traffic --to ...`, `--to-latest` or `--by-jobs` (else ``shares`` unchanged).
    ``versions``: the project's versions, each with whether it is a fallback (never given a share)."""
    if sum(map(bool, (to, to_latest, by_jobs))) > 1:
        raise UsageError("give one of --to, --to-latest and --by-jobs")
    if to:
        shares = {v: p for v, p in parse_shares(to, versions).items() if p > 0}
        for number in shares:
            if versions[number]:
                raise UsageError(f"version {number} is the project's fallback: it takes traffic only when no "
                                 "primary version has a healthy job, never a share")
    elif to_latest:
        primaries = [n for n, fallback in versions.items() if not fallback]
        if not primaries:
            raise UsageError(f"{project_key} has only fallback versions")
        shares = {max(primaries): 100}
    elif by_jobs:
        shares = None
    return shares


def apportion(total: int, weights_: Mapping[int, float]) -> dict[int, int]:
    """``total`` percent in whole numbers, in proportion to ``weights_`` (largest remainders get the rest)."""
    whole = sum(weights_.values())
    if not whole:
        return {}
    exact = {version: total * weight / whole for version, weight in weights_.items()}
    shares = {version: int(value) for version, value in exact.items()}
    by_remainder = sorted(exact, key=lambda v: (exact[v] - shares[v], v), reverse=True)
    for version in by_remainder[: total - sum(shares.values())]:
        shares[version] += 1
    return shares


def with_canary(traffic: Traffic, active: Mapping[int, int], new: int, percent: int) -> Traffic:
    """The split after a canary: ``new`` takes ``percent``; the serving versions keep their proportions
    of the rest (their shares, or their number of jobs when the project gave equal turns per job).
    ``active``: primary versions with their active jobs; a share of a version without one is dropped."""
    others: Mapping[int, float] = {v: p for v, p in (traffic.shares or {}).items() if p > 0 and active.get(v)}
    if not others:  # equal turns per job, or a split whose versions have no job left: by jobs
        others = {v: n for v, n in active.items() if n > 0}
    shares = {v: p for v, p in apportion(100 - percent, others).items() if p > 0}
    shares[new] = percent
    return Traffic(shares, traffic.sticky)


def most_traffic(traffic: Traffic, active: Mapping[int, int]) -> int | None:
    """The primary version that takes the most traffic (the newest on a tie): what `scale` copies.
    ``active``: primary versions with their active jobs."""
    if traffic.shares is not None:
        shared = {v: p for v, p in traffic.shares.items() if p > 0 and v in active}
        if shared:
            return max(shared, key=lambda v: (shared[v], v))
    serving = {v: n for v, n in active.items() if n > 0}
    return max(serving, key=lambda v: (serving[v], v)) if serving else None
