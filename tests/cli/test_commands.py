"""The click layer, with CliRunner: parsing, messages and exit codes, no engine needed."""

from __future__ import annotations

import json

from mlserve.main import cli


def test_init_then_validate(runner, tmp_path):
    result = runner.invoke(cli, ["init", "demo", "--dir", "demo"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "app.py").exists()
    result = runner.invoke(cli, ["validate", "demo"])
    assert result.exit_code == 0, result.output
    assert "flask.Flask" in result.output
    again = runner.invoke(cli, ["init", "--dir", "demo"])
    assert again.exit_code == 0 and "left as they are" in again.output


def test_validate_reports_syntax_error_with_line(runner, tmp_path):
    (tmp_path / "app.py").write_text("app = (\n")
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 3
    assert "app.py:1" in result.output


def test_run_refuses_other_modes_and_commands(runner):
    result = runner.invoke(cli, ["run", "--mode", "job"])
    assert result.exit_code == 2 and "--mode job is not supported" in result.output
    result = runner.invoke(cli, ["run", "--mode", "serve", "python", "train.py"])
    assert result.exit_code == 2 and "takes no command" in result.output


def test_scale_needs_exactly_one_count(runner):
    assert runner.invoke(cli, ["scale"]).exit_code == 2
    assert runner.invoke(cli, ["scale", "2", "--add", "1"]).exit_code == 2


def test_stop_needs_a_target(runner):
    result = runner.invoke(cli, ["stop"])
    assert result.exit_code == 2 and "--project" in result.output


def test_status_of_an_empty_home(runner):
    result = runner.invoke(cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_unknown_job_reference(runner):
    result = runner.invoke(cli, ["logs", "proj/7"])
    assert result.exit_code == 7
    assert "no job alice/projects/proj/7" in result.output


def test_gateway_port_flag_does_not_fight_the_environment(runner, monkeypatch):
    monkeypatch.setenv("MLSERVE_GATEWAY_PORT", "8123")
    result = runner.invoke(cli, ["gateway", "start", "--port", "9000"])
    assert result.exit_code == 2
    assert "MLSERVE_GATEWAY_PORT=8123" in result.output
