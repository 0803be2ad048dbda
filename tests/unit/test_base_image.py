"""The base image builds start from: present, pulled, or made by debootstrap; with fakes for the
client's images under a real Engine, and for subprocess.run. One check imports into the real engine."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest

from mlserve import base_image
from mlserve.constants import LOCAL_BASE_IMAGE
from mlserve.engine import Engine
from mlserve.errors import SetupError

from .host_fakes import ALL_PROGRAMS, Install, make_machine

DEFAULT_IMAGE = "python:3.11-slim"
UNREACHABLE = docker.errors.APIError("500", explanation='Get "https://registry-1.docker.io/v2/": no such host')


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Install:
    return make_machine(monkeypatch, tmp_path)


class FakeImages:
    def __init__(self, present: set[str], pull_error: Exception | None = None, pull_blocks: bool = False) -> None:
        self.present = set(present)
        self.pull_error = pull_error
        self.pull_blocks = pull_blocks
        self.pulled: list[str] = []
        self.release = threading.Event()

    def get(self, ref: str) -> str:
        if ref not in self.present:
            raise docker.errors.ImageNotFound(ref)
        return ref

    def pull(self, ref: str) -> None:
        self.pulled.append(ref)
        if self.pull_blocks:
            self.release.wait(10)
        if self.pull_error:
            raise self.pull_error
        self.present.add(ref)


def fake_engine(images: FakeImages) -> Engine:
    """The real Engine over a client whose images are fake: its error handling is what runs."""
    return Engine(SimpleNamespace(images=images))


@pytest.fixture
def builds(machine, monkeypatch):
    machine(ALL_PROGRAMS)
    built: list[str] = []
    monkeypatch.setattr(base_image, "build_local_base", lambda engine, tag, report: built.append(tag))
    return built


@pytest.mark.parametrize("present, expected", [
    ({DEFAULT_IMAGE}, DEFAULT_IMAGE),
    ({LOCAL_BASE_IMAGE}, LOCAL_BASE_IMAGE),
    ({DEFAULT_IMAGE, LOCAL_BASE_IMAGE}, DEFAULT_IMAGE),
])
def test_a_present_base_is_enough(builds, present, expected):
    images = FakeImages(present)
    assert base_image.ensure_base_image(lambda _: None, fake_engine(images)) == expected
    assert images.pulled == [] and builds == []


def test_pulls_the_default_when_it_can(builds):
    images = FakeImages(set())
    assert base_image.ensure_base_image(lambda _: None, fake_engine(images)) == DEFAULT_IMAGE
    assert images.pulled == [DEFAULT_IMAGE] and builds == []


def test_builds_the_local_base_when_nothing_can_be_pulled(builds):
    messages: list[str] = []
    images = FakeImages(set(), pull_error=UNREACHABLE)
    assert base_image.ensure_base_image(messages.append, fake_engine(images), tag="mlserve/base:x") == "mlserve/base:x"
    assert builds == ["mlserve/base:x"]
    assert any("cannot pull (Get \"https://registry-1.docker.io/v2/\": no such host)" in m for m in messages)


def test_a_hanging_pull_is_given_up(builds, monkeypatch):
    monkeypatch.setattr(base_image, "PULL_TIMEOUT_S", 0.2)
    images = FakeImages(set(), pull_blocks=True, pull_error=UNREACHABLE)
    started = time.monotonic()
    try:
        assert base_image.pull(fake_engine(images), DEFAULT_IMAGE, lambda _: None, timeout=0.2) is False
    finally:
        images.release.set()
    assert time.monotonic() - started < 2


def test_not_root_cannot_build_the_base(builds, monkeypatch):
    monkeypatch.setattr(base_image.os, "geteuid", lambda: 1000)
    with pytest.raises(SetupError, match="cannot be pulled") as caught:
        base_image.ensure_base_image(lambda _: None, fake_engine(FakeImages(set(), pull_error=UNREACHABLE)))
    assert "as root" in caught.value.hint and builds == []


def test_debootstrap_command_and_cleanup(machine, monkeypatch):
    _, run = machine(ALL_PROGRAMS)
    imported: list[tuple[Path, str, int]] = []

    def fake_import(engine, root: Path, tag: str) -> None:
        (root / "etc").mkdir()  # what debootstrap would have left
        imported.append((root, tag, root.stat().st_mode & 0o777))

    monkeypatch.setattr(base_image, "import_tree", fake_import)
    base_image.build_local_base(object(), "mlserve/base:x", lambda _: None)
    [(command, _)] = run.calls
    root, tag, mode = imported[0]
    assert command == [
        "/usr/sbin/debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
        "bookworm", str(root), "http://deb.debian.org/debian",
    ]
    assert tag == "mlserve/base:x" and mode == 0o755  # the image's / must be traversable by uid 65534
    assert not root.exists()


def test_debootstrap_failure_is_reported_and_cleaned_up(machine, monkeypatch):
    _, run = machine(ALL_PROGRAMS, returncode=1, output="E: Failed getting release file http://deb.debian.org/...\n")
    monkeypatch.setattr(base_image, "import_tree", lambda *a: pytest.fail("imported a failed tree"))
    with pytest.raises(SetupError, match=r"debootstrap failed \(exit 1\)") as caught:
        base_image.build_local_base(object(), "mlserve/base:x", lambda _: None)
    assert "Failed getting release file" in caught.value.hint
    assert not Path(run.calls[0][0][4]).exists()


@pytest.mark.integration
def test_import_tree_makes_a_labelled_image(docker_client, tmp_path):
    (tmp_path / "hello.txt").write_text("hi\n")
    tag = f"mlserve/test-import:{uuid.uuid4().hex[:12]}"
    try:
        base_image.import_tree(Engine(docker_client), tmp_path, tag)
        config = docker_client.images.get(tag).attrs["Config"]
        assert config["Labels"] == {base_image.LABEL_BASE: "debootstrap-bookworm"}
        assert config["Cmd"] == ["python3"] and "LANG=C.UTF-8" in config["Env"]
    finally:
        try:
            docker_client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass
