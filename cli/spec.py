"""The job spec: everything needed to start an identical serving instance, typed and versioned.

It is stored as JSON with the job's row; ``SPEC_VERSION`` goes up whenever its form changes, a
migration in ``state`` upgrades stored rows, and a spec from a newer mlserve is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .config import HEALTH_KEYS, LIMIT_KEYS, HealthPolicy, Limits, ValueProblem, max_runtime_s, whole
from .constants import DEFAULT_BODY_LIMIT_MB, DEFAULT_MAX_RUNTIME_S, DEFAULT_TIMEOUT_S, DEFAULT_WORKERS
from .errors import StateError

SPEC_VERSION = 2


@dataclass(frozen=True)
class DataMount:
    """A host folder or file, mounted read-only where the instance sees it."""

    source: str
    mount: str


@dataclass(frozen=True)
class Artifact:
    """What a runtime built: an image tag (docker) or an app snapshot folder and its venv (local)."""

    ref: str
    venv: str | None = None


@dataclass(frozen=True)
class JobSpec:
    runtime: str
    artifact: Artifact
    project_dir: str
    workers: int = DEFAULT_WORKERS
    preload: bool = False
    env_vars: tuple[tuple[str, str], ...] = ()
    mounts: tuple[DataMount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    options: Mapping[str, Any] = field(default_factory=dict)
    max_runtime_s: int = DEFAULT_MAX_RUNTIME_S
    # The gateway's settings when the job started: uWSGI is given the same limit and timeout.
    body_limit_mb: int = DEFAULT_BODY_LIMIT_MB
    timeout_s: int = DEFAULT_TIMEOUT_S
    network: str = "isolated"  # config.NETWORKS; specs stored before it had none get the isolated default

    def with_gateway(self, body_limit_mb: int, timeout_s: int) -> JobSpec:
        return replace(self, body_limit_mb=body_limit_mb, timeout_s=timeout_s)

    def to_json(self) -> str:
        return json.dumps({"version": SPEC_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Read a stored spec. Raises StateError when it comes from a newer mlserve or is damaged."""
        try:
            data = json.loads(text)
            version = data.pop("version", 1)
        except (ValueError, AttributeError) as exc:
            raise StateError(f"a stored job spec is not JSON: {exc}") from None
        if version != SPEC_VERSION:
            raise StateError(f"a stored job spec has version {version}; this mlserve reads version {SPEC_VERSION}",
                             "It was written by another mlserve version: use that one, or upgrade.")
        try:
            return cls(
                **{**data,
                   "artifact": Artifact(**data["artifact"]),
                   "env_vars": tuple((str(k), str(v)) for k, v in data["env_vars"]),
                   "mounts": tuple(DataMount(**m) for m in data["mounts"]),
                   "limits": Limits(**data["limits"]),
                   "health": HealthPolicy(**data["health"])}
            )
        except (KeyError, TypeError) as exc:
            raise StateError(f"a stored job spec is damaged: {exc}") from None


# -- upgrading specs stored by older mlserve --------------------------------------------------


def _lenient(value: object, check: Callable[[object], Any], default: Any, notes: list[str], key: str) -> Any:
    """An old row was stored before values were checked: keep what is valid, default the rest (noted)."""
    if value is None:
        return default
    try:
        return check(value)
    except ValueProblem:
        notes.append(f"{key}={value!r} was invalid; using {default!r}")
        return default


def _lenient_part(raw: object, keys: dict[str, tuple[str, Callable[[object], Any]]], default: Any,
                  notes: list[str], section: str) -> Any:
    checked = {}
    for name, value in (raw if isinstance(raw, dict) else {}).items():
        if name in keys:
            attribute, check = keys[name]
            checked[attribute] = _lenient(value, check, getattr(default, attribute), notes, f"{section}.{name}")
    return replace(default, **checked)


def upgrade_v1(settings: dict[str, Any]) -> tuple[str, list[str]]:
    """A version-1 settings dict (unchecked values) as a version-2 spec JSON, and notes on what was replaced."""
    notes: list[str] = []
    spec = JobSpec(
        runtime=str(settings.get("runtime") or "docker"),
        artifact=Artifact(str(settings.get("image") or ""), settings.get("venv")),
        project_dir=str(settings.get("project_dir") or ""),
        workers=_lenient(settings.get("workers"), whole(1, 64), DEFAULT_WORKERS, notes, "workers"),
        preload=bool(settings.get("preload")),
        env_vars=tuple(sorted((str(k), str(v)) for k, v in (settings.get("env_vars") or {}).items())),
        mounts=tuple(DataMount(str(d["source"]), str(d["mount"])) for d in settings.get("data") or ()),
        limits=_lenient_part(settings.get("limits"), LIMIT_KEYS, Limits(), notes, "limits"),
        health=_lenient_part(settings.get("health"), HEALTH_KEYS, HealthPolicy(), notes, "health"),
        options=dict(settings.get("options") or {}),
        max_runtime_s=_lenient(settings.get("max_runtime_s"), max_runtime_s, DEFAULT_MAX_RUNTIME_S, notes,
                               "max_runtime"),
        body_limit_mb=_lenient(settings.get("body_limit_mb"), whole(1), DEFAULT_BODY_LIMIT_MB, notes, "body_limit_mb"),
        timeout_s=_lenient(settings.get("timeout_s"), whole(1), DEFAULT_TIMEOUT_S, notes, "timeout_s"),
    )
    return spec.to_json(), notes

