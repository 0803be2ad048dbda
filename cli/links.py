"""Symbolic links in a project folder: followed inside it, refused when they lead out of it."""

from __future__ import annotations

from pathlib import Path


def link_problem(path: Path, project_dir: Path) -> str | None:
    """Why ``path`` may not be read as part of the project, or None.

    None when it is no symbolic link, or one that resolves inside ``project_dir`` (such a link is
    followed). Otherwise says where it leads: outside the project (a cloned repository's
    ``app.py -> /etc/shadow`` must not be read), or nowhere.
    """
    if not path.is_symlink():
        return None
    target = path.readlink()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        return f"is a symbolic link to {target}, which does not exist"
    except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
        return f"is a symbolic link to {target}, which cannot be resolved (a loop of links?)"
    root = project_dir.resolve()
    if not resolved.is_relative_to(root):
        return f"is a symbolic link to {target}, outside the project folder {root}"
    return None
