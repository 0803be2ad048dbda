"""What a project becomes on a cluster: every renderer's exact output (tests/unit/expected/kube/), and
every object valid against the schemas of a current Kubernetes release (kubernetes-validate)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest

from mlserve.config import HealthPolicy, Limits
from mlserve.errors import UsageError
from mlserve.kube import render
from mlserve.kube.deploy import parse_cluster_mount, plan_routes
from mlserve.kube.render import ClusterJob, ProjectRef, Routes
from mlserve.spec import Artifact, DataMount, JobSpec
from mlserve.traffic import Traffic

EXPECTED = Path(__file__).parent / "expected" / "kube"
# Clusters users run are much newer than the 1.20 control plane the integration tier builds: every
# object must be valid on both (1.20's acceptance is shown by the integration tier).
CURRENT = kubernetes_validate.latest_version()
REF = ProjectRef("alice", "hello")
JOB = ClusterJob("AbCdEfGhIjKlMnOpQrStUv", 4, 3)
IMAGE = "registry.example.com/ml/alice-hello@sha256:" + "a" * 64
SPEC = JobSpec(runtime="kubernetes", artifact=Artifact(IMAGE), project_dir="/p", workers=3,
               env_vars=(("MODEL", "small"),), mounts=(DataMount("pvc/models", "/input"),),
               limits=Limits(memory_bytes=1 << 30, cpus=1.5, tmp_bytes=64 << 20, output_bytes=2 << 30),
               health=HealthPolicy(path="/healthz", interval_s=5, timeout_s=1.5, failures=3))
URLS = {"endpoint": f"https://models.example.com/serve/{JOB.id}",
        "project_endpoint": "https://models.example.com/serve/alice/projects/hello",
        "version_endpoint": "https://models.example.com/serve/alice/projects/hello/v/3"}
ROUTES = Routes(REF.name("v3"), REF.name("v4"), 10, REF.name("fallback"), (3, 4), (JOB,))

CASES = {
    "deployment": lambda: render.job_deployment(REF, JOB, SPEC, IMAGE),
    "job-service": lambda: render.job_service(REF, JOB),
    "job-config": lambda: render.job_config(REF, JOB, SPEC, URLS),
    "version-service": lambda: render.version_service(REF, 3),
    "primary-service": lambda: render.role_service(REF, "primary"),
    "network-isolated": lambda: render.network_policy(REF, 3, "isolated"),
    "network-none": lambda: render.network_policy(REF, 3, "none"),
    "secret": lambda: render.secret(REF, {"API_KEY": "s3cr3t", "B": "two"}),
    "record": lambda: render.project_record(REF, {"last_job": 4}),
    "ingresses": lambda: render.ingresses(REF, ROUTES, "models.example.com", "nginx", 100, 60),
}


def _compare(name: str, rendered: object) -> None:
    path = EXPECTED / f"{name}.json"
    text = json.dumps(rendered, indent=2, sort_keys=True) + "\n"
    if os.environ.get("MLSERVE_UPDATE_EXPECTED"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from {path}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_output(name: str) -> None:
    _compare(name, CASES[name]())


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_on_a_current_release(name: str) -> None:
    rendered = CASES[name]()
    for obj in rendered if isinstance(rendered, list) else [rendered]:
        kubernetes_validate.validate(obj, CURRENT, strict=True)


def test_an_invalid_object_is_refused_by_the_schemas() -> None:
    """The validation above can fail: a misspelt field is caught."""
    broken = render.job_deployment(REF, JOB, SPEC, IMAGE)
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, CURRENT, strict=True)


def test_pods_are_locked_down() -> None:
    pod = render.job_deployment(REF, JOB, SPEC, IMAGE)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["limits"] == {"cpu": "1500m", "memory": str(1 << 30)}
    sizes = {v["name"]: v.get("emptyDir", {}).get("sizeLimit") for v in pod["volumes"]}
    assert sizes["tmp"] == str(64 << 20) and sizes["output"] == str(2 << 30)
    assert {"name": "data-0", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    # The image's own uWSGI, with the job's ini from its ConfigMap.
    assert container["command"] == ["/opt/mlserve/venv/bin/uwsgi"]
    assert container["args"] == ["--ini", "/run/mlserve/config/uwsgi.ini"]
    assert {"name": "run", "mountPath": "/run/mlserve/config", "readOnly": True} in container["volumeMounts"]


def test_uwsgi_answers_http_and_the_probes_keep_to_the_socket() -> None:
    ini = render.job_config(REF, JOB, SPEC, URLS)["data"]["uwsgi.ini"]
    assert "http-socket = :8080" in ini and "uwsgi-socket = /run/mlserve/sock/uwsgi.sock" in ini
    assert "processes = 3" in ini
    container = render.job_deployment(REF, JOB, SPEC, IMAGE)["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["exec"]["command"][3:6] == ["ready", "--socket", "/run/mlserve/sock/uwsgi.sock"]
    assert container["livenessProbe"]["exec"]["command"][3:6] == ["live", "--stats", "/run/mlserve/sock/stats.sock"]
    assert container["readinessProbe"]["failureThreshold"] == 3 and container["readinessProbe"]["periodSeconds"] == 5


def test_names_are_dns_labels_and_never_collide() -> None:
    assert re.fullmatch(r"alice-hello-[0-9a-f]{6}", ProjectRef("alice", "hello").slug)
    underscored, dashed = ProjectRef("a_b", "c").slug, ProjectRef("a-b", "c").slug
    assert underscored != dashed and underscored.startswith("a-b-c-")
    assert ProjectRef("a-b", "c").slug != ProjectRef("a", "b-c").slug
    # No project's name is another's object name with a suffix: job 1 of `model` is not `model-1`.
    assert ClusterJob("a" * 22, 1, 1).name(ProjectRef("alice", "model")) != ProjectRef("alice", "model-1").name()
    assert ProjectRef("alice", "hello").name("canary") != ProjectRef("alice", "hello-canary").name()
    for ref in (ProjectRef("o" * 63, "p" * 63), ProjectRef("alice", "hello-"), ProjectRef("_a", "b_")):
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", ref.name("fallback")), ref.name("fallback")


def test_no_open_network_needs_no_policy() -> None:
    assert render.network_policy(REF, 3, "open") is None
    policy = render.network_policy(REF, 3, "none")
    assert policy["spec"]["egress"] == [] and policy["spec"]["podSelector"]["matchLabels"]["mlserve.io/version"] == "3"


@pytest.mark.parametrize(("shares", "main", "canary", "weight"), [
    (None, "primary", None, 0),
    ({3: 100}, "v3", None, 0),
    ({3: 90, 4: 10}, "v3", "v4", 10),
    ({3: 30, 4: 70}, "v4", "v3", 30),
    ({3: 50, 4: 50, 5: 0}, "v3", "v4", 50),
    # As on one machine: a share of a version without a job goes to the others...
    ({3: 90, 6: 10}, "v3", None, 0),
    # ... and when no version with a share has a job, every primary job takes equal turns.
    ({6: 100}, "primary", None, 0),
])
def test_route_plans(shares, main, canary, weight) -> None:
    jobs = [ClusterJob("a" * 22, 1, 3), ClusterJob("b" * 22, 2, 4), ClusterJob("c" * 22, 3, 5, fallback=True)]
    routes = plan_routes(REF, Traffic(shares), jobs, [1, 3, 4, 5, 6])
    assert (routes.main, routes.canary, routes.weight) == (REF.name(main), canary and REF.name(canary), weight)
    assert routes.fallback == REF.name("fallback")
    assert routes.versions == (1, 3, 4, 5, 6)  # every version keeps its endpoint, with or without a job


def test_three_shared_versions_are_refused_not_silently_ignored() -> None:
    with pytest.raises(UsageError, match="two versions at most"):
        plan_routes(REF, Traffic({3: 80, 4: 10, 5: 10}), [], [3, 4, 5])


@pytest.mark.parametrize("text", ["./models:input", "/data:input", "pvc/Bad_Name:input", "pvc/models:/tmp",
                                  "pvc/models:/run/x", "pvc/models", "pvc/models:../x"])
def test_cluster_mounts_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_cluster_mount(text)


def test_cluster_mount() -> None:
    assert parse_cluster_mount("pvc/models:input") == DataMount("pvc/models", "/input")
