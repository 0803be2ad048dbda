"""`mlserve init`: write a starting project from templates/init/<template>/.

Files ending in ``.j2`` are rendered with Jinja (the suffix dropped); others, such as the
website's Flask templates, static CSS and JS, are copied as they are. templates/init/common/
holds the files every template shares (mlserve.yml, .mlserveignore).
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from mlserve.errors import UsageError
from mlserve.project import default_project_name
from mlserve.render import render

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


def scaffold(target: Path, name: str | None, template: str = "flask", force: bool = False) -> list[Path]:
    """Write app.py, requirements.txt, mlserve.yml and .mlserveignore (and the template's other files)
    into ``target``, creating it if needed; return the paths written.

    ``name`` titles the app; the project name in mlserve.yml is derived from the folder
    (``render()`` takes the template name as ``name``, so the context calls it ``project``).
    Raises UsageError for an unknown template, or when files exist and ``force`` is false
    (nothing is written then).
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
    context = {
        "project": default_project_name(target),
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
        paths[rel].write_bytes(data)
    return list(paths.values())
