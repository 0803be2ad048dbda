"""mlserve's pods on a real kubelet (tests/cluster/kubelet.py: kubelet 1.20 over Debian's containerd and runc),
beside the control plane's hollow nodes: what hollow nodes cannot show. A Deployment exactly as ``mlserve run
--cluster`` applies it, moved to the real node (a nodeSelector and a toleration, nothing else), becomes Ready
because its exec probes really pass in the container, its pod's IP answers HTTP on 8080 with the app, its log
comes through the API server (``mlserve logs --cluster`` included), and runc enforces its securityContext (uid
65534, read-only root). A readiness probe that fails keeps a pod unready there, as it would not on a hollow node.

A node that cannot start fails these tests; they never skip for want of it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import requests
from kubernetes import client as k8s
from kubernetes.stream import stream

from mlserve.kube.render import ProjectRef
from tests.cluster.kubelet import KERNEL_TUNABLES, PAUSE_IMAGE, RealNode
from tests.harness import make_mlserve, teardown_mlserve

NAMESPACE = "realnode"
URL = "http://realnode.test"
PROBE_APP = Path(__file__).resolve().parents[1] / "integration" / "apps" / "probe"
T = TypeVar("T")


@pytest.fixture(scope="module")
def node(control_plane) -> Iterator[RealNode]:
    real = RealNode()
    try:
        real.start(control_plane)
    except Exception as exc:  # noqa: BLE001 - said in full: these tests must not pass, or skip, without it
        pytest.fail(f"the real node did not start: {exc}")
    print(f"\nreal node {real.name} Ready in {real.started_in:.1f}s: {real.timings}")
    try:
        yield real
    finally:
        real.stop()


@pytest.fixture(scope="module")
def kube(control_plane, docker_client, node):
    """An mlserve home with the control plane as cluster `real` (namespace realnode)."""
    control_plane.namespace(NAMESPACE)
    ms = make_mlserve(owner="kubelet")
    ms("cluster", "add", "real", "--kubeconfig", str(control_plane.admin_kubeconfig), "--context", "admin",
       "--registry", f"{control_plane.registry}/ml", "--namespace", NAMESPACE, "--url", URL)
    yield ms
    ms("stop", "--all", "--cluster", "real", check=False)
    teardown_mlserve(ms, docker_client)


@pytest.fixture(scope="module")
def core(control_plane) -> Iterator[k8s.CoreV1Api]:
    with control_plane.api_client() as api:
        yield k8s.CoreV1Api(api)


def wait_for(what: str, value: Callable[[], T | None], timeout: float = 180,
             explain: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + timeout
    while not (result := value()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{explain()}")
        time.sleep(0.5)
    return result


def _explain(core: k8s.CoreV1Api, node: RealNode, job_id: str) -> Callable[[], str]:
    """What the job's pods, their events and the node's kubelet and containerd say, for a failure's message."""
    def explain() -> str:
        lines = []
        for pod in _pods(core, job_id):
            lines.append(f"pod {pod.metadata.name} on {pod.spec.node_name}: {pod.status.phase}, "
                         f"conditions {[(c.type, c.status) for c in pod.status.conditions or []]}, "
                         f"containers {pod.status.container_statuses}")
            events = core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={pod.metadata.name}")
            lines += [f"  event {e.reason}: {e.message}" for e in events.items]
        return "\n".join([*lines, "--- kubelet:", node.log_tail("kubelet", 30), "--- containerd:",
                          node.log_tail("containerd", 15)])
    return explain


def _pods(core: k8s.CoreV1Api, job_id: str) -> list[k8s.V1Pod]:
    return core.list_namespaced_pod(NAMESPACE, label_selector=f"mlserve.io/job={job_id}").items


def _ready(pod: k8s.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _move_to(control_plane, node: RealNode, deployment: str, **container: object) -> None:
    """Patches the Deployment's pod spec onto the real node (and its container with ``container``)."""
    spec: dict[str, object] = dict(node.pod_spec_patch())
    if container:
        spec["containers"] = [{"name": "app", **container}]
    with control_plane.api_client() as api:
        k8s.AppsV1Api(api).patch_namespaced_deployment(deployment, NAMESPACE, {"spec": {"template": {"spec": spec}}})


def _pod_on(core: k8s.CoreV1Api, node: RealNode, job_id: str, ready: bool | None) -> k8s.V1Pod | None:
    """The job's only pod, if it is on the real node (and Ready, given ready=True), else None."""
    pods = _pods(core, job_id)
    if len(pods) != 1 or pods[0].spec.node_name != node.name or pods[0].metadata.deletion_timestamp:
        return None
    if ready and not _ready(pods[0]):
        return None
    return pods[0]


def _exec(core: k8s.CoreV1Api, pod: str, script: str) -> str:
    """The output of ``sh -c script`` in the pod's container, run through the API server and the kubelet."""
    return stream(core.connect_get_namespaced_pod_exec, pod, NAMESPACE, container="app", command=["sh", "-c", script],
                  stderr=True, stdin=False, stdout=True, tty=False, _request_timeout=60)


def test_mlserve_pod_serves_on_a_real_kubelet(kube, control_plane, node, core, tmp_path):
    project = tmp_path / "pod"
    shutil.copytree(PROBE_APP, project)
    (project / "mlserve.yml").write_text("project: pod\naccess: public\n")
    # mlserve renders, pushes and applies; the pod is Ready at once on a hollow node, as in test_kubernetes.
    started = kube.json("run", "--mode", "serve", "--cluster", "real", cwd=project)
    ref = ProjectRef("kubelet", "pod")
    job_id, deployment = started["id"], ref.name("1")
    assert started["image"].startswith(f"{control_plane.registry}/ml/{ref.slug}@sha256:")
    rendered = _pods(core, job_id)[0].spec

    t0 = time.monotonic()
    _move_to(control_plane, node, deployment)
    pod = wait_for("the pod to be Ready on the real node", lambda: _pod_on(core, node, job_id, ready=True),
                   explain=_explain(core, node, job_id))
    ready_in = time.monotonic() - t0
    events = core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={pod.metadata.name}").items
    print(f"\npod {pod.metadata.name} Ready on the real node {ready_in:.1f}s after the patch, IP {pod.status.pod_ip}; "
          + "; ".join(e.message for e in events if e.reason == "Pulled"))
    # The same pod as mlserve rendered it, but for where it runs.
    [container] = pod.spec.containers
    assert container.image == started["image"] and container.command == rendered.containers[0].command
    assert container.readiness_probe == rendered.containers[0].readiness_probe
    assert container.security_context == rendered.containers[0].security_context
    [status] = pod.status.container_statuses
    assert status.ready and status.started and status.restart_count == 0 and status.state.running
    assert status.image_id.endswith(started["image"].split("@")[1])  # pulled by digest from the registry
    assert pod.status.host_ip == node.ip and pod.status.pod_ip != node.ip

    # The app answers on the pod's IP, from this machine, under each of its prefixes.
    for prefix in (f"/serve/{job_id}", "/serve/kubelet/projects/pod/v/1", "/serve/kubelet/projects/pod"):
        seen = requests.get(f"http://{pod.status.pod_ip}:8080{prefix}/x", timeout=10).json()
        assert (seen["script_name"], seen["path_info"]) == (prefix, "/x")
        assert seen["uid"] == 65534 and seen["job"] == "kubelet/projects/pod/1"

    # The container's log, through the API server from the kubelet, and so through mlserve.
    response = requests.get(f"{control_plane.server}/api/v1/namespaces/{NAMESPACE}/pods/{pod.metadata.name}/log",
                            headers={"Authorization": f"Bearer {control_plane.admin_token}"},
                            verify=str(control_plane.ca_file), timeout=10)
    assert response.status_code == 200 and "uWSGI" in response.text, response.text[:2000]
    logs = kube("logs", "1", "--cluster", "real", cwd=project)
    assert "uWSGI" in logs.stdout, logs.stdout[-2000:]

    # Exec through the API server and the kubelet: runc enforces the securityContext (pid 1 is uWSGI's master).
    ready_command = container.readiness_probe._exec.command
    output = _exec(core, pod.metadata.name, "; ".join([
        "id -u", "id -g", "grep -E '^(Uid|Gid|CapEff):' /proc/1/status",
        "touch /app/x; echo app=$?", "touch /output/x /tmp/x; echo output=$?",
        f"{shlex.join(ready_command)}; echo ready=$?"]))  # what made the pod Ready passes by hand too
    lines = output.splitlines()
    assert lines[:2] == ["65534", "65534"], output
    ids = "\t65534" * 4  # real, effective, saved, filesystem
    assert {f"Uid:{ids}", f"Gid:{ids}", "CapEff:\t0000000000000000"} <= set(lines), output
    assert "Read-only file system" in output and "app=1" in lines, output
    assert "output=0" in lines and "ready=0" in lines, output

    # A readiness command that fails (mlserve's, asking a socket that is not there) keeps the pod unready on
    # a real node: the kubelet ran it in the container and reports why.
    failing = [*ready_command]
    failing[failing.index("--socket") + 1] = "/run/mlserve/sock/nothing-here"
    _move_to(control_plane, node, deployment, readinessProbe={"exec": {"command": failing}})

    def unhealthy() -> k8s.CoreV1Event | None:
        pod = _pod_on(core, node, job_id, ready=None)
        if pod is None or pod.spec.containers[0].readiness_probe._exec.command != failing:
            return None
        events = core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={pod.metadata.name}")
        return next((e for e in events.items if e.reason == "Unhealthy" and "Readiness" in e.message), None)

    event = wait_for("the kubelet to report the failing readiness probe", unhealthy,
                     explain=_explain(core, node, job_id))
    assert event.source.component == "kubelet" and event.source.host == node.name
    [pod] = _pods(core, job_id)
    assert not _ready(pod) and pod.status.container_statuses[0].state.running
    with control_plane.api_client() as api:
        assert not k8s.AppsV1Api(api).read_namespaced_deployment(deployment, NAMESPACE).status.ready_replicas

    kube("stop", "--project", "pod", "--cluster", "real", cwd=project)
    # The kubelet really stops the container (uWSGI stops at once on SIGTERM): the pod goes, its tasks end.
    wait_for("the pod to be gone", lambda: not _pods(core, job_id), timeout=60, explain=_explain(core, node, job_id))
    wait_for("containerd to have no task running", lambda: "RUNNING" not in node.ctr("tasks", "ls").stdout,
             timeout=30, explain=lambda: node.ctr("tasks", "ls").stdout)


def _machine_state() -> dict[str, object]:
    """What a node changes on this machine while it runs, that it must not leave behind: kernel settings,
    iptables chains, folders it only uses in its mount namespace."""
    chains = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    return {"sysctl": {key: Path("/proc/sys", key).read_text() for key in KERNEL_TUNABLES},
            "kube chains": [line for line in chains.splitlines() if "KUBE-" in line],
            "folders": [p for p in ("/var/lib/kubelet", "/var/lib/cni", "/var/log/pods") if Path(p).exists()]}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, nor a zombie that its parent (init, for an orphan) has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopped_node_leaves_nothing_behind(control_plane, core):
    """A second node beside the first: a pod runs there (the sandbox image built here: nothing is pulled), then
    stop() ends its processes, containers included, and removes its bridge, mounts, cgroups, folder and Node."""
    before = _machine_state()
    with RealNode() as other:
        try:
            other.start(control_plane)
        except Exception as exc:  # noqa: BLE001 - a failure, not a skip
            pytest.fail(f"the real node did not start: {exc}")
        name = f"pause-{other.id}"
        core.create_namespaced_pod("default", {"metadata": {"name": name}, "spec": {
            **other.pod_spec_patch(), "containers": [{"name": "pause", "image": PAUSE_IMAGE,
                                                      "imagePullPolicy": "Never"}]}})
        wait_for("the pod to run", lambda: core.read_namespaced_pod(name, "default").status.phase == "Running",
                 timeout=60)
        assert _machine_state() == before  # the kubelet's kernel settings went to files of the node's
        folder, pids = other.dir, other.pids()
        assert len(pids) >= 6  # the namespace's holder, containerd, the kubelet, a shim, pause, the sandbox's
    assert not folder.exists() and not [pid for pid in pids if _alive(pid)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f" {other.bridge}:" not in links
    assert str(folder) not in Path("/proc/self/mountinfo").read_text()
    assert not [*Path("/sys/fs/cgroup").glob(f"*/{other.cgroup}"), *Path("/sys/fs/cgroup").glob(other.cgroup)]
    assert other.name not in {n.metadata.name for n in core.list_node().items}
    assert _machine_state() == before
