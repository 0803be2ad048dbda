"""`mlserve secret`: a secret reaches the instances started after it was set, as an environment variable,
and nothing else: not the image, the state, the manifest, any file of mlserve's home or any output."""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.harness import Mlserve, job_container

pytestmark = pytest.mark.integration

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def secret_project(tmp_path) -> Path:
    target = tmp_path / "secretapp"
    shutil.copytree(APPS / "secret", target)
    return target


def set_secret(ms: Mlserve, name: str, stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """`mlserve secret set NAME` with ``stdin``; not checked."""
    return subprocess.run([sys.executable, "-m", "mlserve", "secret", "set", name], input=stdin, cwd=cwd, env=ms.env,
                          capture_output=True, timeout=60, check=False)


def value_of(endpoint: str, name: str) -> str | None:
    answer = requests.get(endpoint, params={"name": name}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["value"]


def secrets_folder(ms: Mlserve) -> Path:
    return ms.home / "secrets" / "tester" / "secretapp"


def files_holding(root: Path, needle: bytes, skip: Path) -> list[Path]:
    """The regular files under ``root`` (but not under ``skip``) whose bytes contain ``needle``."""
    return [path for path in root.rglob("*")
            if path.is_file() and not path.is_symlink() and not path.is_relative_to(skip) and needle in path.read_bytes()]


def test_a_secret_reaches_the_instance_and_nowhere_else(mlserve, docker_client, secret_project):
    value = f"s3cret-{secrets.token_hex(16)}"
    (secret_project / "mlserve.yml").write_text("env_vars:\n  API_TOKEN: from-mlserve-yml\n  PLAIN: plain\n")
    piped = subprocess.run(f"echo {value} | {shlex.quote(sys.executable)} -m mlserve secret set API_TOKEN",
                           shell=True, cwd=secret_project, env=mlserve.env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert piped.returncode == 0, piped.stderr
    assert value not in piped.stdout + piped.stderr

    run = mlserve("run", "--mode", "serve", "--json", cwd=secret_project)
    out = json.loads(run.stdout)
    assert value_of(out["endpoint"], "API_TOKEN") == value  # the secret wins over mlserve.yml's env_vars
    assert value_of(out["endpoint"], "PLAIN") == "plain"

    # The file: the value alone (echo's newline dropped), 0600 in a 0700 folder.
    secret_file = secrets_folder(mlserve) / "API_TOKEN"
    assert secret_file.read_bytes() == value.encode()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700

    # The container is given it at start (as any environment variable Docker passes): the searches below
    # find it where it is.
    container = job_container(docker_client, mlserve.home, out["id"])
    assert container is not None and value in json.dumps(container.attrs["Config"]["Env"])

    # Not in the image: its configuration (Config.Env among it) and its history.
    image = out["build"]["image"]
    assert value not in json.dumps(docker_client.api.inspect_image(image))
    assert value not in json.dumps(docker_client.api.history(image))

    # Not in the state (the job spec is stored there), the manifest, or any other file of mlserve's home.
    manifest = mlserve.home / "run" / out["id"] / "manifest.json"
    assert manifest.is_file() and value not in manifest.read_text()
    state_files = list(mlserve.home.glob("state.db*"))
    assert state_files and all(value.encode() not in path.read_bytes() for path in state_files)
    assert files_holding(mlserve.home, value.encode(), skip=secrets_folder(mlserve)) == []

    # Not in any output: info and status (human and JSON), the logs, versions, the secret list, the run.
    outputs = [run.stdout + run.stderr]
    for args in (("info", out["job"]), ("info", out["job"], "--json"), ("status",), ("status", "--json"),
                 ("status", "--all"), ("logs", out["job"]), ("versions", "secretapp"),
                 ("secret", "list", "--project", "secretapp"), ("secret", "list", "--project", "secretapp", "--json")):
        result = mlserve(*args, cwd=secret_project)
        outputs.append(result.stdout + result.stderr)
    assert "API_TOKEN" in outputs[-1]  # the list names it
    assert [i for i, text in enumerate(outputs) if value in text] == []


def test_bad_input_stores_nothing_and_leaves_the_running_job_alone(mlserve, docker_client, secret_project):
    assert set_secret(mlserve, "API_TOKEN", b"first\n", secret_project).returncode == 0
    out = mlserve.json("run", "--mode", "serve", cwd=secret_project)
    container = job_container(docker_client, mlserve.home, out["id"])
    assert container is not None
    started = container.attrs["State"]["StartedAt"]

    cases = [("1BAD", b"x\n", "not a valid secret name"), ("BAD-NAME", b"x\n", "not a valid secret name"),
             ("PATH", b"x\n", "reserved"), ("MLSERVE_JOB", b"x\n", "reserved"), ("LD_PRELOAD", b"x\n", "reserved"),
             ("API_TOKEN", b"\n", "is empty"), ("NEW", b"", "is empty"),
             ("API_TOKEN", b"x" * (64 * 1024 + 1), "over 64 KiB"), ("NEW", b"a\0b\n", "NUL byte")]
    for name, stdin, message in cases:
        result = set_secret(mlserve, name, stdin, secret_project)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert message in result.stderr.decode(), (name, result.stderr)
        assert sorted(p.name for p in secrets_folder(mlserve).iterdir()) == ["API_TOKEN"], name
        assert (secrets_folder(mlserve) / "API_TOKEN").read_bytes() == b"first"
    unknown = mlserve("secret", "delete", "NOPE", cwd=secret_project, check=False)
    assert unknown.returncode == 2 and "has no secret 'NOPE'" in unknown.stderr

    assert value_of(out["endpoint"], "API_TOKEN") == "first"
    [job] = mlserve.json("status")
    assert (job["job"], job["state"], job["healthy"], job["restarts"]) == (out["job"], "running", True, 0)
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started  # the same container, never restarted


def test_jobs_started_later_get_the_new_value_and_running_ones_keep_theirs(mlserve, secret_project):
    assert set_secret(mlserve, "API_TOKEN", b"one\n", secret_project).returncode == 0
    first = mlserve.json("run", "--mode", "serve", cwd=secret_project)
    assert value_of(first["endpoint"], "API_TOKEN") == "one"

    rotated = set_secret(mlserve, "API_TOKEN", b"two", secret_project)
    assert rotated.returncode == 0 and b"jobs running now keep the environment" in rotated.stdout
    mlserve("scale", "--add", "1", cwd=secret_project)
    endpoints = {j["job"]: j["endpoint"] for j in mlserve.json("status")}
    assert value_of(endpoints[first["job"]], "API_TOKEN") == "one"
    assert value_of(endpoints["tester/projects/secretapp/2"], "API_TOKEN") == "two"

    mlserve("secret", "delete", "API_TOKEN", cwd=secret_project)
    mlserve("scale", "--add", "1", cwd=secret_project)
    endpoints = {j["job"]: j["endpoint"] for j in mlserve.json("status")}
    assert value_of(endpoints["tester/projects/secretapp/3"], "API_TOKEN") is None
    assert value_of(endpoints["tester/projects/secretapp/2"], "API_TOKEN") == "two"

    assert set_secret(mlserve, "API_TOKEN", b"three\n", secret_project).returncode == 0
    mlserve("run", "--mode", "serve", "--replace", cwd=secret_project)
    answers = {value_of(j["endpoint"], "API_TOKEN") for j in mlserve.json("status")}
    assert answers == {"three"}


def test_an_app_that_reads_a_secret_when_imported_passes_the_import_check(mlserve, docker_client, secret_project):
    # The import check runs the app as an instance will, with its secrets: an app that needs one at
    # import time builds; without the secret, the check fails and says why.
    app = secret_project / "app.py"
    app.write_text("import os\nREQUIRED = os.environ['MODEL_KEY']\n" + app.read_text())
    failed = mlserve("run", "--mode", "serve", cwd=secret_project, check=False)
    assert failed.returncode != 0 and "MODEL_KEY" in failed.stderr
    assert set_secret(mlserve, "MODEL_KEY", b"k-123\n", secret_project).returncode == 0
    deployed = mlserve.json("run", "--mode", "serve", cwd=secret_project)
    assert value_of(deployed["endpoint"], "MODEL_KEY") == "k-123"
    image = docker_client.images.get(deployed["build"]["image"])
    assert not any("k-123" in item for item in image.attrs["Config"].get("Env") or [])
