"""The user's project folder: its name, --data mounts, and which files go into the image (mlserve.yml: ``config``)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .links import link_problem
from .spec import DataMount

IGNORE_NAME = ".mlserveignore"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MOUNT_RE = re.compile(r"^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
# Places inside an instance that a data mount must not hide.
RESERVED_MOUNTS = ("/app", "/opt", "/run", "/output", "/tmp", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin",
                   "/lib", "/lib64", "/sbin", "/var", "/root", "/home")
# Host folders no instance may read: the system's, and the secrets in a user's home.
SYSTEM_SOURCES = ("/proc", "/sys", "/dev", "/run", "/etc", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32",
                  "/lib64", "/libx32", "/var/lib/docker", "/var/lib/containerd", "/var/run", "/var/log", "/snap")
HOME_SECRETS = (".ssh", ".gnupg", ".docker", ".kube", ".aws", ".config", ".netrc", ".mlserve")
DEFAULT_IGNORES = (".#*", ".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".mypy_cache/",
                   ".pytest_cache/", ".ipynb_checkpoints/", ".DS_Store")
MAX_CONTEXT_BYTES = 1 << 30  # 1 GiB; models belong in --data mounts, not in the image


def validate_project_name(name: str) -> str:
    """A project name is lower-case ASCII letters, digits, ``-`` and ``_``; raises UsageError otherwise."""
    if not NAME_RE.match(name or ""):
        hint = "A project name is 1-63 lower-case ASCII letters, digits, '-' or '_', starting with a letter or digit."
        suggestion = _slug(name or "")
        if suggestion and suggestion != name:
            hint += f" For example: {suggestion}"
        raise UsageError(f"{name!r} is not a valid project name", hint)
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
    """The folder's name, made into a valid project name (``Style Transfer`` -> ``style-transfer``).

    Raises UsageError when the name has no ASCII letter or digit to keep (``模型``): a fixed
    fallback would put unrelated apps into one project and one round robin.
    """
    folder = project_dir.resolve().name
    name = _slug(folder)
    if not name:
        raise UsageError(
            f"the folder name {folder!r} has no ASCII letters or digits to make a project name of",
            "Name the project with `--project NAME` or with `project: NAME` in mlserve.yml "
            "(`mlserve init NAME` writes it); a project name is lower-case ASCII letters, digits, '-' and '_'.",
        )
    return name


def _slug(text: str) -> str:
    """``Style Transfer`` -> ``style-transfer``: runs of anything else than a-z, 0-9, - and _ become one -."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63]


def parse_data_mount(spec: str, base: Path, state_home: Path, inside: Path | None = None) -> DataMount:
    """``SRC:MOUNT`` -> a read-only mount of folder SRC (relative to ``base``) at /MOUNT in the instance.

    Refused: the host's root, system folders, a user's home folder or its secrets, and mlserve's own
    home (``state_home``: sockets and state of every job) or a folder holding it. With ``inside``
    (mlserve.yml's data, from a possibly cloned repository), SRC must be inside that folder.
    """
    source, sep, mount = spec.rpartition(":")
    if not sep or not source or not mount:
        raise UsageError(f"--data {spec!r} is not SRC:MOUNT", "e.g. `--data ./models:input` mounts ./models at /input.")
    path = (base / source).expanduser().resolve()
    if not path.exists():
        raise UsageError(f"--data source {source} does not exist ({path})", "Name an existing folder or file.")
    check_data_source(path, state_home.resolve(), inside)
    mount = "/" + mount.strip("/")
    if not MOUNT_RE.match(mount) or ".." in mount.split("/"):
        raise UsageError(f"--data mount point {mount!r} is not a plain absolute path", "e.g. `--data ./models:input`.")
    if mount == "/" or any(mount == r or mount.startswith(r + "/") for r in RESERVED_MOUNTS):
        raise UsageError(f"--data cannot mount at {mount}: the instance needs that path", "Pick another, e.g. /input or /data.")
    return DataMount(str(path), mount)


def check_data_source(path: Path, state_home: Path, inside: Path | None = None) -> None:
    """Raise UsageError when the resolved ``path`` must not be mounted into an instance (see
    parse_data_mount). Checked again before every start: a folder may become a link meanwhile."""
    hint = "Mount the folder that holds the data itself, e.g. `--data ./models:input`."
    if inside is not None and not path.is_relative_to(inside.resolve()):
        raise UsageError(
            f"mlserve.yml's data {path} is outside the project folder {inside}",
            "A project's mlserve.yml may only mount its own folders (a cloned repository must not read your files); "
            "to mount this one, confirm it with `--allow-data-outside` or give it as `--data SRC:MOUNT`.")
    if path == Path("/") or any(_overlaps(path, Path(folder)) for folder in SYSTEM_SOURCES):
        raise UsageError(f"--data cannot mount {path}: it is or holds a system folder of this host", hint)
    if _overlaps(path, state_home):
        raise UsageError(f"--data cannot mount {path}: it is or holds mlserve's home {state_home} (every job's "
                         "sockets and the state)", hint)
    for user_home in _user_homes():
        if user_home.is_relative_to(path) or any(_overlaps(path, user_home / name) for name in HOME_SECRETS):
            raise UsageError(f"--data cannot mount {path}: it is or holds a user's home folder or the secrets in it",
                             hint)


def _overlaps(path: Path, folder: Path) -> bool:
    """``path`` is ``folder``, inside it, or holds it."""
    return path.is_relative_to(folder) or folder.is_relative_to(path)


def _user_homes() -> set[Path]:
    homes = {Path("/root"), Path.home()}
    try:
        homes.update(entry for entry in Path("/home").iterdir() if entry.is_dir())
    except OSError:
        pass
    return {home.resolve() for home in homes}


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

    An ignored folder is not entered. A symbolic link to a file is followed when it resolves inside
    the project (the image gets the content); symlinked folders are not followed (see linked_folders).
    Raises UsageError naming the links that lead out of the project or nowhere, unless ignored:
    nothing outside the project folder goes into an image.
    """
    files, _ = _walk(project_dir)
    return files


def linked_folders(project_dir: Path) -> list[str]:
    """Symbolic links to folders in the project, not ignored: they are not followed, so none of their
    files are in the image. Raises UsageError as context_files does."""
    _, folders = _walk(project_dir)
    return folders


def _walk(project_dir: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(files for the image, symlinked folders not followed); see context_files."""
    ignore = project_dir / IGNORE_NAME
    _refuse_links([(ignore, IGNORE_NAME)], project_dir)  # read before the walk checks it
    rules = _rules(list(DEFAULT_IGNORES) + (ignore.read_text().splitlines() if ignore.exists() else []))

    def ignored(rel: str, is_dir: bool) -> bool:
        verdict = False
        for rule in rules:
            if rule.matches(rel, is_dir):
                verdict = not rule.negate
        return verdict

    files: list[tuple[Path, str]] = []
    folders: list[str] = []
    links: list[tuple[Path, str]] = []

    def walk(folder: Path, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            rel = f"{prefix}{entry.name}"
            is_dir = entry.is_dir()  # through a link too: `data/` in .mlserveignore also keeps out a linked data
            if ignored(rel, is_dir):
                continue
            if entry.is_symlink():
                if is_dir:
                    folders.append(rel)
                    continue
                links.append((entry, rel))
            if is_dir:
                walk(entry, rel + "/")
            elif entry.is_file():
                files.append((entry, rel))

    walk(project_dir, "")
    _refuse_links(links, project_dir)
    return files, folders


def _refuse_links(links: list[tuple[Path, str]], project_dir: Path) -> None:
    """Raise UsageError naming every link of ``links`` that leads out of the project or nowhere."""
    bad = [(rel, problem) for path, rel in links if (problem := link_problem(path, project_dir))]
    if not bad:
        return
    (rel, problem), others = bad[0], [other for other, _ in bad[1:]]
    also = f" Other such links: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}." if others else ""
    raise UsageError(
        f"{rel} {problem}",
        "mlserve reads and ships only files inside the project folder; a link is followed when it stays inside."
        + also + f" Copy what the app needs into the project, or list the link in {IGNORE_NAME} to leave it out.",
    )


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
