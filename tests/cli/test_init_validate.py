"""`mlserve init` and `mlserve validate` through click: output, messages, exit codes, and which files
they write or read."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from mlserve.main import cli
from mlserve.scaffold import TEMPLATES

MINE = "# mine\nfrom server import app\n"


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("template, summary", [
    ("flask", "app.py: ok (global flask.Flask app)"),
    ("wsgi", "app.py: ok (global WSGI function app)"),
    ("website", "app.py: ok (global flask.Flask app)"),
    ("fastapi", "app.py: ok (global fastapi.FastAPI (ASGI) app, served through the ASGI adapter a2wsgi)"),
])
def test_init_each_template_in_a_new_dir_then_validate(runner, tmp_path, template, summary):
    result = runner.invoke(cli, ["init", "demo", "--dir", "demo", "--template", template])
    assert result.exit_code == 0, result.output
    assert "created demo/app.py" in result.output and "created demo/.mlserveignore" in result.output
    assert f"Initialized project demo in {tmp_path / 'demo'}" in result.output
    assert "Next: cd demo && mlserve run --mode serve" in result.output
    result = runner.invoke(cli, ["validate", "demo"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"demo/{summary}"


def test_init_here_names_the_project_after_the_folder(runner, tmp_path):
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "Next: mlserve run --mode serve" in result.output
    assert f"project: {tmp_path.name.lower()}" in (tmp_path / "mlserve.yml").read_text()
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 0 and result.output.strip() == "app.py: ok (global flask.Flask app)"


def test_init_name_scaffolds_the_current_folder_not_a_new_one(runner, tmp_path):
    (tmp_path / "README.md").write_text("notes\n")
    result = runner.invoke(cli, ["init", "fast-style-transfer"])
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path) == {"README.md", "app.py", "requirements.txt", "mlserve.yml", ".mlserveignore"}
    assert yaml.safe_load((tmp_path / "mlserve.yml").read_text()) == {"project": "fast-style-transfer"}
    assert 'TITLE = "fast-style-transfer"' in (tmp_path / "app.py").read_text()
    assert "created app.py" in result.output and "Next: mlserve run --mode serve" in result.output


def test_init_name_in_a_cloned_app_only_writes_mlserve_yml(runner, tmp_path):
    """floyd init fast-style-transfer, in the repository just cloned: the app stays as it is."""
    (tmp_path / "app.py").write_text(MINE)
    (tmp_path / "requirements.txt").write_text("torch\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocab.json").write_text("{}")
    result = runner.invoke(cli, ["init", "fast-style-transfer"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "app.py").read_text() == MINE and (tmp_path / "requirements.txt").read_text() == "torch\n"
    # No .mlserveignore: the template's would keep data/ out of an image the app may need it in.
    assert files_in(tmp_path) == {"app.py", "requirements.txt", "data/vocab.json", "mlserve.yml"}
    text = (tmp_path / "mlserve.yml").read_text()
    assert yaml.safe_load(text) == {"project": "fast-style-transfer"} and "# workers: 2" in text
    assert "app.py is there already: it and every other file are left as they are" in result.output
    assert "created mlserve.yml with project: fast-style-transfer" in result.output
    assert "Next: mlserve run --mode serve" in result.output


def test_init_name_sets_the_project_in_an_existing_mlserve_yml(runner, tmp_path):
    (tmp_path / "app.py").write_text(MINE)
    before = "# my settings\n\nproject: old  # was the demo\nworkers: 3\n# data:\n#   - ./data:input\n"
    (tmp_path / "mlserve.yml").write_text(before)
    result = runner.invoke(cli, ["init", "style"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlserve.yml").read_text() == before.replace("project: old", "project: style")
    assert "set project: style in mlserve.yml (was old)" in result.output
    again = runner.invoke(cli, ["init", "style"])
    assert again.exit_code == 0 and "mlserve.yml already sets project: style; nothing to change" in again.output
    assert (tmp_path / "app.py").read_text() == MINE


def test_init_without_name_keeps_the_project_mlserve_yml_names(runner, tmp_path):
    (tmp_path / "app.py").write_text(MINE)
    (tmp_path / "mlserve.yml").write_text("project: chosen\n")
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlserve.yml").read_text() == "project: chosen\n"
    assert "already sets project: chosen" in result.output


def test_init_an_app_in_another_folder_with_dir(runner, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "app.py").write_text(MINE)
    result = runner.invoke(cli, ["init", "style", "--dir", "repo"])
    assert result.exit_code == 0, result.output
    assert "created repo/mlserve.yml with project: style" in result.output
    assert "Next: cd repo && mlserve run --mode serve" in result.output
    assert files_in(tmp_path) == {"repo/app.py", "repo/mlserve.yml"}


def test_init_refuses_to_overwrite_then_force(runner, tmp_path):
    (tmp_path / "requirements.txt").write_text("# mine\n")
    again = runner.invoke(cli, ["init", "demo", "--template", "wsgi"])
    assert again.exit_code == 2
    assert "requirements.txt" in again.output and "--force" in again.output
    assert files_in(tmp_path) == {"requirements.txt"}
    forced = runner.invoke(cli, ["init", "demo", "--template", "wsgi", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "def app(environ, start_response):" in (tmp_path / "app.py").read_text()
    assert (tmp_path / "requirements.txt").read_text() != "# mine\n"


def test_force_never_replaces_an_existing_app_py(runner, tmp_path):
    (tmp_path / "app.py").write_text(MINE)
    result = runner.invoke(cli, ["init", "demo", "--template", "wsgi", "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "app.py").read_text() == MINE
    assert "--force never replaces an app; remove app.py first" in result.output
    assert files_in(tmp_path) == {"app.py", "mlserve.yml"}


@pytest.mark.parametrize("name", ["Style Transfer", "模型", "_demo", "a/b", "UPPER", "x" * 64])
def test_an_invalid_name_is_refused_and_nothing_is_written(runner, tmp_path, name):
    result = runner.invoke(cli, ["init", name])
    assert result.exit_code == 2
    assert f"Error: {name!r} is not a valid project name" in result.output
    assert files_in(tmp_path) == set()
    (tmp_path / "app.py").write_text(MINE)
    assert runner.invoke(cli, ["init", name]).exit_code == 2
    assert runner.invoke(cli, ["init", name, "--dir", "new"]).exit_code == 2
    assert files_in(tmp_path) == {"app.py"} and not (tmp_path / "new").exists()


def test_an_invalid_name_gets_a_suggestion(runner):
    result = runner.invoke(cli, ["init", "Style Transfer"])
    assert "For example: style-transfer" in result.output


def test_a_folder_name_without_ascii_needs_a_name(runner, tmp_path, monkeypatch):
    folder = tmp_path / "模型"
    folder.mkdir()
    monkeypatch.chdir(folder)
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 2
    assert "'模型' has no ASCII letters or digits" in result.output
    assert "--project NAME" in result.output and "project: NAME" in result.output and "mlserve init NAME" in result.output
    assert files_in(folder) == set()
    named = runner.invoke(cli, ["init", "style-model"])
    assert named.exit_code == 0, named.output
    assert yaml.safe_load((folder / "mlserve.yml").read_text()) == {"project": "style-model"}


def test_init_does_not_write_through_a_link_out_of_the_project(runner, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "app.py").write_text(MINE)
    outside = tmp_path / "elsewhere.yml"
    outside.write_text("project: theirs\n")
    (tmp_path / "repo" / "mlserve.yml").symlink_to(outside)
    result = runner.invoke(cli, ["init", "mine", "--dir", "repo"])
    assert result.exit_code == 2
    assert "repo/mlserve.yml is a symbolic link to" in result.output and "outside the project folder" in result.output
    assert outside.read_text() == "project: theirs\n"


def test_init_unknown_template(runner, tmp_path):
    result = runner.invoke(cli, ["init", "demo", "--template", "django"])
    assert result.exit_code == 2
    assert "'django' is not one of" in result.output and "'fastapi'" in result.output
    assert files_in(tmp_path) == set()


def test_template_choices_match_the_scaffold():
    option = next(p for p in cli.commands["init"].params if p.name == "template")
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == TEMPLATES


def test_validate_without_app_py(runner, tmp_path):
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3
    assert "no app.py" in result.output and "global named app" in result.output


def test_validate_app_only_under_main(runner, tmp_path):
    (tmp_path / "app.py").write_text("from flask import Flask\nif __name__ == '__main__':\n    app = Flask(__name__)\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3
    assert "__main__" in result.output and "uWSGI imports app.py" in result.output


def test_validate_not_callable_and_missing_global(runner, tmp_path):
    (tmp_path / "app.py").write_text("app = 'hello'\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3 and "not callable" in result.output
    (tmp_path / "app.py").write_text("def application(environ, start_response):\n    return []\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3
    assert "defines no global named app" in result.output and "app = application" in result.output


def test_validate_syntax_error_shows_the_line(runner, tmp_path):
    (tmp_path / "app.py").write_text("import os\nx = = 1\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3
    assert "app.py:2: invalid syntax" in result.output and "    x = = 1" in result.output


def test_validate_unknown_kind_just_says_ok(runner, tmp_path):
    (tmp_path / "app.py").write_text("from server import app\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 0 and result.output.strip() == "app.py: ok"


def test_validate_does_not_read_an_app_py_linked_out_of_the_project(runner, tmp_path):
    """A cloned repository's app.py -> /etc/shadow: no line of that file reaches the terminal."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRETHASH:19000:0:99999:7:::\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "app.py").symlink_to(secret)
    result = runner.invoke(cli, ["validate", "repo"])
    assert result.exit_code == 3
    assert "SECRETHASH" not in result.output
    assert f"repo/app.py is a symbolic link to {secret}, outside the project folder" in result.output


def test_validate_follows_an_app_py_linked_inside_the_project(runner, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "server.py").write_text("def app(environ, start_response):\n    return []\n")
    (tmp_path / "app.py").symlink_to("src/server.py")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "app.py: ok (global WSGI function app)"
