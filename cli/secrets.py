"""A project's secrets: environment variables its instances get at start, kept out of everything else.

Each secret is one file, ``$MLSERVE_HOME/secrets/<owner>/<project>/<NAME>``, in folders only their
owner may enter (0700) and written whole with mode 0600 from the start. Never in the state database,
an image, a job spec, the manifest or any output: only names and when they were set are shown.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import JobStartError, MlserveError, UsageError
from .home import Home
from .project import validate_owner, validate_project_name

SECRETS_DIR = "secrets"
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME_LENGTH = 128
MAX_VALUE_BYTES = 64 * 1024
# What mlserve itself sets for every instance (instances.Instances.instance_spec), and what would
# steer the instance's processes rather than inform the app. Compared upper-cased.
RESERVED_NAMES = frozenset({"OUTPUT_DIR", "LOG_FILE", "LOG_FILE_MAX_BYTES", "MANIFEST_FILE", "PATH", "HOME"})
RESERVED_PREFIXES = ("MLSERVE_", "PYTHON", "LD_", "UWSGI_")


@dataclass(frozen=True)
class Secret:
    """A secret as it may be shown: its name and when it was last set, never its value."""

    name: str
    set_at: float

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "set_at": self.set_at}


def check_name(name: str) -> str:
    """An environment variable name, at most 128 characters, that mlserve does not set or need itself.
    Raises UsageError otherwise."""
    if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"{name[:MAX_NAME_LENGTH]!r} is not a valid secret name",
            f"A secret is an environment variable: 1-{MAX_NAME_LENGTH} ASCII letters, digits and '_', "
            "not starting with a digit, e.g. API_TOKEN.")
    upper = name.upper()
    if upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES):
        raise UsageError(
            f"{name} is reserved: mlserve sets it for instances, or it steers their processes",
            "Pick another name. Reserved: " + ", ".join(sorted(RESERVED_NAMES)) + " and names starting with "
            + ", ".join(RESERVED_PREFIXES) + " (in any case).")
    return name


def read_value(stream: BinaryIO) -> bytes:
    """At most enough of ``stream`` to tell whether the value is over the limit (parse_value says)."""
    return stream.read(MAX_VALUE_BYTES + 2)


def parse_value(raw: bytes, name: str) -> str:
    """The value of secret ``name`` from what stdin gave: one trailing newline stripped (so
    ``echo x | ...`` works); not empty, at most 64 KiB, UTF-8 without NUL. Raises UsageError otherwise."""
    value = raw[:-1] if raw.endswith(b"\n") else raw
    hint = f"Give the value on stdin, e.g. `printf %s \"$VALUE\" | mlserve secret set {name}`."
    if not value:
        raise UsageError(f"the value of {name} is empty", hint + " To remove a secret: `mlserve secret delete NAME`.")
    if len(value) > MAX_VALUE_BYTES:
        raise UsageError(f"the value of {name} is over {MAX_VALUE_BYTES // 1024} KiB",
                         "Keep large material (keys files, models) in a --data mount; a secret is one variable.")
    if b"\0" in value:
        raise UsageError(f"the value of {name} has a NUL byte, which no environment variable can hold", hint)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the value of {name} is not UTF-8 text", hint + " Encode binary values, e.g. base64.") from None


class Secrets:
    """The secrets of one project (``owner/projects/project``)."""

    def __init__(self, home: Home, owner: str, project: str) -> None:
        self.owner, self.project = validate_owner(owner), validate_project_name(project)
        self.folder = home.root / SECRETS_DIR / owner / project

    @property
    def project_key(self) -> str:
        return f"{self.owner}/projects/{self.project}"

    def set(self, name: str, raw: bytes) -> bool:
        """Store secret ``name`` with the value parse_value makes of ``raw``, replacing it whole (a reader
        sees the old value or the new, never part of one). True when it replaced one. Raises UsageError
        for a bad name or value (nothing is stored), MlserveError when the file cannot be written."""
        value = parse_value(raw, check_name(name)).encode("utf-8")
        target = self.folder / name
        try:
            self._make_folders()
            existed = target.exists()
            # mkstemp creates the file with mode 0600: the value is never readable by others, not for an instant.
            fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(value)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
            _sync_folder(self.folder)
        except OSError as exc:
            raise MlserveError(f"could not store secret {name} of {self.project_key}: {exc.strerror or exc}",
                               f"mlserve keeps secrets in {self.folder}; check that it is writable.") from None
        return existed

    def list_all(self) -> list[Secret]:
        """The project's secrets by name, each with when it was set."""
        return [Secret(path.name, path.stat().st_mtime) for path in self._files()]

    def delete(self, name: str) -> None:
        """Forget secret ``name``. Raises UsageError when the project has no such secret."""
        if not NAME_RE.fullmatch(name) or not (self.folder / name).is_file():
            raise UsageError(f"{self.project_key} has no secret {name[:MAX_NAME_LENGTH]!r}",
                             f"`mlserve secret list --project {self.project}` shows its secrets.")
        (self.folder / name).unlink()
        with contextlib.suppress(OSError):  # the last one gone: no empty folder left behind
            self.folder.rmdir()

    def environment(self) -> dict[str, str]:
        """Every secret as NAME -> value, for an instance's environment. Files with names that are not
        (or no longer) allowed are left out. Raises JobStartError when a secret cannot be read: an
        instance must not start without a secret its app expects."""
        values = {}
        for path in self._files():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as source:
                    values[path.name] = source.read().decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise JobStartError(f"could not read secret {path.name} of {self.project_key}: {exc}",
                                    f"Set it again: `mlserve secret set {path.name} --project {self.project}`.") from None
        return values

    def _files(self) -> list[Path]:
        """The secrets' files, by name; temporary files (``.NAME.*.tmp``) and names not allowed are skipped."""
        try:
            entries = sorted(self.folder.iterdir())
        except FileNotFoundError:
            return []
        return [path for path in entries if _allowed(path.name) and path.is_file() and not path.is_symlink()]

    def _make_folders(self) -> None:
        for folder in (self.folder.parent.parent, self.folder.parent, self.folder):
            folder.mkdir(mode=0o700, exist_ok=True)
            folder.chmod(0o700)  # an existing folder too: a secret's folder is its owner's alone


def _allowed(name: str) -> bool:
    try:
        check_name(name)
    except UsageError:
        return False
    return True


def _sync_folder(folder: Path) -> None:
    """Make the rename durable: a crash after `set` returned must not bring the old value back."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
