"""The user's project folder: its name, mlserve.yml, --data mounts, and which files go into the image."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mlserve.errors import ProjectConfigError, UsageError
from mlserve.runtimes import DataMount

CONFIG_NAME = "mlserve.yml"
IGNORE_NAME = ".mlserveignore"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MOUNT_RE = re.compile(r"^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
# Places inside an instance that a data mount must not hide.
RESERVED_MOUNTS = ("/app", "/opt", "/run", "/output", "/tmp", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin",
                   "/lib", "/lib64", "/sbin", "/var", "/root", "/home")
DEFAULT_IGNORES = (".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".mypy_cache/",
                   ".pytest_cache/", ".ipynb_checkpoints/", ".DS_Store")
MAX_CONTEXT_BYTES = 1 << 30  # 1 GiB; models belong in --data mounts, not in the image


@dataclass
class ProjectConfig:
    """mlserve.yml, checked. Every key is optional; command-line flags win over it."""

    project: str | None = None
    env: str | None = None
    workers: int | None = None
    data: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    max_runtime: str | int | None = None
    preload: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    requirements: str | None = None


_TYPES: dict[str, tuple[type, ...]] = {
    "project": (str,), "env": (str,), "workers": (int,), "data": (list,), "env_vars": (dict,),
    "limits": (dict,), "health": (dict,), "max_runtime": (str, int), "preload": (bool,),
    "options": (dict,), "requirements": (str,),
}
LIMIT_KEYS = ("memory", "cpus", "pids", "tmp")
HEALTH_KEYS = ("path", "method", "interval", "timeout", "failures")


def load_config(project_dir: Path) -> ProjectConfig:
    """Read ``mlserve.yml`` if there is one. Raises ProjectConfigError naming the key and the file."""
    path = project_dir / CONFIG_NAME
    if not project_dir.is_dir():
        raise UsageError(f"{project_dir} is not a folder")
    if not path.exists():
        return ProjectConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProjectConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProjectConfigError(f"{path} must be a mapping of settings, not {type(raw).__name__}")
    known = {f.name for f in fields(ProjectConfig)}
    for key, value in raw.items():
        if key not in known:
            raise ProjectConfigError(f"{path}: unknown setting {key!r}", f"Known settings: {', '.join(sorted(known))}.")
        if value is not None and not isinstance(value, _TYPES[key]) or (key == "workers" and isinstance(value, bool)):
            expected = " or ".join(t.__name__ for t in _TYPES[key])
            raise ProjectConfigError(f"{path}: {key} must be a {expected}, not {type(value).__name__}")
    config = ProjectConfig(**{k: v for k, v in raw.items() if v is not None})
    for key in config.limits:
        if key not in LIMIT_KEYS:
            raise ProjectConfigError(f"{path}: unknown limit {key!r}", f"Limits: {', '.join(LIMIT_KEYS)}.")
    for key in config.health:
        if key not in HEALTH_KEYS:
            raise ProjectConfigError(f"{path}: unknown health setting {key!r}", f"Health settings: {', '.join(HEALTH_KEYS)}.")
    if config.health.get("path") and not str(config.health["path"]).startswith("/"):
        raise ProjectConfigError(f"{path}: health.path must start with /")
    if config.workers is not None and not 1 <= config.workers <= 64:
        raise ProjectConfigError(f"{path}: workers must be between 1 and 64")
    config.env_vars = {str(k): str(v) for k, v in config.env_vars.items()}
    config.data = [str(spec) for spec in config.data]
    return config


def validate_project_name(name: str) -> str:
    """A project name is lower-case ASCII letters, digits, ``-`` and ``_``; raises UsageError otherwise."""
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"{name!r} is not a valid project name",
            "A project name is 1-63 lower-case ASCII letters, digits, '-' or '_', starting with a letter or digit.",
        )
    return name


def validate_owner(name: str) -> str:
    """The owner shows in job names and URLs; same rules as a project name."""
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"{name!r} is not a valid owner name",
            "Set MLSERVE_OWNER to 1-63 lower-case ASCII letters, digits, '-' or '_'.",
        )
    return name


def default_project_name(project_dir: Path) -> str:
    """The folder's name, made into a valid project name (``Style Transfer`` -> ``style-transfer``)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", project_dir.resolve().name.lower()).strip("-_")
    return name[:63] or "app"


def parse_data_mount(spec: str, base: Path) -> DataMount:
    """``SRC:MOUNT`` -> a read-only mount of folder SRC (relative to ``base``) at /MOUNT in the instance."""
    source, sep, mount = spec.rpartition(":")
    if not sep or not source or not mount:
        raise UsageError(f"--data {spec!r} is not SRC:MOUNT", "e.g. `--data ./models:input` mounts ./models at /input.")
    path = (base / source).expanduser().resolve()
    if not path.exists():
        raise UsageError(f"--data source {source} does not exist ({path})", "Name an existing folder or file.")
    mount = "/" + mount.strip("/")
    if not MOUNT_RE.match(mount) or ".." in mount.split("/"):
        raise UsageError(f"--data mount point {mount!r} is not a plain absolute path", "e.g. `--data ./models:input`.")
    if mount == "/" or any(mount == r or mount.startswith(r + "/") for r in RESERVED_MOUNTS):
        raise UsageError(f"--data cannot mount at {mount}: the instance needs that path", "Pick another, e.g. /input or /data.")
    return DataMount(str(path), mount)


DURATION_RE = re.compile(r"^(\d+)\s*([smhd]?)$")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | None, default: int) -> int:
    """``90``, ``45s``, ``30m``, ``12h`` or ``7d`` as seconds; ``0`` means no limit. Raises UsageError."""
    if value is None:
        return default
    match = DURATION_RE.match(str(value).strip().lower())
    if not match:
        raise UsageError(f"{value!r} is not a duration", "Use seconds, or a number with s, m, h or d: 45s, 30m, 12h, 7d; 0 for none.")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


# -- the build context -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    pattern: str
    negate: bool
    dir_only: bool
    anchored: bool

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.anchored or "/" in self.pattern:
            return _glob(self.pattern, rel)
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], self.pattern)


def _glob(pattern: str, rel: str) -> bool:
    """gitignore-style match of a whole path: ``*`` stays in one segment, ``**`` spans any."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, rel) is not None


def _rules(lines: list[str]) -> list[_Rule]:
    rules = []
    for line in lines:
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line[1:] if negate else line
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = line.startswith("/")
        rules.append(_Rule(line.lstrip("/"), negate, dir_only, anchored))
    return rules


def context_files(project_dir: Path) -> list[tuple[Path, str]]:
    """Files that go into the image, as (path, path relative to the project), ``.mlserveignore`` applied.

    An ignored folder is not entered; symlinks to files are followed, symlinked folders are not.
    """
    ignore = project_dir / IGNORE_NAME
    rules = _rules(list(DEFAULT_IGNORES) + (ignore.read_text().splitlines() if ignore.exists() else []))

    def ignored(rel: str, is_dir: bool) -> bool:
        verdict = False
        for rule in rules:
            if rule.matches(rel, is_dir):
                verdict = not rule.negate
        return verdict

    found: list[tuple[Path, str]] = []

    def walk(folder: Path, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            rel = f"{prefix}{entry.name}"
            is_dir = entry.is_dir() and not entry.is_symlink()
            if ignored(rel, is_dir):
                continue
            if is_dir:
                walk(entry, rel + "/")
            elif entry.is_file():
                found.append((entry, rel))

    walk(project_dir, "")
    return found


def context_size(files: list[tuple[Path, str]], limit: int = MAX_CONTEXT_BYTES) -> int:
    """Total bytes of ``files``; raises UsageError naming the largest when over ``limit``."""
    sizes = [(path.stat().st_size, rel) for path, rel in files]
    total = sum(size for size, _ in sizes)
    if total > limit:
        largest = ", ".join(f"{rel} ({size >> 20} MB)" for size, rel in sorted(sizes, reverse=True)[:3])
        raise UsageError(
            f"the project is {total >> 20} MB, over the {limit >> 20} MB build context limit (largest: {largest})",
            f"List large files in {IGNORE_NAME} and mount them with --data SRC:MOUNT instead.",
        )
    return total
