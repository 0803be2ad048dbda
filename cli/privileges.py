"""Who may reach what in a home that mlserve runs as root.

nginx's workers face the network, so they run as a system user of their own (GATEWAY_USER), which
reaches the instances' sockets and nothing more. Its group is the key: the folders on the way to the
sockets let it pass (search, never list), the sockets let it in, and nothing else lets it read. No
other user enters the home at all.

    $MLSERVE_HOME                  root:gateway      0710
      state.db, state.lock         root              0600  SQLite gives -wal and -shm the database's mode
      output/, and all the rest    root              0700
      run/                         root:gateway      0710
        <job id>/                  root:instance     0751  the instance reads its files, the workers pass
          uwsgi.ini, manifest.json root:instance     0640
          instance.log             root              0600
          sock/                    instance:gateway  2770  sockets made inside take its group (uWSGI: 0660)
      gateway/                     root:gateway      0710
        logs, routes, nginx.conf   root              0600  nginx's master opens the logs as root
        tmp/                       root:gateway      0710
          body/, uwsgi/, ...       gateway:gateway   0700  where the workers spool bodies

A folder above the home that the workers could not pass (root's home folder, /root, is 0700) gets an
ACL entry that lets the gateway's user search it, and nothing else.

Not root, nginx's workers run as the caller, who owns all of it: the home is 0700, and a job's socket
folder is set-group-id, so that the sockets a container's user makes there take the caller's group.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .constants import CONTAINER_UID, GATEWAY_USER, INSTANCE_LOG_NAME, MANIFEST_NAME, UWSGI_INI_NAME
from .errors import GatewayError
from .programs import Report, find_program, tail

PASSAGES = ("run", "gateway")  # the home's folders on the workers' way (Home.run_dir's parent, Home.gateway_dir)
PRIVATE_STATE = ("state.db", "state.lock")  # Home.db and Home.lock, made 0600 before SQLite and the lock open them
PRIVATE_FOLDERS = ("output",)  # Home.output_dir's parent, made 0700 before a job's folder is made in it
INSTANCE_READS = (UWSGI_INI_NAME, MANIFEST_NAME)  # in a job's run folder
ALREADY_EXISTS = 9  # useradd's and groupadd's exit status: another mlserve made it meanwhile

# A POSIX access ACL as Linux stores it: a version, then (tag, permissions, id) entries sorted by tag and id.
ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_SEARCH = 0o1


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int


def gateway_group() -> int | None:
    """The gateway's group when mlserve runs as root and the group exists; nothing is created here."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(GATEWAY_USER).gr_gid
    except KeyError:
        return None


def gateway_account(report: Report | None = None) -> Account | None:
    """The user and group nginx's workers run as, created when missing (a system user without a home
    or a shell); None when mlserve is not root, as nginx's workers then run as the caller.

    Raises GatewayError when they cannot be created, or when that name is root's.
    """
    if os.geteuid() != 0:
        return None
    account = _lookup()
    if account is None:
        _create()
        account = _lookup()
        if account is None:
            raise GatewayError(f"the gateway's user {GATEWAY_USER} was created, yet it cannot be found")
        if report:
            report(f"Created the system user {GATEWAY_USER}: the gateway's nginx workers run as it.")
    if 0 in (account.uid, account.gid):
        raise GatewayError(f"the user or group {GATEWAY_USER} is root's: the gateway's workers would run as root",
                           f"Remove them (`userdel {GATEWAY_USER}; groupdel {GATEWAY_USER}`); mlserve makes new ones.")
    return account


def _lookup() -> Account | None:
    try:
        return Account(pwd.getpwnam(GATEWAY_USER).pw_uid, grp.getgrnam(GATEWAY_USER).gr_gid)
    except KeyError:
        return None


def _create() -> None:
    commands = []
    try:
        grp.getgrnam(GATEWAY_USER)
    except KeyError:
        commands.append(["groupadd", "--system", GATEWAY_USER])
    try:
        pwd.getpwnam(GATEWAY_USER)
    except KeyError:
        commands.append(["useradd", "--system", "--gid", GATEWAY_USER, "--no-create-home", "--home-dir", "/nonexistent",
                         "--shell", "/usr/sbin/nologin", "--comment", "mlserve gateway workers", GATEWAY_USER])
    for command in commands:
        program = find_program(command[0])
        if program is None:
            raise GatewayError(f"cannot create the gateway's user {GATEWAY_USER}: {command[0]} is not installed",
                               "Install it with `apt-get install -y passwd`.")
        done = subprocess.run([program, *command[1:]], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode not in (0, ALREADY_EXISTS):
            raise GatewayError(f"cannot create the gateway's user {GATEWAY_USER}: {command[0]} failed",
                               tail(done.stdout + done.stderr))


# -- the home ----------------------------------------------------------------------------------


def seal_home(root: Path, group: int | None) -> None:
    """Make the home private: no one but its owner enters it, or with ``group`` (the gateway's) that
    group too, which may pass through it and its PASSAGES and read nothing. A home that is not this
    user's own is left as it is."""
    if root.stat().st_uid != os.geteuid():
        return
    for name in PRIVATE_STATE:
        _make_file(root / name, None, 0o600)
    for name in PRIVATE_FOLDERS:
        (root / name).mkdir(mode=0o700, exist_ok=True)
    for entry in root.iterdir():
        if entry.name not in PASSAGES:
            _keep_to_owner(entry)
    if group is None:
        root.chmod(0o700)
        return
    for name in PASSAGES:
        (root / name).mkdir(exist_ok=True)
        _set(root / name, os.geteuid(), group, 0o710)
    _set(root, os.geteuid(), group, 0o710)


def prepare_gateway(home: Path, gateway_dir: Path, worker_folders: Iterable[str], private_files: Iterable[str]) -> None:
    """Make ``gateway_dir`` ready for nginx: ``worker_folders`` its workers' own (0700), ``private_files``
    0600 (made now: nginx and mlserve write them in place, which keeps the mode), the home sealed, and
    every folder on the workers' way to the sockets passable. Creates the gateway's user when missing.

    Raises GatewayError when that user cannot be made, or a folder above the home cannot let it pass.
    """
    account = gateway_account()
    seal_home(home, account.gid if account else None)
    gateway_dir.mkdir(parents=True, exist_ok=True)
    for name in private_files:
        _make_file(gateway_dir / name, None, 0o600)
    for name in worker_folders:
        folder = gateway_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if account:
            _set(folder.parent, 0, account.gid, 0o710)
            _set(folder, account.uid, account.gid, 0o700)
    if account:
        let_pass(home, account.uid)


def share_sockets(run_dir: Path, socket_dir: Path) -> None:
    """Let the gateway's workers reach the sockets in a job's ``socket_dir`` and nothing else of its
    ``run_dir``, where the instance reads its configuration. The runtime chose ``socket_dir``'s owner
    (the instance's user); sockets made in it take its group. Creates the gateway's user when missing.

    Raises GatewayError when that user cannot be made.
    """
    account = gateway_account()
    if account is None:  # nginx's workers run as the caller: sockets take the caller's group
        socket_dir.chmod(stat.S_IMODE(socket_dir.stat().st_mode) | stat.S_ISGID)
        return
    _set(run_dir.parent, 0, account.gid, 0o710)
    _set(run_dir, 0, CONTAINER_UID, 0o751)
    # Made now with their modes: the runtimes write them in place (open and truncate), which keeps both.
    for name in INSTANCE_READS:
        _make_file(run_dir / name, CONTAINER_UID, 0o640)
    _make_file(run_dir / INSTANCE_LOG_NAME, None, 0o600)
    os.chown(socket_dir, -1, account.gid)
    socket_dir.chmod(0o2770)


def _set(path: Path, uid: int, gid: int, mode: int) -> None:
    os.chown(path, uid, gid)
    path.chmod(mode)  # after chown, which may clear the set-group-id bit


def _make_file(path: Path, gid: int | None, mode: int) -> None:
    """Give ``path`` (a file, made empty when missing) group ``gid`` (None: as it is) and ``mode``."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _keep_to_owner(path: Path) -> None:
    mode = path.lstat().st_mode
    if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o7077:
        path.chmod(stat.S_IMODE(mode) & 0o700)


# -- folders above the home --------------------------------------------------------------------


def let_pass(home: Path, uid: int) -> None:
    """Let ``uid`` search every folder above ``home`` that would stop it, with an ACL entry that allows
    only that. Raises GatewayError when a folder takes no ACL."""
    for folder in reversed(home.parents):
        mode = folder.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        try:
            current: bytes | None = os.getxattr(folder, ACL_XATTR)
        except OSError:  # none (only the mode bits), or the file system has no ACLs: setting one says which
            current = None
        wanted = acl_letting_search(current, mode, uid)
        if wanted is None:
            continue
        try:
            os.setxattr(folder, ACL_XATTR, wanted)
        except OSError as exc:
            raise GatewayError(
                f"the gateway's workers ({GATEWAY_USER}) cannot pass through {folder} to the instances' sockets, "
                f"and it takes no ACL entry that would let them ({exc.strerror})",
                f"Use an MLSERVE_HOME they can reach, such as /var/lib/mlserve, or `chmod o+x {folder}`.",
            ) from None


def acl_letting_search(acl: bytes | None, mode: int, uid: int) -> bytes | None:
    """A folder's access ACL (``acl``; None when it has only its ``mode`` bits) that also lets ``uid``
    search it, and changes nothing else; None when ``uid``'s entry lets it search already.

    The mask caps every named entry, so it gains search too: an entry that asked for search and was
    masked gets it as well.
    """
    if acl:
        entries = {(tag, id_): perm for tag, perm, id_ in _ACL_ENTRY.iter_unpack(acl[_ACL_VERSION.size:])}
    else:
        entries = {(_USER_OBJ, _NO_ID): mode >> 6 & 7, (_GROUP_OBJ, _NO_ID): mode >> 3 & 7, (_OTHER, _NO_ID): mode & 7}
    mask = entries.get((_MASK, _NO_ID), entries[(_GROUP_OBJ, _NO_ID)])
    own = entries.get((_USER, uid), 0)
    if own & mask & _SEARCH:
        return None
    entries[(_USER, uid)] = own | _SEARCH
    entries[(_MASK, _NO_ID)] = mask | _SEARCH
    packed = (_ACL_ENTRY.pack(tag, perm, id_) for (tag, id_), perm in sorted(entries.items()))
    return _ACL_VERSION.pack(2) + b"".join(packed)
