"""The output limit and the local runtime's user, end to end: each job's /output is a filesystem of its
own (limits.output, 1 GiB by default) that an app cannot write past, kept in an image when the job stops;
a local instance runs as the unprivileged user and sees none of mlserve's other files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from mlserve.constants import CONTAINER_UID
from mlserve.quota import mount_points
from tests.harness import labelled_containers, make_mlserve, teardown_mlserve, wait_for

pytestmark = pytest.mark.integration

APPS = Path(__file__).parent / "apps"
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def ms(docker_client, nginx_available):
    """The `mlserve` fixture, and after its teardown: no loop device left on an image of its home."""
    home = make_mlserve()
    yield home
    teardown_mlserve(home, docker_client)
    assert str(home.home) not in _loop_devices()


def _app(tmp_path: Path, name: str = "filler", config: str | None = None) -> Path:
    target = tmp_path / name
    shutil.copytree(APPS / "filler", target)
    if config is not None:
        (target / "mlserve.yml").write_text(config)
    return target


def _mounts() -> list[str]:
    return mount_points(Path("/proc/self/mountinfo").read_text())


def _mount_options(folder: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == str(folder):
            return set(fields[5].split(","))
    return set()


def _loop_devices() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout


def _host_free(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def _instance_pids(home: Path, job_id: str) -> list[int]:
    """The local instance's processes (the uWSGI master and its workers), by the ini in their command line."""
    ini = f"{home}/run/{job_id}/uwsgi.ini".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and ini in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    return [int(value) for value in line.split()[1:]]


@contextmanager
def _read_only(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noexec", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_an_app_writing_past_its_output_limit_gets_enospc_and_the_host_disk_is_spared(ms, tmp_path):
    other = ms.json("run", "--mode", "serve", cwd=_app(tmp_path, "other"))
    out = ms.json("run", "--mode", "serve", cwd=_app(tmp_path, "full", "limits: {output: 32m}\n"))
    folder, image = ms.home / "output" / out["id"], ms.home / "volumes" / f"{out['id']}.img"
    assert {"nosuid", "nodev", "noexec"} <= _mount_options(folder)
    before = _host_free(ms.home)
    answer = requests.get(f"{out['endpoint']}/write", params={"mb": 64}, timeout=120).json()
    dropped = before - _host_free(ms.home)
    assert answer["error"] in ("ENOSPC", "EDQUOT"), answer
    assert 24 * MiB <= answer["written"] <= 32 * MiB, answer  # the limit, less ext4's own bookkeeping
    # At most the image's 32 MiB, with room for what else writes meanwhile (logs): never the 64 MB asked.
    assert dropped <= 48 * MiB, f"the host's disk lost {dropped / MiB:.1f} MiB"
    assert image.stat().st_size == 32 * MiB and image.stat().st_blocks * 512 <= 32 * MiB
    # A full /output is the app's problem alone: it still answers, and so does another project's job.
    assert requests.get(out["endpoint"], timeout=10).json()["job"] == out["job"]
    assert requests.get(other["endpoint"], timeout=10).json()["job"] == other["job"]


def test_output_is_1_gib_by_default_and_a_stopped_jobs_files_stay_in_its_image(ms, tmp_path):
    out = ms.json("run", "--mode", "serve", cwd=_app(tmp_path))
    space = requests.get(f"{out['endpoint']}/space", timeout=10).json()
    assert 0.9 * GiB < space["total"] <= GiB, space  # not the host's disk: /output's own filesystem
    assert requests.get(f"{out['endpoint']}/write", params={"mb": 2, "name": "kept"}, timeout=60).json()["error"] is None
    folder, image = ms.home / "output" / out["id"], ms.home / "volumes" / f"{out['id']}.img"
    assert str(folder) in _mounts() and str(image) in _loop_devices()
    ms("stop", out["job"])
    assert str(folder) not in _mounts() and str(image) not in _loop_devices()  # no loop device held
    with _read_only(image, tmp_path / "look") as look:
        assert (look / "kept").stat().st_size == 2 * MiB


@pytest.mark.parametrize("value, expected", [("0", "limits.output must be a size of at least 1m"),
                                             ("100k", "limits.output must be a size of at least 1m"),
                                             ("-1g", "limits.output must be a size such as 512m or 2g")])
def test_a_zero_or_negative_output_limit_is_refused_before_anything_is_built(ms, docker_client, tmp_path, value,
                                                                           expected):
    result = ms("run", "--mode", "serve", cwd=_app(tmp_path, "bad", f"limits: {{output: {value}}}\n"), check=False)
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert "Building" not in result.stdout + result.stderr
    _assert_nothing_left(ms, docker_client)


def _assert_nothing_left(ms, docker_client) -> None:
    assert ms.json("status", "--all") == []
    assert not labelled_containers(docker_client, ms.home)
    assert not docker_client.images.list(name="mlserve/tester-bad")
    assert not [p for p in _mounts() if p.startswith(f"{ms.home}/")]
    for folder in ("volumes", "output", "run"):
        assert not list((ms.home / folder).glob("*")), folder


def test_a_local_instance_runs_unprivileged_with_its_own_limited_output_and_none_of_mlserves_files(ms, tmp_path):
    out = ms.json("run", "--mode", "serve", "--runtime", "local", cwd=_app(tmp_path, "local", "limits: {output: 32m}\n"))
    me = requests.get(out["endpoint"], timeout=10).json()
    assert (me["uid"], me["gid"], me["groups"]) == (CONTAINER_UID, CONTAINER_UID, [])
    pids = _instance_pids(ms.home, out["id"])
    assert len(pids) == 3, pids  # the uWSGI master and its 2 workers
    assert all(_uids(pid) == [CONTAINER_UID] * 4 for pid in pids), {pid: _uids(pid) for pid in pids}
    # Its own folders only: not the state (every project's values), not the home's other folders.
    for path in (ms.home / "state.db", ms.home / "gateway"):
        assert "error" in requests.get(f"{out['endpoint']}/read", params={"path": str(path)}, timeout=10).json(), path
    assert requests.get(f"{out['endpoint']}/read", params={"path": "/etc/os-release"}, timeout=10).json() == {
        "read": 64}  # what any user may read, it may
    assert requests.get(f"{out['endpoint']}/space", timeout=10).json()["total"] <= 32 * MiB
    answer = requests.get(f"{out['endpoint']}/write", params={"mb": 64}, timeout=120).json()
    assert answer["error"] in ("ENOSPC", "EDQUOT") and answer["written"] <= 32 * MiB, answer


def test_an_instance_started_again_after_its_mount_was_lost_finds_its_files(ms, tmp_path):
    out = ms.json("run", "--mode", "serve", "--runtime", "local", cwd=_app(tmp_path))
    assert requests.get(f"{out['endpoint']}/write", params={"mb": 1, "name": "before"}, timeout=60).json()["error"] is None
    folder = ms.home / "output" / out["id"]
    # As a reboot would: the mount is gone, the instance dies.
    subprocess.run(["umount", "--lazy", str(folder)], check=True)
    for pid in _instance_pids(ms.home, out["id"]):
        os.kill(pid, signal.SIGKILL)
    back = wait_for(lambda: (job := ms.jobs()[out["job"]])["healthy"] and job["restarts"] >= 1, timeout=60)
    assert back, ms.jobs()
    seen = requests.get(f"{out['endpoint']}/read", params={"path": str(folder / "before")}, timeout=10).json()
    assert seen == {"read": 64}, seen
    assert requests.get(f"{out['endpoint']}/space", timeout=10).json()["total"] <= GiB
    assert _mounts().count(str(folder)) == 1


def test_a_stopped_jobs_loop_device_is_freed_while_another_local_instance_runs(ms, tmp_path):
    project = _app(tmp_path)
    first = ms.json("run", "--mode", "serve", "--runtime", "local", cwd=project)
    ms("scale", "2", cwd=project)  # the second instance starts while the first one's /output is mounted
    ms("stop", first["job"])
    image = ms.home / "volumes" / f"{first['id']}.img"
    assert image.exists() and str(image) not in _loop_devices()


def test_files_written_before_the_job_had_a_limit_move_into_its_new_filesystem(ms, tmp_path):
    out = ms.json("run", "--mode", "serve", "--runtime", "local", cwd=_app(tmp_path))
    folder, image = ms.home / "output" / out["id"], ms.home / "volumes" / f"{out['id']}.img"
    # As an instance started by an mlserve without output limits left it: files in a bare folder, no image.
    subprocess.run(["umount", "--lazy", str(folder)], check=True)
    image.unlink()
    older = folder / "older"
    older.write_bytes(b"x" * 100)
    os.chown(older, CONTAINER_UID, CONTAINER_UID)
    older.chmod(0o640)
    for pid in _instance_pids(ms.home, out["id"]):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: (job := ms.jobs()[out["job"]])["healthy"] and job["restarts"] >= 1, timeout=60)
    assert str(folder) in _mounts() and image.exists()
    seen = requests.get(f"{out['endpoint']}/read", params={"path": str(older)}, timeout=10).json()
    assert seen == {"read": 64}, seen
    kept = older.stat()
    assert (kept.st_uid, kept.st_mode & 0o777, kept.st_size) == (CONTAINER_UID, 0o640, 100)
    assert sorted(p.name for p in folder.parent.iterdir()) == [out["id"]]  # nothing left beside it
