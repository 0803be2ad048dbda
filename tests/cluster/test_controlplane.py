"""The test cluster itself (tests/cluster/controlplane.py), through the official `kubernetes` client as mlserve's
``--cluster`` mode will use it: hollow nodes run Deployments, Services get Endpoints, networking.k8s.io/v1
Ingress and NetworkPolicy are accepted, RBAC confines the restricted user, the registry takes a push. Also pins
what a hollow node does differently from a real one (the module docstring of controlplane.py)."""

from __future__ import annotations

import io
import json
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.cluster.controlplane import RESTRICTED_NAMESPACE, ControlPlane, start_for_tests

T = TypeVar("T")
LABELS = {"app.kubernetes.io/managed-by": "mlserve-test"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    plane = start_for_tests()  # raises, and so fails every test here, if it cannot start
    print(f"\ncontrol plane started in {plane.started_in:.1f}s: {plane.server}, registry {plane.registry}")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def api(cluster: ControlPlane) -> Iterator[k8s.ApiClient]:
    with cluster.api_client() as client:
        yield client


def wait_for(what: str, value: Callable[[], T | None], timeout: float = 60) -> T:
    """The first true ``value()`` within ``timeout`` seconds, else an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while (result := value()) is None or not result:
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.2)
    return result


def deployment(name: str, probe: k8s.V1Probe | None, image: str = "example.invalid/model:1") -> k8s.V1Deployment:
    """One replica of one container requesting what an mlserve model will (100m CPU, 256Mi)."""
    labels = {**LABELS, "app": name}
    container = k8s.V1Container(
        name="model", image=image, readiness_probe=probe, ports=[k8s.V1ContainerPort(container_port=8080)],
        resources=k8s.V1ResourceRequirements(requests={"cpu": "100m", "memory": "256Mi"}),
    )
    return k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name=name, labels=labels),
        spec=k8s.V1DeploymentSpec(
            replicas=1, selector=k8s.V1LabelSelector(match_labels={"app": name}),
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels),
                                           spec=k8s.V1PodSpec(containers=[container])),
        ),
    )


def exec_probe(*command: str) -> k8s.V1Probe:
    return k8s.V1Probe(_exec=k8s.V1ExecAction(command=list(command)), period_seconds=1)


def pod_of(core: k8s.CoreV1Api, namespace: str, app: str) -> k8s.V1Pod | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return pods[0] if pods else None


def is_ready(pod: k8s.V1Pod | None) -> bool:
    return pod is not None and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_nodes_are_ready(cluster: ControlPlane, api: k8s.ApiClient) -> None:
    nodes = k8s.CoreV1Api(api).list_node().items
    assert sorted(n.metadata.name for n in nodes) == ["hollow-node-0", "hollow-node-1", "hollow-node-2"]
    for node in nodes:
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
        assert node.status.allocatable["cpu"] == "1" and node.status.allocatable["memory"] == "3840Mi"
        assert node.status.node_info.kubelet_version == "v1.20.2"
        assert [a.type for a in node.status.addresses] == ["InternalIP", "Hostname"]


@pytest.fixture(scope="module")
def available_deployment(cluster: ControlPlane, api: k8s.ApiClient) -> tuple[str, str]:
    """A Deployment whose pod has an exec readiness probe, available: (namespace, name)."""
    namespace = cluster.namespace("deploy")
    started = time.monotonic()
    k8s.AppsV1Api(api).create_namespaced_deployment(namespace, deployment("model", exec_probe("true")))
    wait_for("the Deployment to be available",
             lambda: k8s.AppsV1Api(api).read_namespaced_deployment("model", namespace).status.available_replicas)
    print(f"\nDeployment available {time.monotonic() - started:.1f}s after its creation")
    return namespace, "model"


def test_deployment_becomes_available_on_a_hollow_node(available_deployment: tuple[str, str],
                                                       api: k8s.ApiClient) -> None:
    namespace, name = available_deployment
    pod = pod_of(k8s.CoreV1Api(api), namespace, name)
    assert pod is not None and is_ready(pod)
    assert pod.spec.node_name.startswith("hollow-node-") and pod.status.phase == "Running"


def test_service_gets_endpoints(available_deployment: tuple[str, str], api: k8s.ApiClient) -> None:
    namespace, name = available_deployment
    core = k8s.CoreV1Api(api)
    service = core.create_namespaced_service(namespace, k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name=name, labels=LABELS),
        spec=k8s.V1ServiceSpec(selector={"app": name}, ports=[k8s.V1ServicePort(port=80, target_port=8080)]),
    ))
    assert service.spec.cluster_ip.startswith("10.96.")

    def addresses() -> list[k8s.V1EndpointAddress] | None:
        try:
            subsets = core.read_namespaced_endpoints(name, namespace).subsets or []
        except ApiException as exc:
            if exc.status == 404:  # the endpoints controller has not made them yet
                return None
            raise
        return [address for subset in subsets for address in subset.addresses or []]

    [address] = wait_for("the Service's endpoints", addresses)
    assert address.target_ref.kind == "Pod" and address.node_name.startswith("hollow-node-")
    assert address.ip == "192.168.192.168"  # the fake runtime's one pod IP


def test_ingress_and_network_policy_are_accepted(cluster: ControlPlane, api: k8s.ApiClient) -> None:
    namespace = cluster.namespace("edge")
    networking = k8s.NetworkingV1Api(api)
    backend = k8s.V1IngressBackend(service=k8s.V1IngressServiceBackend(
        name="model", port=k8s.V1ServiceBackendPort(number=80)))
    networking.create_namespaced_ingress(namespace, k8s.V1Ingress(
        metadata=k8s.V1ObjectMeta(name="model", labels=LABELS),
        spec=k8s.V1IngressSpec(rules=[k8s.V1IngressRule(host="model.example.test", http=k8s.V1HTTPIngressRuleValue(
            paths=[k8s.V1HTTPIngressPath(path="/", path_type="Prefix", backend=backend)]))]),
    ))
    networking.create_namespaced_network_policy(namespace, k8s.V1NetworkPolicy(
        metadata=k8s.V1ObjectMeta(name="model", labels=LABELS),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels={"app": "model"}), policy_types=["Ingress"],
            ingress=[k8s.V1NetworkPolicyIngressRule(
                _from=[k8s.V1NetworkPolicyPeer(pod_selector=k8s.V1LabelSelector(match_labels={"role": "gateway"}))],
                ports=[k8s.V1NetworkPolicyPort(port=8080, protocol="TCP")],
            )],
        ),
    ))
    selector = ",".join(f"{k}={v}" for k, v in LABELS.items())
    [ingress] = networking.list_namespaced_ingress(namespace, label_selector=selector).items
    assert ingress.spec.rules[0].http.paths[0].backend.service.port.number == 80
    [policy] = networking.list_namespaced_network_policy(namespace, label_selector=selector).items
    assert policy.spec.ingress[0].ports[0].port == 8080
    with pytest.raises(ApiException) as invalid:  # the API server validates: a path must start with /
        networking.create_namespaced_ingress(namespace, k8s.V1Ingress(
            metadata=k8s.V1ObjectMeta(name="bad"),
            spec=k8s.V1IngressSpec(rules=[k8s.V1IngressRule(http=k8s.V1HTTPIngressRuleValue(
                paths=[k8s.V1HTTPIngressPath(path="no-slash", path_type="Prefix", backend=backend)]))]),
        ))
    assert invalid.value.status == 422


def test_restricted_user_is_confined_to_its_namespace(cluster: ControlPlane) -> None:
    config_map = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="settings", labels=LABELS), data={"a": "1"})
    secret = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="token", labels=LABELS), string_data={"t": "x"})
    with cluster.api_client("restricted") as restricted:
        core = k8s.CoreV1Api(restricted)
        core.create_namespaced_config_map(RESTRICTED_NAMESPACE, config_map)
        core.create_namespaced_secret(RESTRICTED_NAMESPACE, secret)
        selector = ",".join(f"{k}={v}" for k, v in LABELS.items())
        assert [c.data for c in core.list_namespaced_config_map(RESTRICTED_NAMESPACE, label_selector=selector).items] \
            == [{"a": "1"}]
        assert len(core.list_namespaced_secret(RESTRICTED_NAMESPACE, label_selector=selector).items) == 1
        for call in (lambda: core.create_namespaced_config_map("default", config_map),
                     lambda: core.list_namespaced_secret("default"),
                     lambda: core.list_namespace()):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403


@pytest.mark.integration  # the Docker engine pushes
def test_docker_push_to_the_registry(cluster: ControlPlane, docker_client) -> None:
    repository, tag = f"{cluster.registry}/mlserve-test/tiny", str(time.time_ns())
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    docker_client.api.import_image_from_data(layer.getvalue(), repository=repository, tag=tag)
    try:
        progress = list(docker_client.images.push(repository, tag=tag, stream=True, decode=True))
        assert not [p for p in progress if "error" in p or "errorDetail" in p], progress
    finally:
        docker_client.images.remove(f"{repository}:{tag}")
    with urllib.request.urlopen(f"http://{cluster.registry}/v2/mlserve-test/tiny/tags/list", timeout=10) as response:
        assert tag in json.load(response)["tags"]


def test_hollow_nodes_fake_probes_and_images(cluster: ControlPlane, api: k8s.ApiClient) -> None:
    """What controlplane.py's docstring says of hollow nodes: exec probes always pass (even `false`), HTTP probes
    never do, images are never pulled (a missing one runs)."""
    namespace = cluster.namespace("fidelity")
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    http = k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/healthz", port=8080), period_seconds=1, timeout_seconds=1)
    apps.create_namespaced_deployment(namespace, deployment("exec-false", exec_probe("false")))
    apps.create_namespaced_deployment(namespace, deployment("http-probe", http))
    apps.create_namespaced_deployment(namespace, deployment("missing-image", None,
                                                            image=f"{cluster.registry}/absent/image:never-pushed"))
    def ready(app: str) -> k8s.V1Pod | None:
        pod = pod_of(core, namespace, app)
        return pod if is_ready(pod) else None

    wait_for("exec-false ready", lambda: ready("exec-false"))
    [status] = wait_for("missing-image ready", lambda: ready("missing-image")).status.container_statuses
    assert status.state.running is not None and status.state.waiting is None  # no ErrImagePull
    wait_for("http-probe running", lambda: (pod := pod_of(core, namespace, "http-probe")) and
             pod.status.phase == "Running")
    time.sleep(5)  # five probe periods
    assert not is_ready(pod_of(core, namespace, "http-probe"))
    assert not apps.read_namespaced_deployment("http-probe", namespace).status.available_replicas
