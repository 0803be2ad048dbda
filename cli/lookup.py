"""Naming jobs and projects the way users do: by endpoint id, full name, ``project/N`` or ``N``."""

from __future__ import annotations

from pathlib import Path

from .config import CONFIG_NAME, load_config
from .constants import ENDPOINT_ID_LENGTH
from .errors import JobNotFoundError
from .project import default_project_name, validate_project_name
from .state import Job, StateStore


def folder_project(folder: Path) -> str:
    """The project a folder deploys as: mlserve.yml's ``project``, else the folder's name."""
    config = load_config(folder) if (folder / CONFIG_NAME).exists() else None
    if config is not None and config.project is not None:
        return validate_project_name(config.project)
    return validate_project_name(default_project_name(folder))


def resolve(state: StateStore, owner: str, ref: str, cwd: Path | None = None) -> Job:
    """A job by endpoint id, full name, ``project/N`` or ``N`` (project from the folder). Raises JobNotFoundError."""
    job = state.get_job(ref) if len(ref) == ENDPOINT_ID_LENGTH else None
    if job:
        return job
    parts = ref.strip("/").split("/")
    try:
        if len(parts) == 4 and parts[1] == "projects":
            owner, project, number = parts[0], parts[2], int(parts[3])
        elif len(parts) == 2:
            project, number = parts[0], int(parts[1])
        elif len(parts) == 1:
            number = int(parts[0])
            project = folder_project(cwd or Path.cwd())
        else:
            raise ValueError
    except ValueError:
        raise JobNotFoundError(
            f"no job matches {ref!r}",
            "Name a job as owner/projects/project/N, project/N, N (inside the project folder) or by its endpoint id; "
            "`mlserve status` lists them.",
        ) from None
    for job in state.jobs(owner=owner, project=project):
        if job.number == number:
            return job
    raise JobNotFoundError(f"no job {owner}/projects/{project}/{number}", "`mlserve status --all` lists every job.")
