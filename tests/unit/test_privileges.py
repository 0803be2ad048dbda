"""Who may reach what under a home (cli/privileges.py): the gateway's user and how it is made, the ACL
entry that lets it pass a folder above the home, and the modes a home's files and folders get.

A real deploy, with the real users, is in tests/integration/test_privileges.py."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from mlserve import gateway, privileges
from mlserve.constants import CONTAINER_UID, GATEWAY_USER
from mlserve.errors import GatewayError
from mlserve.home import Home
from mlserve.privileges import Account, acl_letting_search, seal_home, share_sockets

USER_OBJ, USER, GROUP_OBJ, MASK, OTHER, NO_ID = 0x01, 0x02, 0x04, 0x10, 0x20, 0xFFFFFFFF
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other users")


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- the ACL entry on a folder above the home --------------------------------------------------


def test_a_folder_with_only_its_mode_gets_a_search_entry_for_the_user_alone():
    # /root, 0700: the user may search it; the owning group's entry stays empty though the mask lets x through.
    assert acl_letting_search(None, 0o700, 999) == _acl(
        (USER_OBJ, 0o7, NO_ID), (USER, 0o1, 999), (GROUP_OBJ, 0o0, NO_ID), (MASK, 0o1, NO_ID), (OTHER, 0o0, NO_ID))


def test_an_existing_acl_keeps_its_entries_in_order_and_its_mask_gains_search_only():
    existing = _acl((USER_OBJ, 0o7, NO_ID), (USER, 0o6, 5), (USER, 0o4, 2000), (GROUP_OBJ, 0o5, NO_ID),
                    (MASK, 0o4, NO_ID), (OTHER, 0o0, NO_ID))
    assert acl_letting_search(existing, 0o740, 999) == _acl(
        (USER_OBJ, 0o7, NO_ID), (USER, 0o6, 5), (USER, 0o1, 999), (USER, 0o4, 2000), (GROUP_OBJ, 0o5, NO_ID),
        (MASK, 0o5, NO_ID), (OTHER, 0o0, NO_ID))


def test_an_entry_without_search_gains_it_and_keeps_what_it_had():
    existing = _acl((USER_OBJ, 0o7, NO_ID), (USER, 0o4, 999), (GROUP_OBJ, 0o0, NO_ID), (MASK, 0o4, NO_ID),
                    (OTHER, 0o0, NO_ID))
    assert acl_letting_search(existing, 0o740, 999) == _acl(
        (USER_OBJ, 0o7, NO_ID), (USER, 0o5, 999), (GROUP_OBJ, 0o0, NO_ID), (MASK, 0o5, NO_ID), (OTHER, 0o0, NO_ID))


def test_a_folder_the_user_may_search_already_is_left_alone():
    granted = _acl((USER_OBJ, 0o7, NO_ID), (USER, 0o1, 999), (GROUP_OBJ, 0o0, NO_ID), (MASK, 0o1, NO_ID),
                   (OTHER, 0o0, NO_ID))
    assert acl_letting_search(granted, 0o710, 999) is None
    masked = _acl((USER_OBJ, 0o7, NO_ID), (USER, 0o1, 999), (GROUP_OBJ, 0o0, NO_ID), (MASK, 0o0, NO_ID),
                  (OTHER, 0o0, NO_ID))
    assert acl_letting_search(masked, 0o700, 999) is not None  # its entry says x, the mask takes it away


# -- the gateway's user ------------------------------------------------------------------------


def test_nginx_runs_its_workers_as_the_gateways_user_under_root_and_as_the_caller_otherwise(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert gateway.nginx_user() == f"{GATEWAY_USER} {GATEWAY_USER}"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert gateway.nginx_user() is None


class Accounts:
    """pwd, grp and subprocess.run over a machine where groupadd and useradd make what they are asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, users: dict[str, int], groups: dict[str, int],
                 returncode: int = 0) -> None:
        self.users, self.groups, self.returncode = users, groups, returncode
        self.commands: list[list[str]] = []
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        monkeypatch.setattr(privileges, "find_program", lambda name: f"/usr/sbin/{name}")
        monkeypatch.setattr(pwd, "getpwnam", lambda name: _entry(self.users, name, "pw_uid"))
        monkeypatch.setattr(grp, "getgrnam", lambda name: _entry(self.groups, name, "gr_gid"))
        monkeypatch.setattr(subprocess, "run", self.run)

    def run(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        if self.returncode in (0, privileges.ALREADY_EXISTS):
            made = self.groups if command[0].endswith("groupadd") else self.users
            made.setdefault(command[-1], 990 + len(made))
        return subprocess.CompletedProcess(command, self.returncode, "", "useradd: cannot lock /etc/passwd")


def _entry(table: dict[str, int], name: str, field: str) -> object:
    if name not in table:
        raise KeyError(name)
    return type("Entry", (), {field: table[name]})()


def test_a_missing_user_and_group_are_made_as_a_system_user_without_a_home_or_a_shell(monkeypatch):
    accounts = Accounts(monkeypatch, users={}, groups={})
    said: list[str] = []
    assert privileges.gateway_account(said.append) == Account(990, 990)
    assert accounts.commands == [
        ["/usr/sbin/groupadd", "--system", GATEWAY_USER],
        ["/usr/sbin/useradd", "--system", "--gid", GATEWAY_USER, "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", "mlserve gateway workers", GATEWAY_USER],
    ]
    assert said == [f"Created the system user {GATEWAY_USER}: the gateway's nginx workers run as it."]


def test_an_existing_user_is_used_as_it_is_and_a_missing_one_is_made_in_the_existing_group(monkeypatch):
    accounts = Accounts(monkeypatch, users={GATEWAY_USER: 999}, groups={GATEWAY_USER: 995})
    assert privileges.gateway_account() == Account(999, 995) and accounts.commands == []
    accounts.users.clear()
    privileges.gateway_account()
    assert [command[0] for command in accounts.commands] == ["/usr/sbin/useradd"]


def test_one_made_meanwhile_by_another_mlserve_is_no_error(monkeypatch):
    Accounts(monkeypatch, users={}, groups={}, returncode=privileges.ALREADY_EXISTS)
    assert privileges.gateway_account() == Account(990, 990)


def test_a_failure_to_make_it_says_why(monkeypatch):
    Accounts(monkeypatch, users={}, groups={}, returncode=10)
    with pytest.raises(GatewayError) as caught:
        privileges.gateway_account()
    assert "groupadd failed" in caught.value.message and "cannot lock /etc/passwd" in (caught.value.hint or "")


def test_a_user_of_that_name_that_is_root_is_refused(monkeypatch):
    Accounts(monkeypatch, users={GATEWAY_USER: 0}, groups={GATEWAY_USER: 995})
    with pytest.raises(GatewayError, match="would run as root"):
        privileges.gateway_account()


def test_not_root_nothing_is_made_and_the_workers_run_as_the_caller(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may be run"))
    assert privileges.gateway_account() is None and privileges.gateway_group() is None


# -- the home ----------------------------------------------------------------------------------


def test_the_names_privileges_knows_are_the_homes(tmp_path):
    home = Home(tmp_path)
    assert {home.gateway_dir.name, home.run_dir("x").parent.name} == set(privileges.PASSAGES)
    assert {home.db.name, home.lock.name} == set(privileges.PRIVATE_STATE)
    assert (home.output_dir("x").parent.name,) == privileges.PRIVATE_FOLDERS


def _a_used_home(root: Path) -> None:
    root.mkdir(mode=0o755)
    (root / "state.db").write_text("")
    (root / "state.db-wal").write_text("")
    (root / "apps").mkdir(mode=0o755)
    (root / "run").mkdir(mode=0o755)
    os.chmod(root / "state.db", 0o644)
    os.chmod(root / "state.db-wal", 0o644)


def test_a_home_with_the_gateways_group_lets_it_pass_to_the_sockets_and_keeps_the_rest_to_its_owner(tmp_path):
    root = tmp_path / "home"
    group = 12346 if os.geteuid() == 0 else os.getgid()  # not root, a group of ours stands for the gateway's
    _a_used_home(root)
    seal_home(root, group)
    modes = {path.name: (_mode(path), path.stat().st_gid) for path in (root, *root.iterdir())}
    assert modes["home"] == (0o710, group)
    assert modes["run"] == modes["gateway"] == (0o710, group)
    assert {name: mode for name, (mode, _) in modes.items() if name not in ("home", "run", "gateway")} == {
        "state.db": 0o600, "state.db-wal": 0o600, "state.lock": 0o600, "apps": 0o700, "output": 0o700}


def test_without_the_gateways_group_the_home_is_its_owners_alone(tmp_path):
    root = tmp_path / "home"
    _a_used_home(root)
    seal_home(root, None)
    assert _mode(root) == 0o700 and _mode(root / "state.db") == 0o600 and _mode(root / "state.lock") == 0o600


def test_a_home_that_is_someone_elses_is_left_as_it_is(tmp_path, monkeypatch):
    root = tmp_path / "home"
    _a_used_home(root)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    seal_home(root, None)
    assert _mode(root) == 0o755 and _mode(root / "state.db") == 0o644


# -- a job's folders ---------------------------------------------------------------------------


@needs_root
def test_a_jobs_sockets_are_the_gateways_and_its_files_the_instances(tmp_path, monkeypatch):
    monkeypatch.setattr(privileges, "gateway_account", lambda: Account(12345, 12346))
    run_dir = tmp_path / "run" / "job"
    socket_dir = run_dir / "sock"
    socket_dir.mkdir(parents=True)
    os.chown(socket_dir, CONTAINER_UID, CONTAINER_UID)  # as the docker runtime's prepare makes it
    (run_dir / "manifest.json").write_text("{}")
    share_sockets(run_dir, socket_dir)
    owners = {path.relative_to(tmp_path).as_posix(): (_mode(path), path.stat().st_uid, path.stat().st_gid)
              for path in (run_dir.parent, *run_dir.parent.rglob("*"))}
    assert owners == {
        "run": (0o710, 0, 12346),
        "run/job": (0o751, 0, CONTAINER_UID),
        "run/job/uwsgi.ini": (0o640, 0, CONTAINER_UID),
        "run/job/manifest.json": (0o640, 0, CONTAINER_UID),
        "run/job/instance.log": (0o600, 0, 0),
        "run/job/sock": (0o2770, CONTAINER_UID, 12346),
    }
    assert (run_dir / "manifest.json").read_text() == "{}"  # made private, not emptied
    # Written in place later, a file keeps its mode: the runtimes' writes do just that.
    (run_dir / "uwsgi.ini").write_text("[uwsgi]\n")
    assert _mode(run_dir / "uwsgi.ini") == 0o640


def test_not_root_a_jobs_sockets_take_the_callers_group(tmp_path, monkeypatch):
    monkeypatch.setattr(privileges, "gateway_account", lambda: None)
    socket_dir = tmp_path / "run" / "job" / "sock"
    socket_dir.mkdir(parents=True, mode=0o777)
    os.chmod(socket_dir, 0o777)  # as the docker runtime's prepare makes it for a caller who is not root
    share_sockets(socket_dir.parent, socket_dir)
    assert _mode(socket_dir) == 0o2777
