"""`mlserve init` and `mlserve validate` through click: output, messages and exit codes."""

from __future__ import annotations

import click
import pytest

from mlserve.main import cli
from mlserve.scaffold import TEMPLATES


@pytest.mark.parametrize("template, summary", [
    ("flask", "app.py: ok (global flask.Flask app)"),
    ("wsgi", "app.py: ok (global WSGI function app)"),
    ("website", "app.py: ok (global flask.Flask app)"),
    ("fastapi", "app.py: ok (global fastapi.FastAPI (ASGI) app, served through the ASGI adapter a2wsgi)"),
])
def test_init_each_template_then_validate(runner, tmp_path, template, summary):
    result = runner.invoke(cli, ["init", "demo", "--template", template])
    assert result.exit_code == 0, result.output
    assert "created demo/app.py" in result.output and "created demo/.mlserveignore" in result.output
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


def test_init_refuses_to_overwrite_then_force(runner, tmp_path):
    assert runner.invoke(cli, ["init", "demo"]).exit_code == 0
    (tmp_path / "demo" / "app.py").write_text("# mine\n")
    again = runner.invoke(cli, ["init", "demo", "--template", "wsgi"])
    assert again.exit_code == 2
    assert "app.py" in again.output and "requirements.txt" in again.output and "--force" in again.output
    assert (tmp_path / "demo" / "app.py").read_text() == "# mine\n"
    forced = runner.invoke(cli, ["init", "demo", "--template", "wsgi", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "def app(environ, start_response):" in (tmp_path / "demo" / "app.py").read_text()


def test_init_unknown_template(runner, tmp_path):
    result = runner.invoke(cli, ["init", "demo", "--template", "django"])
    assert result.exit_code == 2
    assert "'django' is not one of" in result.output and "'fastapi'" in result.output
    assert not (tmp_path / "demo").exists()


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
