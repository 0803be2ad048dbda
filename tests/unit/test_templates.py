"""Rendered files compared whole: the Dockerfile and uwsgi.ini for representative specs.

To accept a deliberate change, render again with MLSERVE_UPDATE_EXPECTED=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlserve import builder
from mlserve.builder import ImageBuilder
from mlserve.config import Limits
from mlserve.runtimes import Artifact, InstanceSpec, UwsgiSettings, write_uwsgi_ini

EXPECTED = Path(__file__).parent / "expected"
PINS = ["pyuwsgi==2.0.30", "filelock==3.20.0", "a2wsgi==1.10.10"]


def _matches(name: str, text: str) -> None:
    path = EXPECTED / name
    if os.environ.get("MLSERVE_UPDATE_EXPECTED"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("name, requirements, ca_bundle, pip_env", [
    ("Dockerfile.plain", None, False, {}),
    ("Dockerfile.full", "requirements.txt", True,
     {"PIP_INDEX_URL": "https://pypi.example/simple", "PIP_TRUSTED_HOST": "pypi.example"}),
])
def test_dockerfile(monkeypatch, name, requirements, ca_bundle, pip_env):
    monkeypatch.setattr(builder, "runtime_packages", lambda: PINS)
    text = ImageBuilder(None, "/home", print).dockerfile(  # type: ignore[arg-type]
        "mlserve/base:bookworm", requirements, ca_bundle, pip_env)
    _matches(name, text)


@pytest.mark.parametrize("name, uwsgi", [
    ("uwsgi.default.ini", UwsgiSettings(workers=2, timeout_s=60, body_limit_bytes=100 << 20, preload=False)),
    ("uwsgi.preload.ini", UwsgiSettings(workers=5, timeout_s=7, body_limit_bytes=1 << 20, preload=True)),
])
def test_uwsgi_ini(tmp_path, name, uwsgi):
    spec = InstanceSpec(job_id="a" * 22, name="o/projects/p/1", project_key="o/projects/p", artifact=Artifact("img"),
                        run_dir=tmp_path, output_dir=tmp_path / "out", uwsgi=uwsgi, env={"SECRET": "not here"},
                        limits=Limits())
    path = write_uwsgi_ini(spec, socket="/run/mlserve/sock/uwsgi.sock", app_dir="/app", venv="/opt/mlserve/venv")
    assert path == tmp_path / "uwsgi.ini"
    _matches(name, path.read_text())
