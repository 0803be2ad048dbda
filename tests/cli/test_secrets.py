"""`mlserve secret set | list | delete` with CliRunner: values from stdin, messages, exit codes."""

from __future__ import annotations

import json

from mlserve.main import cli


def _folder(tmp_path):
    return tmp_path / "home" / "secrets" / "alice" / "demo"


def test_set_list_delete(runner, tmp_path):
    result = runner.invoke(cli, ["secret", "set", "API_TOKEN", "--project", "demo"], input="s3cret-value\n")
    assert result.exit_code == 0, result.output
    assert "Secret API_TOKEN set for alice/projects/demo" in result.output
    assert "Jobs started from now on get it" in result.output and "--replace" in result.output
    assert (_folder(tmp_path) / "API_TOKEN").read_bytes() == b"s3cret-value"

    again = runner.invoke(cli, ["secret", "set", "API_TOKEN", "--project", "demo"], input="rotated")
    assert again.exit_code == 0 and "updated" in again.output

    listed = runner.invoke(cli, ["secret", "list", "--project", "demo", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [s["name"] for s in json.loads(listed.stdout)] == ["API_TOKEN"]
    human = runner.invoke(cli, ["secret", "list", "--project", "demo"])
    assert "API_TOKEN" in human.output
    for output in (result.output, again.output, listed.output, human.output):
        assert "s3cret" not in output and "rotated" not in output

    deleted = runner.invoke(cli, ["secret", "delete", "API_TOKEN", "--project", "demo"])
    assert deleted.exit_code == 0 and "deleted" in deleted.output
    assert json.loads(runner.invoke(cli, ["secret", "list", "--project", "demo", "--json"]).stdout) == []
    assert "has no secrets" in runner.invoke(cli, ["secret", "list", "--project", "demo"]).output


def test_the_project_defaults_to_the_folders(runner, tmp_path):
    (tmp_path / "mlserve.yml").write_text("project: demo\n")
    assert runner.invoke(cli, ["secret", "set", "TOKEN"], input="v\n").exit_code == 0
    assert (_folder(tmp_path) / "TOKEN").read_bytes() == b"v"


def test_bad_input_exits_non_zero_and_stores_nothing(runner, tmp_path):
    cases = [("1BAD", "x\n", "not a valid secret name"), ("PATH", "x\n", "reserved"),
             ("MLSERVE_JOB", "x\n", "reserved"), ("EMPTY", "\n", "is empty"),
             ("BIG", "x" * (64 * 1024 + 1), "over 64 KiB"), ("NUL", "a\0b", "NUL byte")]
    for name, value, message in cases:
        result = runner.invoke(cli, ["secret", "set", name, "--project", "demo"], input=value)
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output, (name, result.output)
    assert not (tmp_path / "home" / "secrets").exists()


def test_delete_of_an_unknown_secret_exits_non_zero(runner):
    result = runner.invoke(cli, ["secret", "delete", "NOPE", "--project", "demo"])
    assert result.exit_code == 2
    assert "alice/projects/demo has no secret 'NOPE'" in result.output


def test_a_bad_project_name_is_refused(runner):
    result = runner.invoke(cli, ["secret", "set", "N", "--project", "../other"], input="v")
    assert result.exit_code == 2 and "not a valid project name" in result.output
