"""The output limit's pure parts: reading mount tables, the format command, the checks made before
anything is mounted, and the limit in mlserve.yml and stored job specs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mlserve import quota
from mlserve.config import Limits, load_config
from mlserve.errors import JobStartError, ProjectConfigError
from mlserve.home import Home
from mlserve.quota import OutputQuotaError, OutputVolume, mkfs_command, mount_points, mounted_under
from mlserve.spec import Artifact, JobSpec

REAL_MOUNT = OutputVolume.mount  # the unit tier's conftest makes it a no-op; these tests run it, commands faked
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
43 27 7:0 / /tmp/h/output/abc rw,nosuid,nodev,noexec,relatime - ext4 /dev/loop0 rw
44 27 7:1 / /tmp/h/output/with\\040space rw,nosuid,nodev,noexec,relatime shared:5 - ext4 /dev/loop1 rw
45 43 0:50 / /tmp/h/output/abc/deeper rw - tmpfs tmpfs rw
46 27 7:2 / /tmp/hx/output/other rw - ext4 /dev/loop2 rw
"""


def test_mount_points_are_read_in_order_with_escapes_decoded():
    assert mount_points(MOUNTINFO) == ["/proc", "/", "/tmp/h/output/abc", "/tmp/h/output/with space",
                                       "/tmp/h/output/abc/deeper", "/tmp/hx/output/other"]


def test_mounts_under_a_home_are_listed_deepest_first_and_a_neighbour_with_the_same_prefix_is_not():
    found = mounted_under(Path("/tmp/h"), MOUNTINFO)
    assert found[0] == Path("/tmp/h/output/abc/deeper")
    assert set(found) == {Path("/tmp/h/output/abc"), Path("/tmp/h/output/with space"),
                          Path("/tmp/h/output/abc/deeper")}
    assert mounted_under(Path("/tmp/h/output/abc"), MOUNTINFO) == [Path("/tmp/h/output/abc/deeper"),
                                                                   Path("/tmp/h/output/abc")]


def test_the_image_is_formatted_sparse_with_nothing_reserved_and_its_root_the_instances():
    command = mkfs_command(Path("/h/volumes/j.img"), uid=65534)
    assert Path(command[0]).name == "mkfs.ext4" and command[-1] == "/h/volumes/j.img"
    assert command[command.index("-m") + 1] == "0"
    extended = command[command.index("-E") + 1].split(",")
    assert {"lazy_itable_init=1", "lazy_journal_init=1", "root_owner=65534:65534"} <= set(extended)


def test_a_jobs_volume_is_its_output_folder_and_an_image_in_the_homes_volumes(tmp_path):
    volume = OutputVolume.of(Home(tmp_path), "J0b")
    assert volume.folder == Home(tmp_path).output_dir("J0b")
    assert volume.image == tmp_path / "volumes" / "J0b.img"


@pytest.fixture
def commands(monkeypatch) -> list[list[str]]:
    """No mounts in this machine's table; the commands quota would run are recorded, not run."""
    ran: list[list[str]] = []
    monkeypatch.setattr(OutputVolume, "mount", REAL_MOUNT)
    monkeypatch.setattr(quota, "_current_mounts", lambda: MOUNTINFO)
    monkeypatch.setattr(quota, "_run", lambda command: ran.append(command) or subprocess.CompletedProcess(command, 0))
    return ran


def _volume(tmp_path) -> OutputVolume:
    volume = OutputVolume.of(Home(tmp_path), "job1")
    volume.folder.mkdir(parents=True)
    return volume


def test_without_root_mounting_fails_clearly_and_makes_nothing(tmp_path, monkeypatch, commands):
    monkeypatch.setattr(quota.os, "geteuid", lambda: 1000)
    volume = _volume(tmp_path)
    with pytest.raises(OutputQuotaError) as raised:
        volume.mount(1 << 30)
    assert isinstance(raised.value, JobStartError)
    assert "needs root" in raised.value.message and raised.value.hint
    assert commands == [] and not volume.image.exists()


def test_a_limit_too_small_for_a_filesystem_fails_clearly_and_makes_nothing(tmp_path, monkeypatch, commands):
    monkeypatch.setattr(quota.os, "geteuid", lambda: 0)
    volume = _volume(tmp_path)
    with pytest.raises(OutputQuotaError, match="at least 1 MiB"):
        volume.mount(64 << 10)
    assert commands == [] and not volume.image.exists()


def test_a_mounted_folder_is_left_as_it_is(tmp_path, monkeypatch, commands):
    monkeypatch.setattr(quota.os, "geteuid", lambda: 1000)  # no root needed to see there is nothing to do
    volume = OutputVolume(tmp_path / "volumes" / "abc.img", Path("/tmp/h/output/abc"))
    volume.mount(1 << 30)
    assert commands == []


def test_a_folder_that_cannot_be_unmounted_is_not_deleted_nor_is_its_image(tmp_path, monkeypatch, commands):
    monkeypatch.setattr(quota, "_run", lambda command: commands.append(command) or subprocess.CompletedProcess(command, 32))
    volume = OutputVolume(tmp_path / "volumes" / "abc.img", Path("/tmp/h/output/abc"))  # "mounted", stays so
    volume.image.parent.mkdir()
    volume.image.write_bytes(b"the job's files")
    volume.delete()
    assert ["umount", "--lazy", "/tmp/h/output/abc"] in commands
    assert volume.image.read_bytes() == b"the job's files"


def test_deleting_an_unmounted_volume_removes_folder_and_image_without_unmounting(tmp_path, commands):
    volume = _volume(tmp_path)
    (volume.folder / "file").write_text("x")
    volume.image.parent.mkdir(exist_ok=True)
    volume.image.write_bytes(b"fs")
    volume.delete()
    assert commands == [] and not volume.folder.exists() and not volume.image.exists()


# -- the limit in mlserve.yml and in stored specs ---------------------------------------------


def _config(tmp_path, text: str):
    (tmp_path / "mlserve.yml").write_text(text)
    return load_config(tmp_path)


def test_output_defaults_to_1_gib_and_takes_a_size(tmp_path):
    assert Limits().output_bytes == 1 << 30
    assert _config(tmp_path, "limits: {output: 32m}").limits.output_bytes == 32 << 20
    assert _config(tmp_path, "limits: {output: 2g, memory: 1g}").limits == Limits(memory_bytes=1 << 30,
                                                                                  output_bytes=2 << 30)


@pytest.mark.parametrize("value, form", [("0", "a size of at least 1m"), ("512k", "a size of at least 1m"), ("-1g", "a size such as 512m or 2g"),
                                         ("lots", "a size such as 512m or 2g")])
def test_an_output_limit_that_is_not_a_positive_size_is_refused(tmp_path, value, form):
    with pytest.raises(ProjectConfigError, match=f"limits.output must be {form}"):
        _config(tmp_path, f"limits: {{output: {value}}}")


def test_a_spec_stored_before_the_output_limit_gets_the_default():
    stored = json.loads(JobSpec("docker", Artifact("mlserve/a-p:1"), "/p", limits=Limits(memory_bytes=1 << 30)).to_json())
    del stored["limits"]["output_bytes"]
    spec = JobSpec.from_json(json.dumps(stored))
    assert spec.limits == Limits(memory_bytes=1 << 30, output_bytes=1 << 30)
