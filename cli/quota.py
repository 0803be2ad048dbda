"""Each job's output folder is a filesystem of its own, as large as the job's ``limits.output``.

The folder (``Home.output_dir``, the instance's /output) is the mount point of an ext4 image made
for the job, ``$MLSERVE_HOME/volumes/<job id>.img``: a sparse file of exactly the limit, loop-mounted
nosuid, nodev, noexec. An app that writes past it gets ENOSPC and the host's disk is untouched
beyond the image (the filesystem's own bookkeeping takes a few percent of it: the app sees a little
less than the limit, the host never gives more).

Lifetime, as the job's output had before: mounted while the job is active (mounted again, files
kept, when an instance is started after the mount was lost to a reboot); unmounted when the job
stops, its image kept with the files in it; deleted with the job's other files when a job that
never served is discarded. A stopped job holds no loop device: they are a machine-wide resource.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .constants import CONTAINER_UID
from .errors import JobStartError
from .home import Home
from .programs import find_program, tail

VOLUMES_DIR = "volumes"
MIN_OUTPUT_BYTES = 1 << 20  # ext4 needs about this much for itself; smaller images do not format
MOUNT_OPTIONS = "loop,nosuid,nodev,noexec"  # `loop` sets autoclear: the loop device goes with the mount
MOUNTINFO = Path("/proc/self/mountinfo")


class OutputQuotaError(JobStartError):
    """A job's output filesystem could not be made or mounted."""


def mount_points(mountinfo: str) -> list[str]:
    """The mount points in a /proc/<pid>/mountinfo text, in mount order (octal escapes decoded:
    a space in a path is ``\\040`` there)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(_unescape(fields[4]))
    return points


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mounted_under(root: Path, mountinfo: str) -> list[Path]:
    """The mount points at or below ``root``, deepest first (the order to unmount them in)."""
    prefix = str(root).rstrip("/") + "/"
    found = {Path(p) for p in mount_points(mountinfo) if p == str(root) or p.startswith(prefix)}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def mkfs_command(image: Path, uid: int = CONTAINER_UID) -> list[str]:
    """Format ``image`` as ext4: no blocks reserved for root (the instance's user gets them all),
    tables and journal initialised lazily (the image stays sparse: about 700 KB used for 1 GiB),
    the root folder owned by the instance's user."""
    extended = f"lazy_itable_init=1,lazy_journal_init=1,root_owner={uid}:{uid}"
    return [find_program("mkfs.ext4") or "mkfs.ext4", "-q", "-m", "0", "-E", extended, str(image)]


def _current_mounts() -> str:
    return MOUNTINFO.read_text()


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _size(size_bytes: int) -> str:
    return f"{size_bytes / (1 << 30):g} GiB" if size_bytes >= 1 << 30 else f"{size_bytes / (1 << 20):g} MiB"


def check_can_mount() -> None:
    """Raises OutputQuotaError when this process cannot mount output filesystems (it is not root)."""
    if os.geteuid() != 0:
        raise OutputQuotaError(
            "the output limit needs root: each job's /output is a filesystem image of its own, "
            "loop-mounted, and only root can mount it",
            "Run mlserve as root (e.g. with sudo).")


@dataclass(frozen=True)
class OutputVolume:
    """One job's output filesystem: ``image`` mounted on ``folder``."""

    image: Path
    folder: Path

    @classmethod
    def of(cls, home: Home, job_id: str) -> OutputVolume:
        return cls(home.root / VOLUMES_DIR / f"{job_id}.img", home.output_dir(job_id))

    @property
    def mounted(self) -> bool:
        return str(self.folder) in mount_points(_current_mounts())

    def mount(self, size_bytes: int) -> None:
        """Make the folder the root of the job's filesystem of ``size_bytes``: a no-op when it is
        mounted; the existing image (files kept) when there is one; else a new image.

        Raises OutputQuotaError (not root, no loop device, a limit too small...); a new image is
        removed again then, and the folder is as it was."""
        with self._lock():
            if self.mounted:
                return
            check_can_mount()
            if self.image.exists():
                self._mount()
                return
            if size_bytes < MIN_OUTPUT_BYTES:
                raise OutputQuotaError(f"limits.output is {size_bytes} bytes: an output filesystem needs at least "
                                       f"{_size(MIN_OUTPUT_BYTES)}", "Set e.g. `limits: {output: 64m}` in mlserve.yml.")
            self._create(size_bytes)
            try:
                self._mount_new()
            except BaseException:
                self.image.unlink(missing_ok=True)
                raise

    def unmount(self) -> bool:
        """Unmount the folder (lazily when an instance still uses it: it goes when that ends); the
        image and its files stay. True when nothing is mounted there any more. Never raises: it
        runs while stopping, where the stop matters more."""
        with self._lock():
            return self._unmount()

    def delete(self) -> None:
        """Unmount, then delete the folder and the image. If the folder cannot be unmounted, both stay:
        nothing is ever deleted through a live mount into an image. Never raises (a clean-up)."""
        if not self.unmount():
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.image.unlink(missing_ok=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # Two commands may start (or stop) one job's instance at once: one mount at a time, per home.
        self.image.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.image.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create(self, size_bytes: int) -> None:
        with open(os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as image:
            image.truncate(size_bytes)  # sparse: the host's disk is used only as the app writes
        made = _run(mkfs_command(self.image))
        if made.returncode != 0:
            self.image.unlink(missing_ok=True)
            raise OutputQuotaError(f"could not make the output filesystem ({_size(size_bytes)}) of {self.folder.name}",
                                   tail(made.stdout + made.stderr))

    def _mount(self) -> None:
        result = _run(["mount", "-o", MOUNT_OPTIONS, str(self.image), str(self.folder)])
        if result.returncode != 0:
            raise OutputQuotaError(
                f"could not mount the output filesystem of {self.folder.name}: {tail(result.stderr, 3)}",
                "Each job's /output is a loop-mounted image: this machine needs loop devices (`modprobe loop`; "
                "in a container, access to /dev/loop-control and /dev/loop*).")

    def _mount_new(self) -> None:
        """Mount a new image. Files an instance wrote in the folder before its job had a limit (an
        older mlserve) move into it, owners and modes kept; if they do not fit, all stays as it was."""
        earlier = self.folder.with_name(f".{self.folder.name}.unlimited")
        if any(self.folder.iterdir()):
            self.folder.rename(earlier)
            self.folder.mkdir()
        try:
            self._mount()
            (self.folder / "lost+found").rmdir()  # /output shows what the app wrote, nothing else
            if earlier.exists():
                copied = _run(["cp", "-a", f"{earlier}/.", f"{self.folder}/"])
                if copied.returncode != 0:
                    raise OutputQuotaError(f"the files in {self.folder}, written before its job had an output limit, "
                                           "do not fit in it", tail(copied.stderr, 3))
        except BaseException:
            if self._unmount() and earlier.exists():
                self.folder.rmdir()
                earlier.rename(self.folder)
            raise
        shutil.rmtree(earlier, ignore_errors=True)

    def _unmount(self) -> bool:
        if self.mounted:
            _unmount(self.folder)
        return not self.mounted


def unmount_all(root: Path) -> None:
    """Unmount every filesystem mounted at or below ``root`` (lazily when busy), deepest first: before
    a home is deleted, so that nothing is deleted through a mount and no loop device is left."""
    for point in mounted_under(root, _current_mounts()):
        _unmount(point)


def _unmount(point: Path) -> None:
    """Unmount now, or lazily when busy (it goes when its last user does; the loop device with it)."""
    if _run(["umount", str(point)]).returncode != 0:
        _run(["umount", "--lazy", str(point)])
