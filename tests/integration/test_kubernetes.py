"""The same commands on a Kubernetes cluster, against a real control plane (kube-apiserver, controller
manager and scheduler 1.20 built from Debian's source, etcd, hollow kubemark nodes) and a real
registry. Hollow nodes run no containers: pods report Running and exec probes pass, so these tests
show what mlserve applies, reads back and removes; the pod's container itself is shown serving under
Docker (test_pod_container_serves_under_docker)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from mlserve.kube.render import ProjectRef
from tests.harness import EXAMPLES, make_mlserve, teardown_mlserve

NAMESPACE = "models"  # the restricted user may use this one only
URL = "http://models.test"
PROBE_APP = Path(__file__).parent / "apps" / "probe"


@pytest.fixture(scope="module")
def kube(control_plane, docker_client):
    """An mlserve home with the control plane added as cluster `prod`."""
    control_plane.namespace(NAMESPACE)
    ms = make_mlserve(owner="kuber")
    ms("cluster", "add", "prod", "--kubeconfig", str(control_plane.admin_kubeconfig), "--context", "admin",
       "--registry", f"{control_plane.registry}/ml", "--namespace", NAMESPACE, "--url", URL)
    yield ms
    ms("stop", "--all", "--cluster", "prod", check=False)
    teardown_mlserve(ms, docker_client)


def _ref(project: str) -> ProjectRef:
    return ProjectRef("kuber", project)


def _name(project: str, suffix: str = "") -> str:
    """An object's name as mlserve gives it (the project's slug ends with a hash of its key)."""
    return _ref(project).name(suffix)


def _selector(project: str) -> str:
    return f"mlserve.io/project={_ref(project).slug}"


def _api(control_plane, path: str, method: str = "GET", body: object = None) -> requests.Response:
    return requests.request(method, control_plane.server + path, json=body, verify=str(control_plane.ca_file),
                            headers={"Authorization": f"Bearer {control_plane.admin_token}"}, timeout=10)


def _objects(control_plane, kind_path: str, selector: str) -> list[dict]:
    response = _api(control_plane, f"{kind_path}?labelSelector={selector}")
    response.raise_for_status()
    return response.json()["items"]


def _names(control_plane, kind_path: str, selector: str) -> set[str]:
    return {o["metadata"]["name"] for o in _objects(control_plane, kind_path, selector)}


KINDS = {
    "deployments": f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
    "services": f"/api/v1/namespaces/{NAMESPACE}/services",
    "configmaps": f"/api/v1/namespaces/{NAMESPACE}/configmaps",
    "ingresses": f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/ingresses",
    "networkpolicies": f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies",
    "secrets": f"/api/v1/namespaces/{NAMESPACE}/secrets",
}


def _everything(control_plane, selector: str) -> dict[str, set[str]]:
    return {kind: _names(control_plane, path, selector) for kind, path in KINDS.items()}


def _project(tmp_path: Path, name: str, app: Path = EXAMPLES / "hello") -> Path:
    target = tmp_path / name
    shutil.copytree(app, target)
    (target / "mlserve.yml").write_text(f"project: {name}\naccess: public\n")
    return target


def _ingress(control_plane, name: str) -> dict | None:
    response = _api(control_plane, f"{KINDS['ingresses']}/{name}")
    return None if response.status_code == 404 else response.json()


def _backend(ingress: dict) -> str:
    return ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]


# -- targets ------------------------------------------------------------------------------------


def test_cluster_list_shows_the_target(kube, control_plane):
    [target] = kube.json("cluster", "list")
    assert target["name"] == "prod" and target["namespace"] == NAMESPACE
    assert target["registry"] == f"{control_plane.registry}/ml" and target["url"] == URL


def _add(kube, *args: str) -> tuple[int, str]:
    result = kube("cluster", "add", "bad", *args, check=False, timeout=60)
    return result.returncode, result.stderr


def _common(control_plane) -> list[str]:
    return ["--registry", f"{control_plane.registry}/ml", "--url", URL]


def test_bad_targets_are_refused_and_not_recorded(kube, control_plane, tmp_path):
    admin = str(control_plane.admin_kubeconfig)
    cases = {
        "cannot read the kubeconfig": ["--kubeconfig", str(tmp_path / "missing"), "--namespace", NAMESPACE],
        "has no context named 'nope'": ["--kubeconfig", admin, "--context", "nope", "--namespace", NAMESPACE],
        "no permission": ["--kubeconfig", str(control_plane.restricted_kubeconfig), "--context", "restricted",
                          "--namespace", "default"],
        "there is no namespace": ["--kubeconfig", admin, "--context", "admin", "--namespace", "no-such-ns"],
    }
    # An API server that does not answer, and one that does not accept the token.
    config = yaml.safe_load(Path(admin).read_text())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    (tmp_path / "down").write_text(yaml.safe_dump(config))
    cases["does not answer"] = ["--kubeconfig", str(tmp_path / "down"), "--context", "admin", "--namespace", NAMESPACE]
    config = yaml.safe_load(Path(admin).read_text())
    config["users"][0]["user"]["token"] = "not-a-token"
    (tmp_path / "badtoken").write_text(yaml.safe_dump(config))
    cases["does not accept the kubeconfig's credentials"] = ["--kubeconfig", str(tmp_path / "badtoken"), "--context",
                                                             "admin", "--namespace", NAMESPACE]
    (tmp_path / "notyaml").write_text("{{{")
    cases["is not YAML"] = ["--kubeconfig", str(tmp_path / "notyaml"), "--namespace", NAMESPACE]
    for expected, args in cases.items():
        code, err = _add(kube, *args, *_common(control_plane))
        assert code != 0 and expected in err, (expected, err)
    for args, expected in [(["--registry", "HTTP://x", "--url", URL], "not a registry address"),
                           (["--registry", "r.example/ml", "--url", "ftp://x"], "is not the address"),
                           (["--registry", "r.example/ml", "--url", "https://x/path"], "is not the address"),
                           (["--registry", "r.example/ml", "--url", URL, "--namespace", "Bad_NS"], "not a namespace")]:
        code, err = _add(kube, "--kubeconfig", admin, *args)
        assert code == 2 and expected in err, err
    assert [t["name"] for t in kube.json("cluster", "list")] == ["prod"]


def test_a_cluster_that_does_not_exist(kube):
    result = kube("status", "--cluster", "nowhere", check=False)
    assert result.returncode != 0 and "no cluster named 'nowhere'" in result.stderr and "prod" in result.stderr
    result = kube("status", check=False, env={"MLSERVE_CLUSTER": "nowhere"})
    assert result.returncode != 0 and "no cluster named 'nowhere'" in result.stderr


# -- serving ------------------------------------------------------------------------------------


def test_run_scale_canary_traffic_and_stop(kube, control_plane, tmp_path):
    project = _project(tmp_path, "hello")
    selector = _selector("hello")
    # Something of the user's own in the namespace: never touched by mlserve.
    _api(control_plane, KINDS["configmaps"], "POST",
         {"metadata": {"name": "users-own", "labels": {"mlserve.io/project": _ref("hello").slug}}, "data": {"a": "b"}})

    started = kube.json("run", "--mode", "serve", "--cluster", "prod", cwd=project)
    assert started["version"] == 1 and started["runtime"] == "kubernetes" and started["cluster"] == "prod"
    assert started["endpoint"] == f"{URL}/serve/{started['id']}"
    assert started["project_endpoint"] == f"{URL}/serve/kuber/projects/hello"
    assert started["image"].startswith(f"{control_plane.registry}/ml/{_ref('hello').slug}@sha256:")
    # The image is really in the registry, by the digest the pods run.
    name, digest = started["image"].split("/", 1)[1].split("@")
    manifest = requests.get(f"http://{control_plane.registry}/v2/{name}/manifests/{digest}", timeout=10,
                            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert manifest.status_code == 200

    objects = _everything(control_plane, "app.kubernetes.io/managed-by=mlserve," + selector)
    assert objects["deployments"] == {_name("hello", "1")}
    assert objects["services"] == {_name("hello", "1"), _name("hello", "primary"), _name("hello", "v1")}
    assert objects["configmaps"] == {_name("hello"), _name("hello", "1")}
    assert objects["ingresses"] == {_name("hello"), _name("hello", "direct")}
    assert objects["networkpolicies"] == {_name("hello", "v1")}
    [deployment] = _objects(control_plane, KINDS["deployments"], "mlserve.io/job=" + started["id"])
    assert deployment["status"]["readyReplicas"] == 1
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == started["image"]

    [job] = kube.json("status", "--cluster", "prod")
    assert job["job"] == "kuber/projects/hello/1" and job["ready"] and job["state"] == "ready"

    scaled = kube("scale", "3", "--cluster", "prod", cwd=project)
    assert scaled.stdout.count("  ready  ") == 3, scaled.stdout
    jobs = kube.json("status", "--cluster", "prod")
    assert len(jobs) == 3 and all(j["ready"] for j in jobs)
    direct = _ingress(control_plane, _name("hello", "direct"))
    paths = {p["path"] for p in direct["spec"]["rules"][0]["http"]["paths"]}
    assert {f"/serve/{j['id']}" for j in jobs} | {"/serve/kuber/projects/hello/v/1"} == paths

    canary = kube.json("run", "--mode", "serve", "--cluster", "prod", "--canary", "10", cwd=project)
    assert canary["version"] == 2
    assert _backend(_ingress(control_plane, _name("hello"))) == _name("hello", "v1")
    weighted = _ingress(control_plane, _name("hello", "canary"))
    assert _backend(weighted) == _name("hello", "v2")
    assert weighted["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "10"
    rows = kube.json("traffic", "--cluster", "prod", cwd=project)
    assert {r["version"]: r["percent"] for r in rows} == {1: 90, 2: 10}
    versions = kube.json("versions", "--cluster", "prod", cwd=project)
    assert [(v["version"], v["jobs"], v["healthy"]) for v in versions] == [(1, 3, 3), (2, 1, 1)]
    assert versions[1]["image"] == canary["image"] and versions[1]["endpoint"] == f"{URL}/serve/kuber/projects/hello/v/2"

    kube("traffic", "--cluster", "prod", "--to", "1=40", "--to", "2=60", cwd=project)
    assert _backend(_ingress(control_plane, _name("hello"))) == _name("hello", "v2")
    assert _ingress(control_plane, _name("hello", "canary"))["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/canary-weight"] == "40"
    refused = kube("traffic", "--cluster", "prod", "--sticky", cwd=project, check=False)
    assert refused.returncode == 2 and "not available on a cluster" in refused.stderr
    kube("traffic", "--cluster", "prod", "--to-latest", cwd=project)
    assert _ingress(control_plane, _name("hello", "canary")) is None
    assert _backend(_ingress(control_plane, _name("hello"))) == _name("hello", "v2")

    # Logs come through the API server from the node's kubelet; a hollow node has none to give, and
    # the command says so in a line (a real kubelet's log is not shown here: see the closing note).
    logs = kube("logs", "1", "--cluster", "prod", cwd=project, check=False)
    assert logs.returncode != 0 and f"read the log of pod {_name('hello', '1')}-" in logs.stderr, logs.stderr
    assert "Traceback" not in logs.stderr
    missing = kube("logs", "99", "--cluster", "prod", cwd=project, check=False)
    assert missing.returncode != 0 and "no job kuber/projects/hello/99 on cluster prod" in missing.stderr

    kube("stop", "hello/1", "--cluster", "prod", cwd=project)
    assert _name("hello", "1") not in _names(control_plane, KINDS["deployments"], selector)
    assert _name("hello", "1") not in _names(control_plane, KINDS["services"], selector)
    assert len(kube.json("status", "--cluster", "prod")) == 3

    kube("stop", "--project", "hello", "--cluster", "prod", cwd=project)
    left = _everything(control_plane, selector)
    assert left == {**{k: set() for k in KINDS}, "configmaps": {"users-own"}}, left


def test_replace_and_fallback(kube, control_plane, tmp_path):
    project = _project(tmp_path, "swap")
    selector = _selector("swap")
    kube("run", "--mode", "serve", "--cluster", "prod", cwd=project)
    kube("scale", "2", "--cluster", "prod", cwd=project)
    fallback = kube.json("run", "--mode", "serve", "--cluster", "prod", "--fallback", cwd=project)
    assert fallback["version"] == 2
    main = _ingress(control_plane, _name("swap"))
    assert main["metadata"]["annotations"]["nginx.ingress.kubernetes.io/default-backend"] == _name("swap", "fallback")
    assert _backend(main) == _name("swap", "primary")
    service = _api(control_plane, f"{KINDS['services']}/{_name('swap', 'fallback')}").json()
    assert service["spec"]["selector"]["mlserve.io/role"] == "fallback"

    replaced = kube.json("run", "--mode", "serve", "--cluster", "prod", "--replace", cwd=project)
    assert replaced["version"] == 3 and len(replaced["jobs"]) == 2
    assert sorted(replaced["replaced"]) == ["kuber/projects/swap/1", "kuber/projects/swap/2"]
    jobs = kube.json("status", "--cluster", "prod")
    assert sorted((j["version"], j["fallback"]) for j in jobs) == [(2, True), (3, False), (3, False)]
    assert _names(control_plane, KINDS["deployments"], selector) == {
        _name("swap", "3"), _name("swap", "4"), _name("swap", "5")}
    kube("stop", "--project", "swap", "--cluster", "prod")


def test_secrets_become_a_kubernetes_secret(kube, control_plane, tmp_path):
    project = _project(tmp_path, "secretive")
    subprocess.run([sys.executable, "-m", "mlserve", "secret", "set", "API_KEY", "--project", "secretive"],
                   input="s3cr3t", text=True, env=kube.env, check=True, capture_output=True)
    kube("run", "--mode", "serve", "--cluster", "prod", cwd=project)
    secret = _api(control_plane, f"{KINDS['secrets']}/{_name('secretive', 'secrets')}").json()
    assert base64.b64decode(secret["data"]["API_KEY"]) == b"s3cr3t"
    [deployment] = _objects(control_plane, KINDS["deployments"], _selector("secretive"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": _name("secretive", "secrets"), "optional": True}}]
    assert "s3cr3t" not in json.dumps(deployment)  # only the Secret holds the value
    kube("stop", "--project", "secretive", "--cluster", "prod")
    assert _everything(control_plane, _selector("secretive")) == {k: set() for k in KINDS}


# -- faults -------------------------------------------------------------------------------------


def test_a_rollout_that_never_becomes_ready_is_rolled_back(kube, control_plane, tmp_path):
    """A claim that does not exist keeps the pod Pending: the run waits, shows the pod's events, and
    removes what it applied; a serving project is left exactly as it was."""
    project = _project(tmp_path, "pending")
    kube("run", "--mode", "serve", "--cluster", "prod", cwd=project)
    before = _everything(control_plane, _selector("pending"))
    record = _api(control_plane, f"{KINDS['configmaps']}/{_name('pending')}").json()["data"]["record"]
    ingress = _ingress(control_plane, _name("pending"))

    failed = kube("run", "--mode", "serve", "--cluster", "prod", "--canary", "50", "--data", "pvc/missing:input",
                  cwd=project, check=False, env={"MLSERVE_CLUSTER_WAIT_S": "10"})
    assert failed.returncode != 0
    assert "not ready after 10 s" in failed.stderr and "missing" in failed.stderr, failed.stderr
    assert _everything(control_plane, _selector("pending")) == before
    assert _api(control_plane, f"{KINDS['configmaps']}/{_name('pending')}").json()["data"]["record"] == record
    assert _ingress(control_plane, _name("pending"))["spec"] == ingress["spec"]
    assert [j["ready"] for j in kube.json("status", "--cluster", "prod")] == [True]

    # A project's first run that fails leaves nothing at all.
    fresh = _project(tmp_path, "neverready")
    failed = kube("run", "--mode", "serve", "--cluster", "prod", "--data", "pvc/missing:input", cwd=fresh,
                  check=False, env={"MLSERVE_CLUSTER_WAIT_S": "5"})
    assert failed.returncode != 0 and "not ready" in failed.stderr
    assert _everything(control_plane, _selector("neverready")) == {k: set() for k in KINDS}
    kube("stop", "--project", "pending", "--cluster", "prod")


def test_a_registry_that_refuses_the_push(kube, control_plane, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    kube("cluster", "add", "noreg", "--kubeconfig", str(control_plane.admin_kubeconfig), "--context", "admin",
         "--registry", f"127.0.0.1:{port}/ml", "--namespace", NAMESPACE, "--url", URL)
    project = _project(tmp_path, "unpushed")
    failed = kube("run", "--mode", "serve", "--cluster", "noreg", cwd=project, check=False)
    assert failed.returncode != 0 and f"127.0.0.1:{port}" in failed.stderr, failed.stderr
    assert _everything(control_plane, _selector("unpushed")) == {k: set() for k in KINDS}
    kube("cluster", "remove", "noreg")


def test_bad_input_on_a_cluster_changes_nothing(kube, control_plane, tmp_path):
    project = _project(tmp_path, "refused")
    for args, expected in [
        (["--data", f"{tmp_path}:input"], "cannot mount this machine's folders"),
        (["--max-runtime", "1h"], "not enforced on a cluster"),
        (["--runtime", "local"], "--runtime"),
        (["--access", "token"], "tokens are not checked"),
    ]:
        result = kube("run", "--mode", "serve", "--cluster", "prod", *args, cwd=project, check=False)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
    (project / "mlserve.yml").write_text("project: refused\n")  # no access: public
    result = kube("run", "--mode", "serve", "--cluster", "prod", cwd=project, check=False)
    assert result.returncode == 2 and "--access public" in result.stderr
    assert _everything(control_plane, _selector("refused")) == {k: set() for k in KINDS}
    result = kube("scale", "2", "--project", "refused", "--cluster", "prod", check=False)
    assert result.returncode != 0 and "no project kuber/projects/refused" in result.stderr


def test_cluster_from_mlserve_yml_and_remove_refused_while_jobs_run(kube, control_plane, tmp_path):
    """mlserve.yml (maybe a cloned repository's) may name a cluster, but never publishes there alone,
    never makes `stop --all` reach it, and `--cluster ''` keeps a command on this machine."""
    project = _project(tmp_path, "configured")
    (project / "mlserve.yml").write_text("project: configured\naccess: public\ncluster: prod\n")
    refused = kube("run", "--mode", "serve", cwd=project, check=False)
    assert refused.returncode == 2 and "sends kuber/projects/configured to cluster prod" in refused.stderr
    assert _everything(control_plane, _selector("configured")) == {k: set() for k in KINDS}
    started = kube.json("run", "--mode", "serve", "--access", "public", cwd=project)
    assert started["cluster"] == "prod"
    result = kube("cluster", "remove", "prod", check=False)
    assert result.returncode == 2 and "still run on cluster prod" in result.stderr
    assert [j["job"] for j in kube.json("status", cwd=project)] == ["kuber/projects/configured/1"]
    assert kube.json("status", "--cluster", "", cwd=project) == []  # this machine's jobs: none
    everything = kube("stop", "--all", cwd=project, check=False)
    assert everything.returncode == 2 and "needs it named" in everything.stderr
    assert len(kube.json("status", cwd=project)) == 1
    kube("stop", "--project", "configured", cwd=project)
    assert _everything(control_plane, _selector("configured")) == {k: set() for k in KINDS}


# -- the pod's container, really serving -----------------------------------------------------------


def test_pod_container_serves_under_docker(kube, control_plane, docker_client, tmp_path):
    """Hollow nodes run no containers: the pod's container, exactly as the Deployment on the cluster
    says (image by digest from the registry, user, read-only root, environment, mounts, probes), is
    started under the local Docker engine, must answer HTTP with its prefixes, and pass both probes."""
    project = _project(tmp_path, "pod", app=PROBE_APP)
    started = kube.json("run", "--mode", "serve", "--cluster", "prod", cwd=project)
    [deployment] = _objects(control_plane, KINDS["deployments"], "mlserve.io/job=" + started["id"])
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    config = _api(control_plane, f"{KINDS['configmaps']}/{pod['volumes'][0]['configMap']['name']}").json()["data"]
    run_files = tmp_path / "run"
    run_files.mkdir()
    volumes, tmpfs = {}, {}
    by_name = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = by_name[mount["name"]]
        if "configMap" in volume:
            for name, text in config.items():
                (run_files / name).write_text(text)
            run_files.chmod(0o755)
            volumes[str(run_files)] = {"bind": mount["mountPath"], "mode": "ro"}
        else:
            size = volume["emptyDir"]["sizeLimit"]
            tmpfs[mount["mountPath"]] = f"rw,size={size},mode=1777"
    security = container["securityContext"]
    docker_client.images.pull(container["image"])
    instance = docker_client.containers.run(
        container["image"], container["args"], entrypoint=container["command"], detach=True, user=f"{security['runAsUser']}:{security['runAsGroup']}",
        read_only=security["readOnlyRootFilesystem"], cap_drop=security["capabilities"]["drop"],
        security_opt=["no-new-privileges"], environment={e["name"]: e["value"] for e in container["env"]},
        volumes=volumes, tmpfs=tmpfs, ports={"8080/tcp": ("127.0.0.1", None)}, labels={"mlserve-test": "pod"})
    try:
        instance.reload()
        port = instance.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"]
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            ready = instance.exec_run(container["readinessProbe"]["exec"]["command"], user="65534")
            if ready.exit_code == 0:
                break
            time.sleep(0.5)
        assert ready is not None and ready.exit_code == 0, ready.output
        live = instance.exec_run(container["livenessProbe"]["exec"]["command"], user="65534")
        assert live.exit_code == 0, live.output
        base = f"http://127.0.0.1:{port}"
        for prefix in (f"/serve/{started['id']}", "/serve/kuber/projects/pod/v/1", "/serve/kuber/projects/pod"):
            seen = requests.get(f"{base}{prefix}/predict", timeout=10).json()
            assert (seen["script_name"], seen["path_info"]) == (prefix, "/predict")
            assert seen["uid"] == 65534 and seen["job"] == "kuber/projects/pod/1"
        # A client cannot ask for the health answer over HTTP.
        spoofed = requests.get(f"{base}/serve/kuber/projects/pod/", headers={"MLSERVE-HEALTH": "1"}, timeout=10).json()
        assert spoofed["path_info"] == "/"
        # The root filesystem is read-only, /output is writable.
        assert instance.exec_run(["touch", "/app/x"], user="65534").exit_code != 0
        assert instance.exec_run(["touch", "/output/x"], user="65534").exit_code == 0
    finally:
        instance.remove(force=True)
        kube("stop", "--project", "pod", "--cluster", "prod")
