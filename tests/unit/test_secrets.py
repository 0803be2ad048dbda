"""The secrets store: names and values it refuses, file and folder modes, whole writes, listing, deleting,
and the environment an instance is started with."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

from mlserve import secrets as secrets_module
from mlserve.errors import JobStartError, UsageError
from mlserve.home import Home
from mlserve.instances import Instances
from mlserve.platform import Platform
from mlserve.secrets import MAX_VALUE_BYTES, Secrets, check_name, parse_value, read_value
from mlserve.spec import Artifact, JobSpec
from mlserve.state import Job


@pytest.fixture
def home(tmp_path) -> Home:
    (tmp_path / "home").mkdir(mode=0o700)
    return Home(tmp_path / "home")


@pytest.fixture
def store(home) -> Secrets:
    return Secrets(home, "alice", "hello")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- names and values ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["API_TOKEN", "_x", "a", "a" * 128, "PATHS", "HOMEPAGE_KEY", "MLSERVE", "LD"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "1TOKEN", "API-TOKEN", "API TOKEN", "../x", "a/b", ".x", "ÄPI", "a" * 129,
                                  "A=B"])
def test_names_that_are_not_environment_variables_are_refused(name):
    with pytest.raises(UsageError, match="not a valid secret name"):
        check_name(name)


@pytest.mark.parametrize("name", ["OUTPUT_DIR", "LOG_FILE", "LOG_FILE_MAX_BYTES", "MANIFEST_FILE", "MLSERVE_JOB",
                                  "MLSERVE_HEALTH_PATH", "PATH", "HOME", "home", "PYTHONPATH", "pythonstartup",
                                  "LD_PRELOAD", "UWSGI_INI", "Uwsgi_master"])
def test_names_mlserve_sets_or_that_steer_the_process_are_refused(name):
    with pytest.raises(UsageError, match="is reserved") as refused:
        check_name(name)
    assert "MLSERVE_" in (refused.value.hint or "")


def test_one_trailing_newline_is_stripped():
    assert parse_value(b"s3cret\n", "N") == "s3cret"
    assert parse_value(b"s3cret", "N") == "s3cret"
    assert parse_value(b"two\n\n", "N") == "two\n"
    assert parse_value(b"multi\nline\n", "N") == "multi\nline"
    assert parse_value("välue\n".encode(), "N") == "välue"


@pytest.mark.parametrize(("raw", "why"), [(b"", "is empty"), (b"\n", "is empty"), (b"a\0b", "NUL"),
                                          (b"\xff\xfe", "not UTF-8"),
                                          (b"x" * (MAX_VALUE_BYTES + 1), "over 64 KiB"),
                                          (b"x" * (MAX_VALUE_BYTES + 1) + b"\n", "over 64 KiB")])
def test_bad_values_are_refused(raw, why):
    with pytest.raises(UsageError, match=why):
        parse_value(raw, "N")


def test_the_largest_value_is_64_kib_with_or_without_its_newline():
    assert len(parse_value(b"x" * MAX_VALUE_BYTES, "N")) == MAX_VALUE_BYTES
    assert len(parse_value(b"x" * MAX_VALUE_BYTES + b"\n", "N")) == MAX_VALUE_BYTES


def test_read_value_reads_no_more_than_it_needs_to_refuse():
    stream = io.BytesIO(b"x" * (10 * MAX_VALUE_BYTES))
    raw = read_value(stream)
    assert len(raw) == MAX_VALUE_BYTES + 2
    with pytest.raises(UsageError, match="over 64 KiB"):
        parse_value(raw, "N")


def test_project_and_owner_names_are_checked_so_no_path_leaves_the_store(home):
    with pytest.raises(UsageError):
        Secrets(home, "alice", "../bob")
    with pytest.raises(UsageError):
        Secrets(home, "../..", "hello")


# -- storing ------------------------------------------------------------------------------------


def test_a_secret_is_a_0600_file_in_0700_folders_owned_by_the_caller(home, store):
    assert store.set("API_TOKEN", b"s3cret\n") is False
    path = home.root / "secrets" / "alice" / "hello" / "API_TOKEN"
    assert path.read_bytes() == b"s3cret"
    assert mode(path) == 0o600
    assert path.stat().st_uid == os.geteuid()
    for folder in (home.root / "secrets", home.root / "secrets" / "alice", path.parent):
        assert mode(folder) == 0o700, folder


def test_folders_that_exist_with_looser_modes_are_tightened(home, store):
    folder = home.root / "secrets" / "alice" / "hello"
    folder.mkdir(parents=True)
    for path in (folder, folder.parent, folder.parent.parent):
        path.chmod(0o755)
    store.set("N", b"v")
    for path in (folder, folder.parent, folder.parent.parent):
        assert mode(path) == 0o700, path


def test_the_value_is_never_readable_by_others_not_even_while_written(store, monkeypatch):
    """With umask 0, the temporary file is 0600 when it is renamed, and the old value stays whole until then."""
    store.set("N", b"old")
    seen = []
    real_replace = os.replace

    def replace(source, target):
        seen.append((mode(Path(source)), Path(source).read_bytes(), Path(target).read_bytes()))
        real_replace(source, target)

    monkeypatch.setattr(secrets_module.os, "replace", replace)
    old_umask = os.umask(0)
    try:
        assert store.set("N", b"new") is True
    finally:
        os.umask(old_umask)
    assert seen == [(0o600, b"new", b"old")]
    assert mode(store.folder / "N") == 0o600


def test_a_failed_write_keeps_the_old_value_and_leaves_no_temporary_file(store, monkeypatch):
    store.set("N", b"old")

    def fail(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(secrets_module.os, "replace", fail)
    with pytest.raises(Exception, match="could not store secret N"):
        store.set("N", b"new")
    assert sorted(p.name for p in store.folder.iterdir()) == ["N"]
    assert (store.folder / "N").read_bytes() == b"old"


@pytest.mark.parametrize(("name", "raw"), [("PATH", b"x"), ("1X", b"x"), ("N", b""), ("N", b"x" * (MAX_VALUE_BYTES + 1))])
def test_a_refused_secret_stores_nothing(home, store, name, raw):
    with pytest.raises(UsageError):
        store.set(name, raw)
    assert not (home.root / "secrets").exists()


def test_a_refused_value_keeps_the_old_one(store):
    store.set("N", b"old")
    with pytest.raises(UsageError):
        store.set("N", b"a\0b")
    assert store.environment() == {"N": "old"}


# -- listing, deleting, the instance's environment -----------------------------------------------


def test_list_names_each_secret_with_when_it_was_set_never_its_value(home, store):
    before = time.time()
    store.set("B_TOKEN", b"bbb-value")
    store.set("A_TOKEN", b"aaa-value")
    listed = store.list_all()
    assert [s.name for s in listed] == ["A_TOKEN", "B_TOKEN"]
    assert all(before - 1 <= s.set_at <= time.time() + 1 for s in listed)
    assert "value" not in repr([s.as_dict() for s in listed])
    assert Secrets(home, "alice", "other").list_all() == []


def test_files_that_are_not_secrets_are_neither_listed_nor_given(store):
    store.set("N", b"v")
    (store.folder / ".N.abc.tmp").write_text("half")
    (store.folder / "PATH").write_text("/evil")  # put there by hand: never steers an instance
    (store.folder / "LINK").symlink_to(store.folder / "N")
    assert [s.name for s in store.list_all()] == ["N"]
    assert store.environment() == {"N": "v"}


def test_delete_forgets_the_secret_and_its_empty_folder(store):
    store.set("A", b"1")
    store.set("B", b"2")
    store.delete("A")
    assert store.environment() == {"B": "2"}
    store.delete("B")
    assert store.list_all() == [] and not store.folder.exists()


@pytest.mark.parametrize("name", ["MISSING", "../hello", ""])
def test_delete_of_an_unknown_secret_is_refused(store, name):
    store.set("N", b"v")
    with pytest.raises(UsageError, match="has no secret"):
        store.delete(name)
    assert store.environment() == {"N": "v"}


def test_environment_of_a_project_without_secrets_is_empty(store):
    assert store.environment() == {}


def test_an_unreadable_secret_stops_the_start(store):
    store.set("N", b"v")
    (store.folder / "N").write_bytes(b"\xff")
    with pytest.raises(JobStartError, match="could not read secret N"):
        store.environment()


def _job(env_vars: tuple[tuple[str, str], ...]) -> Job:
    spec = JobSpec(runtime="local", artifact=Artifact("/nowhere/app", "/nowhere/venv"), project_dir="/nowhere",
                   env_vars=env_vars)
    return Job(id="a" * 22, owner="alice", project="hello", number=1, state="starting", healthy=False, handle=None,
               spec=spec, version=1)


def test_instances_get_the_secrets_at_start_not_in_their_spec_or_manifest(home, store):
    store.set("API_TOKEN", b"from-the-secret")
    store.set("OTHER", b"other-value")
    job = _job((("API_TOKEN", "from-mlserve-yml"), ("PLAIN", "yml")))
    instance = Instances(Platform(home, report=lambda _: None)).instance_spec(job)
    assert instance.env["API_TOKEN"] == "from-the-secret"  # a secret wins over mlserve.yml's env_vars
    assert instance.env["OTHER"] == "other-value" and instance.env["PLAIN"] == "yml"
    assert instance.env["MLSERVE_JOB"] == "alice/projects/hello/1"
    assert "from-the-secret" not in job.spec.to_json() and "other-value" not in job.spec.to_json()
    manifest = (home.run_dir(job.id) / "manifest.json").read_text()
    assert "from-the-secret" not in manifest and "other-value" not in manifest


def test_a_secret_set_later_reaches_the_next_start(home, store):
    instances = Instances(Platform(home, report=lambda _: None))
    assert "LATER" not in instances.instance_spec(_job(())).env
    store.set("LATER", b"now")
    assert instances.instance_spec(_job(())).env["LATER"] == "now"
    store.delete("LATER")
    assert "LATER" not in instances.instance_spec(_job(())).env
