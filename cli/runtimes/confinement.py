"""A local instance as an unprivileged user that sees its own folders and nothing else of mlserve's.

mlserve's home is private (root's and its gateway's), often inside another private folder (/root,
where pyenv's Python lives too): the instance's user could not reach its own venv there, and
opening the way for it would open it to the state (every project's environment values) and to
every other job's files. So the instance starts in a mount namespace of its own, in which each folder
on the way to what it needs that its user cannot enter is covered by an empty tmpfs holding only
those paths: its app, venv, Python and data read-only, its run folder and output as they are (their
owners and modes decide: it writes only its socket folder and /output). Then it drops to the user,
without groups or a way back to privileges, and runs uWSGI. The host's mounts are unchanged; the
namespace ends with the instance.

The local runtime runs this file as a script (``python -I confinement.py -- COMMAND...``) when
mlserve is root. The standard library only; the instance's environment arrives on stdin, so nothing
a job spec sets (LD_PRELOAD, PYTHONPATH) reaches this process while it is root.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def can_search(path: str, uid: int, gid: int, stat_of: Callable[[str], os.stat_result] = os.stat) -> bool:
    """Whether ``uid`` (group ``gid``, no others) may enter the folder ``path``, by its mode bits
    (ACLs are not read: a folder they open is covered needlessly, never the other way round)."""
    info = stat_of(path)
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another one of them (seen through it already), sorted."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path.startswith(outer.rstrip("/") + "/") for outer in kept):
            kept.append(path)
    return kept


def covers(paths: Iterable[str], enterable: Callable[[str], bool]) -> list[str]:
    """The folders to cover with a tmpfs: for each path, the first folder on the way to it (from /)
    that cannot be entered; those inside another cover are covered by it."""
    found = []
    for path in paths:
        for folder in reversed(Path(path).parents[:-1]):  # from the top; / itself is never covered
            if not enterable(str(folder)):
                found.append(str(folder))
                break
    return outermost(found)


def python_home(venv: str) -> str | None:
    """The Python installation a venv was made from (pyvenv.cfg's ``home`` is its bin folder)."""
    try:
        lines = Path(venv, "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return str(Path(value.strip()).resolve().parent)
    return None


def start(command: list[str], env: dict[str, str], log: IO[bytes], *, readable: Iterable[str],
          writable: Iterable[str], uid: int, gid: int) -> subprocess.Popen[bytes]:
    """Start ``command`` confined, its output to ``log``; its pid is the instance's once it runs."""
    request = {"env": env, "uid": uid, "gid": gid, "readable": [os.path.realpath(p) for p in readable],
               "writable": [os.path.realpath(p) for p in writable]}
    process = subprocess.Popen([sys.executable, "-I", __file__, "--", *command], stdin=subprocess.PIPE,
                               stdout=log, stderr=subprocess.STDOUT, env=LAUNCHER_ENV, cwd="/",
                               start_new_session=True)
    assert process.stdin is not None
    try:
        process.stdin.write(json.dumps(request).encode())
        process.stdin.close()
    except BrokenPipeError:  # it ended already; its log says why
        pass
    return process


# -- in the launched process, as root -------------------------------------------------------


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _mount_points() -> list[str]:
    """This namespace's mount points (as quota.mount_points: this script imports nothing of mlserve's)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4]) for line in lines]


def _mount(libc: Any, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [None if value is None else value.encode() for value in (source, target, fstype, data)]
    _check(libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]),
           f"mount {source or ''} on {target}")


def confine(readable: list[str], writable: list[str], uid: int, gid: int) -> None:
    """Enter a mount namespace of our own where only these paths show through the covers, then
    become ``uid``:``gid`` for good. Raises OSError."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    paths = outermost([*readable, *writable])
    # Held open through the covers: each is bound back in from its descriptor.
    held = {path: os.open(path, os.O_PATH) for path in paths}
    tops = covers(paths, lambda folder: can_search(folder, uid, gid))
    # What else is mounted under the covers (other jobs' output filesystems) is let go, not just hidden:
    # a copy held here would keep it, and its loop device, until this instance ends. (If one cannot be
    # let go, it stays hidden: not a reason to fail the start.)
    for point in sorted(_mount_points(), key=len, reverse=True):
        needed = any(point == path or point.startswith(path + "/") for path in paths)
        if not needed and any(point.startswith(top + "/") for top in tops):
            libc.umount2(point.encode(), MNT_DETACH)
    os.umask(0o022)  # the folders made on the covers: its user must enter them
    for top in tops:
        _mount(libc, "tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
    for path in paths:
        if not any(path.startswith(top + "/") for top in tops):
            continue  # its user reaches it as it is
        if os.path.isdir(f"/proc/self/fd/{held[path]}"):
            os.makedirs(path, exist_ok=True)
        else:  # a data file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).touch()
        _mount(libc, f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC)
        if path in readable:
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for fd in held.values():
        os.close(fd)
    os.chdir("/")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no setuid program takes it back
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: confinement.py -- COMMAND... (the request as JSON on stdin)", file=sys.stderr)
        return 2
    request = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        confine(request["readable"], request["writable"], request["uid"], request["gid"])
        os.execve(argv[1], argv[1:], request["env"])
    except OSError as exc:
        print(f"mlserve: could not start the instance as uid {request['uid']}: {exc}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
