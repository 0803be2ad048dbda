"""The unit tier changes nothing on this machine."""

from __future__ import annotations

import pytest

from mlserve.quota import OutputVolume


@pytest.fixture(autouse=True)
def no_output_filesystems(monkeypatch):
    """A test that prepares an instance (Instances.instance_spec) as root would mount a real filesystem
    on its output folder, and leave it and its loop device behind: here none is made. test_quota.py
    runs the real code against recorded commands."""
    monkeypatch.setattr(OutputVolume, "mount", lambda self, size_bytes: None)
