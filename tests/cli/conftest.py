"""CLI tests run click's CliRunner against an isolated, empty home."""

from __future__ import annotations

import pytest
from click.testing import CliRunner


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLSERVE_OWNER", "alice")
    monkeypatch.chdir(tmp_path)
    return CliRunner()
