"""mlserve.yml, typed once at the edge: every value is checked when read, and a wrong one is
refused before any build with the key and the expected form named.

The parts (``Limits``, ``HealthPolicy``) are frozen dataclasses that the job spec stores as
they are; the checks here are the only place a value from a file or a flag becomes a number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .constants import (
    DEFAULT_MAX_RUNTIME_S,
    HEALTH_FAILURES,
    HEALTH_INTERVAL_S,
    HEALTH_TIMEOUT_S,
)
from .errors import ProjectConfigError, UsageError
from .guard import ACCESS, Cors, RateLimit, origin, rate_limit
from .links import link_problem

CONFIG_NAME = "mlserve.yml"
MAX_WORKERS = 64
HEALTH_METHODS = ("GET", "HEAD", "POST", "PUT", "OPTIONS")

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DURATION_FORM = "a duration such as 90, 45s, 500ms, 30m, 12h or 7d"
SIZE_FORM = "a size such as 512m or 2g"


class ValueProblem(ValueError):
    """A value that does not have the expected form; the message says the form."""


# -- values ---------------------------------------------------------------------------------


def duration_s(value: object) -> float:
    """``90``, ``45s``, ``500ms``, ``30m``, ``12h``, ``7d`` as seconds. Raises ValueProblem."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueProblem(DURATION_FORM)
    match = _DURATION_RE.match(str(value).strip().lower())
    if not match:
        raise ValueProblem(DURATION_FORM)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def size_bytes(value: object) -> int:
    """``512m``, ``2g``, ``1.5GiB`` or a number of bytes. Raises ValueProblem."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueProblem(SIZE_FORM)
    match = _SIZE_RE.match(str(value).strip().lower())
    if not match:
        raise ValueProblem(SIZE_FORM)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def positive(check: Callable[[object], float]) -> Callable[[object], float]:
    def checked(value: object) -> float:
        number = check(value)
        if number <= 0:
            raise ValueProblem("a value above zero (a limit cannot be removed by zeroing it)")
        return number

    return checked


def at_least(low: int, text: str) -> Callable[[Callable[[object], int]], Callable[[object], int]]:
    """A size check refusing values under ``low`` (``text`` says it the way users write it)."""
    def wrap(check: Callable[[object], int]) -> Callable[[object], int]:
        def checked(value: object) -> int:
            number = check(value)
            if number < low:
                raise ValueProblem(f"a size of at least {text} (a limit cannot be removed by zeroing it)")
            return number

        return checked

    return wrap


def whole(low: int, high: int | None = None) -> Callable[[object], int]:
    def checked(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ValueProblem(f"a whole number from {low}" + (f" to {high}" if high is not None else " up"))
        return value

    return checked


def number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueProblem("a number")
    return float(value)


def max_runtime_s(value: object) -> int:
    """A maximum runtime: a duration, 0 for none. Raises ValueProblem."""
    seconds = duration_s(value)
    return int(seconds)


# -- the typed parts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one serving instance may use; none of them can be zero or removed."""

    memory_bytes: int = 2 << 30
    cpus: float = 2.0
    pids: int = 512
    tmp_bytes: int = 256 << 20
    output_bytes: int = 1 << 30  # the size of /output, a filesystem of its own (quota.py)


@dataclass(frozen=True)
class HealthPolicy:
    """How the supervisor checks an instance: the app's own path, or "loaded and answering"."""

    path: str | None = None
    method: str = "GET"
    interval_s: float = HEALTH_INTERVAL_S
    timeout_s: float = HEALTH_TIMEOUT_S
    failures: int = HEALTH_FAILURES


def _health_path(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"/[A-Za-z0-9._~/%-]*", value):
        raise ValueProblem("a path starting with / (letters, digits, . _ ~ - / only)")
    return value


def _health_method(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in HEALTH_METHODS:
        raise ValueProblem("one of " + ", ".join(HEALTH_METHODS))
    return value.upper()


# key in the file -> (field name, checker)
LIMIT_KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "memory": ("memory_bytes", lambda v: int(positive(size_bytes)(v))),
    "cpus": ("cpus", positive(number)),
    "pids": ("pids", whole(1)),
    "tmp": ("tmp_bytes", lambda v: int(positive(size_bytes)(v))),
    "output": ("output_bytes", lambda v: at_least(1 << 20, "1m")(size_bytes)(v)),
}
HEALTH_KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "path": ("path", _health_path),
    "method": ("method", _health_method),
    "interval": ("interval_s", positive(duration_s)),
    "timeout": ("timeout_s", positive(duration_s)),
    "failures": ("failures", whole(1, 100)),
}


@dataclass(frozen=True)
class ProjectConfig:
    """mlserve.yml, checked. Every key is optional; command-line flags win over it."""

    project: str | None = None
    env: str | None = None
    workers: int | None = None
    data: tuple[str, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()
    limits: Limits = field(default_factory=Limits)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    max_runtime_s: int | None = None
    preload: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    requirements: str | None = None
    network: str = "isolated"
    access: str | None = None  # public | token; None: as the gateway (public on loopback, token when open)
    rate: RateLimit | None = None  # limits: {rate, burst}: the whole project's request rate at the gateway
    cors: Cors | None = None
    cluster: str | None = None  # the cluster target (`mlserve cluster add`) its commands go to


# What an instance may reach: the internet but not this host, private ranges, the metadata address or
# other instances (isolated); nothing at all (none); or everything a default container can (open).
NETWORKS = ("isolated", "none", "open")


def network(value: object) -> str:
    if value not in NETWORKS:
        raise ValueProblem(f"one of {', '.join(NETWORKS)}")
    return str(value)


def access(value: object) -> str:
    if value not in ACCESS:
        raise ValueProblem(f"one of {', '.join(ACCESS)}")
    return str(value)


def _cors(value: object) -> Cors:
    if not isinstance(value, dict) or set(value) != {"origins"} or not isinstance(value["origins"], list):
        raise ValueProblem("a mapping with one key, origins: a list such as [https://app.example.com]")
    try:
        return Cors(tuple(origin(item) for item in value["origins"]))
    except ValueError as exc:
        raise ValueProblem(f"a mapping with origins: a list of origins ({exc})") from None


def _rate(limits: object) -> RateLimit | None:
    """``rate`` and ``burst`` of the limits section (popped from it). Raises ValueProblem."""
    assert isinstance(limits, dict)
    rate, burst = limits.pop("rate", None), limits.pop("burst", None)
    if rate is None:
        if burst is not None:
            raise ValueProblem("given with a rate: limits: {rate: 50/s, burst: 100}")
        return None
    try:
        return rate_limit(rate, burst)
    except ValueError as exc:
        raise ValueProblem(str(exc)) from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueProblem("a string")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueProblem("true or false")
    return value


def _texts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueProblem("a list of strings")
    return tuple(value)


def _env_vars(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueProblem("a mapping of NAME: value")
    pairs = []
    for name, item in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueProblem(f"a mapping of NAME: value, where NAME is letters, digits and _ (not {name!r})")
        if isinstance(item, (dict, list)) or item is None:
            raise ValueProblem(f"a mapping of NAME: value, where value is a string or number ({name} is not)")
        pairs.append((name, str(item).lower() if isinstance(item, bool) else str(item)))
    return tuple(sorted(pairs))


def _options(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueProblem("a mapping")
    return value


def _section(path: Path, key: str, value: object, keys: dict[str, tuple[str, Callable[[object], Any]]],
             defaults: Any) -> Any:
    if not isinstance(value, dict):
        raise ProjectConfigError(f"{path}: {key} must be a mapping with keys {', '.join(keys)}")
    checked = {}
    for name, item in value.items():
        if name not in keys:
            raise ProjectConfigError(f"{path}: unknown {key} setting {name!r}", f"{key.capitalize()} settings: {', '.join(keys)}.")
        attribute, check = keys[name]
        checked[attribute] = _checked(path, f"{key}.{name}", item, check)
    return type(defaults)(**{**defaults.__dict__, **checked})


def _checked(path: Path, key: str, value: object, check: Callable[[object], Any]) -> Any:
    try:
        return check(value)
    except ValueProblem as problem:
        raise ProjectConfigError(f"{path}: {key} must be {problem}, not {value!r}") from None


TOP_LEVEL: dict[str, Callable[[object], Any]] = {
    "project": _text,
    "env": _text,
    "workers": whole(1, MAX_WORKERS),
    "data": _texts,
    "env_vars": _env_vars,
    "max_runtime": max_runtime_s,
    "preload": _flag,
    "options": _options,
    "requirements": _text,
    "network": network,
    "access": access,
    "cors": _cors,
    "cluster": _text,
}


def load_config(project_dir: Path) -> ProjectConfig:
    """Read ``mlserve.yml`` if there is one. Raises ProjectConfigError naming the key and the expected form."""
    path = project_dir / CONFIG_NAME
    if not project_dir.is_dir():
        raise UsageError(f"{project_dir} is not a folder")
    if not path.exists() and not path.is_symlink():
        return ProjectConfig()
    problem = link_problem(path, project_dir)
    if problem:  # a cloned repository's mlserve.yml -> /etc/shadow: an error must not quote that file
        raise ProjectConfigError(f"{path} {problem}", "Make mlserve.yml a plain file in the project.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ProjectConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProjectConfigError(f"{path} must be a mapping of settings, not {type(raw).__name__}")
    known = sorted([*TOP_LEVEL, "limits", "health"])  # limits holds rate and burst too (the gateway's)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ProjectConfigError(f"{path}: unknown setting {key!r}", f"Known settings: {', '.join(known)}.")
        if value is None:
            continue
        if key == "limits":
            if isinstance(value, dict):
                value = dict(value)
                values["rate"] = _checked(path, "limits.rate", value, _rate)
            values["limits"] = _section(path, key, value, LIMIT_KEYS, Limits())
        elif key == "health":
            values["health"] = _section(path, key, value, HEALTH_KEYS, HealthPolicy())
        elif key == "max_runtime":
            values["max_runtime_s"] = _checked(path, key, value, max_runtime_s)
        else:
            values[key] = _checked(path, key, value, TOP_LEVEL[key])
    return ProjectConfig(**values)


def flag_max_runtime_s(value: str | None, config: ProjectConfig) -> int:
    """``--max-runtime`` if given, else mlserve.yml's, else the default. Raises UsageError."""
    if value is None:
        return config.max_runtime_s if config.max_runtime_s is not None else DEFAULT_MAX_RUNTIME_S
    try:
        return max_runtime_s(value)
    except ValueProblem as problem:
        raise UsageError(f"--max-runtime {value!r} is not {problem}", "Use 0 for no limit.") from None
