"""mlserve.yml is typed at the edge: a wrong value is refused naming the key and the expected form."""

from __future__ import annotations

import pytest

from mlserve.config import HealthPolicy, Limits, flag_max_runtime_s, load_config
from mlserve.errors import ProjectConfigError, UsageError


def _config(tmp_path, text: str):
    (tmp_path / "mlserve.yml").write_text(text)
    return load_config(tmp_path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("health: {interval: soon}", "health.interval"),
        ("workers: many", "workers"),
        ("limits: {memory: lots}", "limits.memory"),
        ("max_runtime: -1", "max_runtime"),
        ("limits: {memory: 0}", "limits.memory"),
        ("limits: {cpus: 0}", "limits.cpus"),
        ("limits: {pids: -5}", "limits.pids"),
        ("health: {timeout: 0s}", "health.timeout"),
        ("health: {failures: 0}", "health.failures"),
        ("health: {path: status}", "health.path"),
        ("health: {method: BREW}", "health.method"),
        ("workers: 0", "workers"),
        ("workers: true", "workers"),
        ("preload: yes please", "preload"),
        ("env_vars: {A: [1]}", "env_vars"),
        ("data: ./data:input", "data"),
        ("network: wide", "network"),
        ("network: [open]", "network"),
    ],
)
def test_a_wrong_value_names_its_key_and_the_expected_form(tmp_path, text, key):
    with pytest.raises(ProjectConfigError) as raised:
        _config(tmp_path, text)
    assert f": {key} must be " in raised.value.message
    assert "not " in raised.value.message  # says what it got


def test_values_become_typed_parts(tmp_path):
    config = _config(tmp_path, """
project: demo
workers: 3
limits: {memory: 512m, cpus: 1.5, tmp: 1g}
health: {path: /health, method: get, interval: 500ms, timeout: 3s, failures: 4}
max_runtime: 12h
env_vars: {B: 2, A: "x", FLAG: true}
data: [./data:input]
""")
    assert config.project == "demo" and config.workers == 3
    assert config.limits == Limits(memory_bytes=512 << 20, cpus=1.5, pids=512, tmp_bytes=1 << 30)
    assert config.health == HealthPolicy(path="/health", method="GET", interval_s=0.5, timeout_s=3.0, failures=4)
    assert config.max_runtime_s == 12 * 3600
    assert config.env_vars == (("A", "x"), ("B", "2"), ("FLAG", "true"))
    assert config.data == ("./data:input",)


def test_no_file_means_defaults(tmp_path):
    config = load_config(tmp_path)
    assert config.limits == Limits() and config.health == HealthPolicy() and config.max_runtime_s is None


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ProjectConfigError, match="unknown setting 'wrokers'"):
        _config(tmp_path, "wrokers: 2")
    with pytest.raises(ProjectConfigError, match="unknown limits setting 'gpu'"):
        _config(tmp_path, "limits: {gpu: 1}")


def test_max_runtime_flag_wins_and_is_checked(tmp_path):
    config = _config(tmp_path, "max_runtime: 2h")
    assert flag_max_runtime_s(None, config) == 7200
    assert flag_max_runtime_s("30m", config) == 1800
    assert flag_max_runtime_s("0", config) == 0
    with pytest.raises(UsageError, match="--max-runtime 'later'"):
        flag_max_runtime_s("later", config)


def test_an_mlserve_yml_linking_out_of_the_project_is_not_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("password: hunter2\n: [")
    project = tmp_path / "project"
    project.mkdir()
    (project / "mlserve.yml").symlink_to(secret)
    with pytest.raises(ProjectConfigError) as raised:
        load_config(project)
    assert "outside the project folder" in raised.value.message and "hunter2" not in str(raised.value.message)
