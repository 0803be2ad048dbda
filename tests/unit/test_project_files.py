"""The project folder's name and files: the project name a folder gives, which files go into the
image, and how symbolic links are treated (followed inside the project, refused out of it)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mlserve.builder import ImageBuilder
from mlserve.errors import UsageError
from mlserve.project import (
    context_files,
    default_project_name,
    link_problem,
    linked_folders,
    parse_data_mount,
    validate_project_name,
)

# -- project names --------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, expected", [
    ("Style Transfer", "style-transfer"),
    ("fast_style.transfer", "fast_style-transfer"),
    ("--My  Model!!", "my-model"),
    ("模型-v2", "v2"),
    ("Straße", "stra-e"),
    ("x" * 80, "x" * 63),
])
def test_a_folder_name_with_ascii_letters_or_digits_is_made_a_slug(tmp_path, folder, expected):
    (tmp_path / folder).mkdir()
    assert default_project_name(tmp_path / folder) == expected


@pytest.mark.parametrize("folder", ["模型", "数据", "ÄÖÜ", "__", "🤖"])
def test_a_folder_name_without_ascii_letters_or_digits_is_refused(tmp_path, folder):
    """模型 and 数据 were both "app" before: two unrelated apps in one project and one round robin."""
    (tmp_path / folder).mkdir()
    with pytest.raises(UsageError) as info:
        default_project_name(tmp_path / folder)
    assert info.value.message == f"the folder name {folder!r} has no ASCII letters or digits to make a project name of"
    assert "--project NAME" in info.value.hint and "`project: NAME` in mlserve.yml" in info.value.hint
    assert "mlserve init NAME" in info.value.hint


def test_the_name_comes_from_where_a_linked_folder_leads(tmp_path):
    (tmp_path / "style").mkdir()
    (tmp_path / "模型").symlink_to(tmp_path / "style")
    assert default_project_name(tmp_path / "模型") == "style"


def test_an_invalid_project_name_is_refused_with_a_suggestion():
    with pytest.raises(UsageError) as info:
        validate_project_name("Style Transfer")
    assert info.value.message == "'Style Transfer' is not a valid project name"
    assert info.value.hint.endswith("For example: style-transfer")
    with pytest.raises(UsageError) as info:
        validate_project_name("模型")
    assert "For example" not in info.value.hint
    assert validate_project_name("style-transfer") == "style-transfer"


# -- which files go into the image ----------------------------------------------------------------


@pytest.fixture
def project(tmp_path) -> Path:
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "server.py").write_text("def app(environ, start_response):\n    return []\n")
    (folder / "requirements.txt").write_text("flask\n")
    return folder


def shipped(folder: Path) -> dict[str, Path]:
    return {rel: path for path, rel in context_files(folder)}


def test_a_link_to_a_file_inside_the_project_is_followed(project):
    (project / "app.py").symlink_to("src/server.py")
    (project / "weights.txt").symlink_to(project / "src" / "server.py")  # absolute, still inside
    files = shipped(project)
    assert set(files) == {"app.py", "requirements.txt", "src/server.py", "weights.txt"}
    assert files["app.py"].read_text() == (project / "src" / "server.py").read_text()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside.txt"])
def test_a_link_out_of_the_project_is_refused_by_name(project, target):
    (project.parent / "outside.txt").write_text("secret\n")
    (project / "src" / "data.txt").symlink_to(target)
    with pytest.raises(UsageError) as info:
        context_files(project)
    assert info.value.message == f"src/data.txt is a symbolic link to {target}, outside the project folder {project}"
    assert ".mlserveignore" in info.value.hint and "Copy what the app needs into the project" in info.value.hint


def test_a_dangling_link_is_refused(project):
    (project / "model.bin").symlink_to("weights/model.bin")
    with pytest.raises(UsageError, match=r"^model\.bin is a symbolic link to weights/model\.bin, which does not exist$"):
        context_files(project)


def test_every_bad_link_is_named(project):
    for name in ("a", "b", "c"):
        (project / name).symlink_to(f"/nonexistent/{name}")
    with pytest.raises(UsageError) as info:
        context_files(project)
    assert info.value.message.startswith("a is a symbolic link to /nonexistent/a")
    assert "Other such links: b, c." in info.value.hint


def test_an_ignored_link_out_of_the_project_is_fine(project):
    (project / "env").mkdir()
    (project / "env" / "python").symlink_to("/usr/bin/python3")
    (project / ".mlserveignore").write_text("env/\n")
    assert "env/python" not in shipped(project)


def test_an_mlserveignore_linked_out_of_the_project_is_not_read(project, tmp_path):
    (tmp_path / "rules").write_text("src/\n")
    (project / ".mlserveignore").symlink_to(tmp_path / "rules")
    with pytest.raises(UsageError, match=r"^\.mlserveignore is a symbolic link to .*, outside the project folder"):
        context_files(project)


def test_linked_folders_are_not_followed_and_are_listed(project, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "big.bin").write_text("x")
    (project / "models").symlink_to(tmp_path / "models")  # outside: not followed, so not refused
    (project / "current").symlink_to("src")  # inside: not followed either
    (project / "data").symlink_to(tmp_path / "models")
    (project / ".mlserveignore").write_text("data/\n")  # a folder rule covers a linked folder too
    assert set(shipped(project)) == {"requirements.txt", "src/server.py", ".mlserveignore"}
    assert linked_folders(project) == ["current", "models"]


def test_link_problem_is_none_for_plain_files_and_inside_links(project, tmp_path):
    assert link_problem(project / "requirements.txt", project) is None
    assert link_problem(project / "missing", project) is None  # not a link: whoever reads it says it is missing
    (project / "app.py").symlink_to("src/server.py")
    assert link_problem(project / "app.py", project) is None
    (project / "up").symlink_to("..")
    assert link_problem(project / "up", project) == f"is a symbolic link to .., outside the project folder {project}"


# -- the build context ------------------------------------------------------------------------------


def build_context(folder: Path) -> tuple[dict[str, tarfile.TarInfo], dict[str, bytes], list[str]]:
    notes: list[str] = []
    data, _ = ImageBuilder(None, "home", notes.append).context(folder, "FROM scratch\n", None)  # type: ignore[arg-type]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        contents = {name: tar.extractfile(m).read() for name, m in members.items() if m.isreg()}  # type: ignore[union-attr]
    return members, contents, notes


def test_the_image_gets_a_linked_app_py_as_a_regular_file(project):
    (project / "app.py").symlink_to("src/server.py")
    (project / "run.sh").write_text("#!/bin/sh\n")
    (project / "run.sh").chmod(0o700)
    (project / "start").symlink_to("run.sh")
    members, contents, notes = build_context(project)
    app = members["app/app.py"]
    assert app.isreg() and not app.issym()
    assert contents["app/app.py"] == (project / "src" / "server.py").read_bytes()
    assert (app.mode, app.uid, app.gid, app.mtime, app.uname) == (0o644, 0, 0, 0, "")
    assert members["app/start"].isreg() and members["app/start"].mode == 0o755
    assert contents["app/start"] == b"#!/bin/sh\n"
    assert all(not m.issym() and not m.islnk() for m in members.values())
    assert notes == []


def test_the_build_context_refuses_a_link_out_before_packing(project, tmp_path):
    (tmp_path / "shadow").write_text("secret\n")
    (project / "app.py").symlink_to(tmp_path / "shadow")
    with pytest.raises(UsageError, match=r"^app\.py is a symbolic link to .*shadow, outside the project folder"):
        build_context(project)


def test_the_build_says_a_linked_folder_is_not_in_the_image(project, tmp_path):
    (tmp_path / "models").mkdir()
    (project / "models").symlink_to(tmp_path / "models")
    members, _, notes = build_context(project)
    assert not any(name.startswith("app/models") for name in members)
    [note] = notes
    assert note == ("Note: models is a symbolic link to a folder; mlserve does not follow those, so its files are "
                    "not in the image (replace the link with the folder, or mount it with --data).")


# -- data mounts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("/", "system folder"),
    ("/proc", "system folder"),
    ("/etc/ssl", "system folder"),
    ("/var", "system folder"),  # it holds /var/lib/docker
    ("/run", "system folder"),
    ("/root", "home folder"),
])
def test_data_from_system_folders_and_homes_is_refused(tmp_path, source, message):
    with pytest.raises(UsageError, match=message):
        parse_data_mount(f"{source}:input", tmp_path, tmp_path / "mlserve-home")


def test_data_from_a_users_secrets_is_refused(tmp_path, monkeypatch):
    user = tmp_path / "alice"
    for folder in (".ssh", ".docker/contexts", "work/models"):
        (user / folder).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(user))
    for source in (user, user / ".ssh", user / ".docker" / "contexts", tmp_path):
        with pytest.raises(UsageError, match="home folder"):
            parse_data_mount(f"{source}:input", tmp_path, Path("/srv/mlserve-home"))
    assert parse_data_mount(f"{user}/work/models:input", tmp_path, Path("/srv/mlserve-home")).mount == "/input"


def test_data_from_mlserves_home_or_a_folder_holding_it_is_refused(tmp_path):
    home = tmp_path / "state" / "home"
    (home / "run").mkdir(parents=True)
    for source in (home, home / "run", tmp_path / "state"):
        with pytest.raises(UsageError, match="mlserve's home"):
            parse_data_mount(f"{source}:input", tmp_path, home)


def test_mlserve_yml_data_stays_inside_the_project(tmp_path):
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "models").mkdir(parents=True)
    outside.mkdir()
    (project / "escape").symlink_to(outside)
    home = tmp_path / "home"
    assert parse_data_mount("./models:input", project, home, inside=project).source == str(project / "models")
    for spec in (f"{outside}:input", "../outside:input", "./escape:input"):
        with pytest.raises(UsageError, match="outside the project folder"):
            parse_data_mount(spec, project, home, inside=project)
    # Given on the command line (or confirmed), a folder outside is fine.
    assert parse_data_mount(f"{outside}:input", project, home).source == str(outside)
