"""The one door to the Docker SDK: what Engine's calls answer on the real engine, and that an engine
which does not answer comes out as EngineUnavailableError with advice, never as an SDK exception."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Callable, Iterator

import docker
import docker.errors
import pytest

from mlserve.constants import LABEL_PREFIX, LOCAL_BASE_IMAGE
from mlserve.engine import START_ADVICE, Engine
from mlserve.errors import EngineUnavailableError, MlserveError

NOWHERE = "unix:///nonexistent.sock"


def a_tar(files: dict[str, bytes]) -> Iterator[bytes]:
    """A root file system holding ``files``, as the chunks `docker import` reads."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return (data[i:i + 4096] for i in range(0, len(data), 4096))


def a_tag() -> str:
    return f"mlserve/test-engine:{uuid.uuid4().hex[:12]}"


# an engine that does not answer ----------------------------------------------------------

def test_connect_to_an_unreachable_engine_gives_advice(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    with pytest.raises(EngineUnavailableError) as caught:
        Engine.connect(timeout=5)
    assert caught.value.message == f"the Docker engine at DOCKER_HOST={NOWHERE} is not reachable while connecting"
    assert caught.value.hint == START_ADVICE and "mlserve setup" in caught.value.hint


@pytest.fixture
def gone(monkeypatch) -> Engine:
    """An Engine whose engine stopped answering after it connected (the version is pinned, so nothing is asked yet)."""
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    return Engine(docker.DockerClient(base_url=NOWHERE, version="1.41", timeout=5))


CALLS: dict[str, Callable[[Engine], object]] = {
    "looking up image": lambda engine: engine.image_exists(LOCAL_BASE_IMAGE),
    "pulling": lambda engine: engine.pull("python:3.11-slim"),
    "removing the image": lambda engine: engine.untag("mlserve/test-engine:none"),
    "listing containers": lambda engine: engine.containers({f"{LABEL_PREFIX}.test": "x"}),
    "looking up container": lambda engine: engine.container("0" * 64),
    "importing": lambda engine: engine.import_image(a_tar({"hello.txt": b"hi\n"}), a_tag()),
}


@pytest.mark.parametrize("action", CALLS)
def test_each_call_on_an_engine_that_went_away_gives_advice(gone, action):
    with pytest.raises(EngineUnavailableError) as caught:
        CALLS[action](gone)
    assert caught.value.message.startswith(f"the Docker engine at DOCKER_HOST={NOWHERE} is not reachable while {action}")
    assert caught.value.hint == START_ADVICE


def test_close_needs_no_answer(gone):
    gone.close()


# the real engine ---------------------------------------------------------------------------

@pytest.fixture
def engine(docker_client) -> Engine:
    """The session's client (conftest skips, or fails under MLSERVE_REQUIRE_ENGINE, without an engine)."""
    return Engine(docker_client)


@pytest.mark.integration
def test_image_exists(engine):
    assert engine.image_exists(LOCAL_BASE_IMAGE) is True
    assert engine.image_exists(f"mlserve/no-such-image-{uuid.uuid4().hex}:latest") is False


@pytest.mark.integration
def test_untag_of_a_missing_tag_is_quiet(engine):
    engine.untag(f"mlserve/no-such-image-{uuid.uuid4().hex}:latest")


@pytest.mark.integration
def test_nothing_is_found_by_a_label_nobody_uses(engine):
    assert engine.containers({f"{LABEL_PREFIX}.test-nobody": uuid.uuid4().hex}) == []
    assert engine.container(uuid.uuid4().hex * 2) is None


@pytest.mark.integration
def test_import_image_makes_the_image_with_its_changes_and_untag_removes_it(engine, docker_client):
    tag = a_tag()
    label = f"{LABEL_PREFIX}.test"
    try:
        engine.import_image(a_tar({"hello.txt": b"hi\n"}), tag, [f"LABEL {label}=imported", 'CMD ["cat", "/hello.txt"]'])
        assert engine.image_exists(tag)
        config = docker_client.images.get(tag).attrs["Config"]
        assert config["Labels"] == {label: "imported"} and config["Cmd"] == ["cat", "/hello.txt"]
        engine.untag(tag)
        assert not engine.image_exists(tag)
    finally:
        try:
            docker_client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass


@pytest.mark.integration
def test_import_of_something_not_a_tar_is_an_mlserve_error(engine):
    tag = a_tag()
    with pytest.raises(MlserveError, match=rf"Docker failed while importing {tag}: .*tar"):
        engine.import_image(iter([b"not a tar at all" * 64]), tag)
    assert not engine.image_exists(tag)


@pytest.mark.integration
def test_connect_and_close(docker_client):
    engine = Engine.connect(timeout=10)
    try:
        assert engine.image_exists(LOCAL_BASE_IMAGE)
    finally:
        engine.close()
