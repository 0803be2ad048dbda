"""`mlserve init`: make a folder a project, writing a starting app from templates/init/<template>/ when it has none.

Files ending in ``.j2`` are rendered with Jinja (the suffix dropped); others, such as the
website's Flask templates, static CSS and JS, are copied as they are. templates/init/common/
holds the files every template shares (mlserve.yml, .mlserveignore).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import CONFIG_NAME
from .errors import UsageError
from .links import link_problem
from .project import default_project_name, validate_project_name
from .render import render
from .validate import APP_FILE

TEMPLATES = ("flask", "wsgi", "fastapi", "website")
COMMON = "common"
# Stored without the leading dot so that packaging tools never skip them.
DOTFILES = {"mlserveignore": ".mlserveignore"}
HEALTH_PATHS = {"fastapi": "/health"}


def _sources(template: str) -> dict[str, tuple[str, Traversable]]:
    """Output path (relative to the project) -> (template name for render(), the file)."""
    root = resources.files("mlserve.templates") / "init"
    found: dict[str, tuple[str, Traversable]] = {}

    def walk(folder: Traversable, source_prefix: str, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                walk(entry, f"{source_prefix}{entry.name}/", f"{prefix}{entry.name}/")
            elif not entry.name.endswith((".pyc", ".pyo")):
                out = entry.name.removesuffix(".j2")
                found[prefix + DOTFILES.get(out, out)] = (source_prefix + entry.name, entry)

    for folder in (COMMON, template):
        walk(root / folder, f"init/{folder}/", "")  # the template's own files win over common ones
    return dict(sorted(found.items(), key=lambda item: (item[0] != "app.py", "/" in item[0], item[0])))


@dataclass(frozen=True)
class InitResult:
    """What ``mlserve init`` did in ``folder``."""

    folder: Path
    project: str
    written: list[Path] = field(default_factory=list)  # files the template wrote (a new app)
    config: Literal["created", "updated", "unchanged"] | None = None  # an existing app's mlserve.yml
    previous: str | None = None  # the project mlserve.yml named before an update
    forced: bool = False  # --force was given for an existing app, which it does not touch

    def summary(self) -> list[str]:
        """What to tell the user, one line each."""
        here = self.folder.resolve() == Path.cwd().resolve()
        closing = [f"Initialized project {self.project} in {self.folder.resolve()}",
                   "Next: mlserve run --mode serve" if here else
                   f"Next: cd {shlex.quote(str(self.folder))} && mlserve run --mode serve"]
        if self.config is None:
            return [*(f"created {path}" for path in self.written), *closing]
        config = self.folder / CONFIG_NAME
        done = {
            "created": f"created {config} with project: {self.project} (every other setting is commented out)",
            "updated": f"set project: {self.project} in {config}" + (f" (was {self.previous})" if self.previous else ""),
            "unchanged": f"{config} already sets project: {self.project}; nothing to change",
        }[self.config]
        kept = f"{self.folder / APP_FILE} is there already: it and every other file are left as they are"
        if self.forced:
            kept += f" (--force never replaces an app; remove {APP_FILE} first to start again from a template)"
        return [kept, done, *closing]


def init_project(folder: Path, name: str | None, template: str = "flask", force: bool = False) -> InitResult:
    """``mlserve init``: make ``folder`` the project ``name`` (default: mlserve.yml's, else the folder's name).

    With an app.py in ``folder``, only mlserve.yml is touched: written when missing, else its
    ``project:`` set; app.py and every other file stay as they are, ``force`` or not. Without one,
    the template is scaffolded there (the folder created if needed; see scaffold()).
    Raises UsageError for an invalid ``name``, a folder name that gives no project name, an
    unknown template, files in the way, or an mlserve.yml it cannot edit; nothing is written then.
    """
    if template not in TEMPLATES:
        raise UsageError(f"unknown template {template!r}", f"Templates: {', '.join(TEMPLATES)}.")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder", "Name a new or existing folder.")
    if name is not None:
        validate_project_name(name)
    app = folder / APP_FILE
    if app.exists() or app.is_symlink():
        return replace(_adopt(folder, name), forced=force)
    project = name if name is not None else default_project_name(folder)
    return InitResult(folder, project, scaffold(folder, name, template=template, force=force, project=project))


def _adopt(folder: Path, name: str | None) -> InitResult:
    """An existing app: write mlserve.yml, or set ``project:`` in it, and nothing else."""
    config = folder / CONFIG_NAME
    problem = link_problem(config, folder)
    if problem:
        raise UsageError(f"{config} {problem}; mlserve init does not write through it",
                         "Replace the link with a file of your own, then run mlserve init again.")
    settings = _read_settings(config) if config.exists() else None
    previous = settings.get("project") if settings is not None else None
    if name is not None:
        project = name
    elif isinstance(previous, str) and _valid_name(previous):
        project = previous
    else:
        project = default_project_name(folder)
    if settings is None:
        config.write_text(render(f"init/{COMMON}/{CONFIG_NAME}.j2", project=project, health_path="/"))
        return InitResult(folder, project, config="created")
    if previous == project:
        return InitResult(folder, project, config="unchanged")
    config.write_text(_with_project(config, settings, project))
    return InitResult(folder, project, config="updated", previous=None if previous is None else str(previous))


def _read_settings(config: Path) -> dict[str, Any]:
    try:
        settings = yaml.safe_load(config.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config} is not valid YAML, so mlserve init leaves it alone: {exc}",
                         "Fix it, or set `project: NAME` in it by hand.") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{config} must be a mapping of settings, not {type(settings).__name__}",
                         "Fix it, or set `project: NAME` in it by hand.")
    return settings


_PROJECT_LINE = re.compile(r"^project[ \t]*:(?P<value>[^\n]*?)(?P<comment>[ \t]+#[^\n]*)?$", re.MULTILINE)


def _with_project(config: Path, settings: dict[str, Any], project: str) -> str:
    """mlserve.yml's text with ``project: <project>``, every other line (comments too) kept as it is.

    Raises UsageError when the file is laid out so that a line edit would change more than the project.
    """
    text = config.read_text()
    line = f"project: {project}"
    if _PROJECT_LINE.search(text):
        edited = _PROJECT_LINE.sub(lambda m: line + (m.group("comment") or ""), text, count=1)
    else:  # after the comments that open the file, and after a `---`
        lines = text.splitlines(keepends=True)
        at = 0
        while at < len(lines) and (lines[at].startswith("#") or not lines[at].strip()):
            at += 1
        at += 1 if at < len(lines) and lines[at].rstrip() == "---" else 0
        before = "".join(lines[:at])
        edited = before + ("\n" if before and not before.endswith("\n") else "") + line + "\n" + "".join(lines[at:])
    try:
        same = yaml.safe_load(edited) == {**settings, "project": project}
    except yaml.YAMLError:
        same = False
    if not same:
        raise UsageError(f"cannot set the project in {config} without changing more than that",
                         f"Set `{line}` in it by hand.")
    return edited


def _valid_name(name: str) -> bool:
    try:
        validate_project_name(name)
    except UsageError:
        return False
    return True


def scaffold(target: Path, name: str | None, template: str = "flask", force: bool = False,
             project: str | None = None) -> list[Path]:
    """Write app.py, requirements.txt, mlserve.yml and .mlserveignore (and the template's other files)
    into ``target``, creating it if needed; return the paths written.

    ``name`` titles the app (default: the folder's name); ``project`` goes into mlserve.yml (default:
    derived from the folder; ``render()`` takes the template name as ``name``, so the context calls it
    ``project``). Raises UsageError for an unknown template, a folder name that gives no project name,
    a folder on the way that links out of ``target``, or when files exist and ``force`` is false
    (nothing is written then). ``force`` replaces files and links to files, never writes through a link.
    """
    if template not in TEMPLATES:
        raise UsageError(f"unknown template {template!r}", f"Templates: {', '.join(TEMPLATES)}.")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder", "Name a new or existing folder.")
    sources = _sources(template)
    paths = {rel: target / rel for rel in sources}
    existing = [rel for rel, path in paths.items() if path.exists() or path.is_symlink()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} in {target}",
            "Nothing was written. Pass --force to overwrite them, or init another folder.",
        )
    folders = [rel for rel in existing if paths[rel].is_dir() and not paths[rel].is_symlink()]
    if folders:
        raise UsageError(f"{', '.join(folders)} in {target} {'is a folder' if len(folders) == 1 else 'are folders'}",
                         "Move them away first; --force only overwrites files.")
    root = target.resolve()
    # A cloned repository's `static -> /etc` must not make init write outside the folder.
    linked = sorted({rel.split("/")[0] for rel, path in paths.items() if not path.parent.resolve().is_relative_to(root)})
    if linked:
        raise UsageError(f"{', '.join(linked)} in {target} links out of the folder; init writes only inside it",
                         "Nothing was written. Replace the link with a folder, or init another folder.")
    context = {
        "project": project or default_project_name(target),
        "title": Path(name).name if name else target.resolve().name,
        "template": template,
        "health_path": HEALTH_PATHS.get(template, "/"),
    }
    contents = {
        rel: render(source, **context).encode() if source.endswith(".j2") else entry.read_bytes()
        for rel, (source, entry) in sources.items()
    }
    for rel, data in contents.items():
        paths[rel].parent.mkdir(parents=True, exist_ok=True)
        paths[rel].unlink(missing_ok=True)  # --force replaces a link itself, never the file it leads to
        paths[rel].write_bytes(data)
    return list(paths.values())
