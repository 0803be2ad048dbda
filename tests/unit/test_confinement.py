"""How a local instance's view is worked out: which folders its user cannot enter on the way to
what it needs (they get covered), which paths are seen through others, where its Python lives."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from mlserve.runtimes.confinement import can_search, covers, outermost, python_home

USER = 65534


def _stat(uid: int, gid: int, mode: int):
    return lambda path: SimpleNamespace(st_uid=uid, st_gid=gid, st_mode=mode)


@pytest.mark.parametrize(
    "owner, group, mode, expected",
    [
        (0, 0, 0o700, False),  # /root
        (0, 0, 0o755, True),
        (0, 0, 0o754, False),  # others may read but not enter
        (0, 999, 0o710, False),  # a group the user is not in (the gateway's)
        (0, USER, 0o710, True),  # the user's group
        (USER, USER, 0o071, False),  # its owner's bits decide for the owner, not the others'
        (USER, 0, 0o100, True),
    ],
)
def test_entering_a_folder_is_decided_by_the_bits_that_apply_to_the_user(owner, group, mode, expected):
    assert can_search("/x", USER, USER, stat_of=_stat(owner, group, mode)) is expected


def test_paths_inside_another_are_seen_through_it():
    assert outermost(["/h/run/j/sock", "/h/run/j", "/h/runner", "/data", "/data/in"]) == ["/data", "/h/run/j", "/h/runner"]


def test_the_first_folder_that_cannot_be_entered_on_each_way_is_covered_once():
    closed = {"/root", "/tmp/home", "/tmp/home/apps", "/srv/private"}
    tops = covers(["/tmp/home/apps/snap", "/tmp/home/run/j", "/root/.pyenv/versions/3.11",
                   "/usr/lib/data", "/srv/private"], lambda folder: folder not in closed)
    # /srv/private itself is a needed path: its own mode is the user's business, as in a container.
    assert tops == ["/root", "/tmp/home"]


def test_nothing_is_covered_when_every_way_is_open():
    assert covers(["/srv/data", "/usr/lib/python3"], lambda folder: True) == []


def test_a_venvs_python_is_the_installation_its_pyvenv_cfg_names(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    python = tmp_path / "pythons" / "3.11.7"
    (python / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {python}/bin\ninclude-system-site-packages = false\n")
    assert python_home(str(venv)) == str(python.resolve())
    os.remove(venv / "pyvenv.cfg")
    assert python_home(str(venv)) is None
