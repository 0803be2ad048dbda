"""A real Kubernetes 1.20 control plane on loopback, for the integration tests of mlserve's ``--cluster`` mode.

``ControlPlane(bin_dir).start()`` runs, in a fresh temporary folder and on free ports of 127.0.0.1:

- etcd (Debian's ``/usr/bin/etcd``, from etcd-server);
- kube-apiserver over HTTPS (a CA made here with ``openssl``), with static tokens for an admin (system:masters),
  a ``restricted`` user allowed everything in namespace ``models`` only, and one user per node;
- kube-controller-manager and kube-scheduler;
- hollow nodes: ``kubemark --morph=kubelet``, a real kubelet over a fake container runtime;
- a registry: Debian's ``docker-registry`` (``docker push 127.0.0.1:PORT/x:tag`` works over plain HTTP: Docker
  trusts 127.0.0.0/8 registries without TLS by default).

The binaries come from ``tests/cluster/build-kubernetes`` (built from Debian's ``kubernetes`` source package once
per machine, then cached), or from the folder MLSERVE_KUBE_BIN names. ``start_for_tests()`` does both steps and
raises ControlPlaneError (a RuntimeError) when anything is missing: cluster tests fail, they never skip.

What a hollow node is, and is not (kubemark of Kubernetes 1.20.2):

- Capacity = allocatable: cpu 1, memory 3840Mi (the fake cAdvisor's machine), pods 110, ephemeral-storage 0 (a
  pod requesting ephemeral storage never fits). Three nodes hold exactly 30 pods requesting 100m CPU and
  nothing else (CPU is the limit; memory allows 15 per node at 256Mi): pass ``nodes=4`` or more when a test
  needs headroom (a rolling update surges by a pod per Deployment).
- Nothing runs: the fake runtime reports every container Running as soon as the kubelet starts it.
- Exec probes always succeed without running anything: ``["true"]`` and ``["false"]`` both make a container
  Ready (the fake runtime answers every exec with success). A Deployment with one replica and an exec probe
  (periodSeconds 1) is available 1-4s after it is created.
- HTTP (and TCP) probes are real requests from the node's network namespace to the pod IP the fake runtime
  reports (the same 192.168.192.168 for every pod); nothing answers there, so such containers never become
  Ready (they stay Running, Ready False, and the Deployment never becomes available).
- Images are never pulled: a pod with an image that exists nowhere (or a registry that does not answer) is
  Running like any other, there is no ErrImagePull/ImagePullBackOff; the node only records the image name
  among its images. Whether an image was pushed has to be checked against the registry itself.
- Pods get the fake runtime's IP, 192.168.192.168, all of them: a Service gets Endpoints (one address per
  ready pod, all with that IP), but no traffic can reach a pod. Their hostIP is the node's, 10.240.0.N.
- The hollow kubelet sends no events (kubemark gives it no event client): no Pulled/Started/Unhealthy/Killing;
  the controllers' and the scheduler's events are there.

Each hollow node runs in network and mount namespaces of its own (``unshare --net --mount``), because kubemark
1.20 cannot be told where to listen or where to put its runtime's socket:

- the kubelet's server (HTTP, no authentication, with the debugging handlers that serve /var/log) binds to
  0.0.0.0:10250, hard-coded: in its own network namespace that is no address of this machine's;
- the kubelet adds iptables chains (KUBE-MARK-DROP, KUBE-FIREWALL, ...) to the network namespace it runs in;
- the fake runtime listens on unix:///tmp/kubelet_remote.sock, hard-coded, and removes a socket already there:
  each node gets a /tmp of its own (a bind mount, seen by that node only);
- the kubelet finds its node IP by looking its name up (/etc/hosts, bind-mounted per node) and checking that the
  address is on one of its interfaces: each node gets 10.240.0.N on its own loopback interface, its InternalIP.

A node reaches the API server through 127.0.0.1:<api port> in its namespace, which this process forwards to the
API server's port (``_Forwarder``): the nodes' kubeconfigs hold the same URL as everyone else's.

The ``kubernetes`` client (37.x, models validated by pydantic) against this 1.20 API server: what mlserve uses
works (core/v1, apps/v1, networking.k8s.io/v1, rbac), but some 1.20 objects fail the client's validation:
events.k8s.io/v1 Events (read core/v1 Events instead) and CSINodes (``drivers: null``); discovery.k8s.io/v1
EndpointSlices do not exist in 1.20 (v1beta1 only). kubernetes-validate has no schemas older than 1.25.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

BUILD_SCRIPT = Path(__file__).resolve().with_name("build-kubernetes")
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubemark")
ETCD = Path("/usr/bin/etcd")
REGISTRY = Path("/usr/bin/docker-registry")
# Host tools: certificates, and the hollow nodes' namespaces (util-linux).
TOOLS = ("openssl", "unshare", "mount")

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service's, in the serving cert
POD_CIDRS = "10.244.{}.0/24"  # hollow node N's pod CIDR (the pods' IP is the fake runtime's all the same)
NODE_IPS = "10.240.0.{}"  # hollow node N's InternalIP, on the loopback interface of its own network namespace
RESTRICTED_NAMESPACE = "models"

START_TIMEOUT = 90.0  # seconds for any one readiness step; a start takes ~7s in all (binaries cached)

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane cannot start, or a component of it did not become ready."""


@dataclass
class Component:
    """A process this control plane started, in a process group (session) of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


class ControlPlane:
    """A Kubernetes 1.20 control plane, hollow nodes and a registry on 127.0.0.1; see the module's docstring.

    ``start()`` returns once everything answers: the API server is ready, the nodes are Ready, the controller
    manager has given namespaces ``default`` and ``models`` their ServiceAccount token, the scheduler and the
    registry answer. ``stop()`` (or leaving the ``with`` block) ends every process and removes the folder.
    """

    def __init__(self, bin_dir: Path | str, nodes: int = 3) -> None:
        self.bin_dir = Path(bin_dir)
        self.node_names = [f"hollow-node-{i}" for i in range(nodes)]
        self.dir = Path(tempfile.mkdtemp(prefix="mlskube-"))
        self.components: dict[str, Component] = {}
        self.started_in: float | None = None  # seconds start() took
        self.timings: dict[str, float] = {}  # what start() waited for -> seconds into start() it was there
        self._start_time = time.monotonic()
        self._forwarders: list[_Forwarder] = []
        self._ports: dict[str, int] = {}
        self._tokens = {name: secrets.token_hex(16) for name in ("admin", "restricted", *self.node_names)}
        self._stopped = False

    # What tests and mlserve use.

    @property
    def server(self) -> str:
        """The API server's URL, https://127.0.0.1:PORT."""
        return f"https://127.0.0.1:{self._ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signed the serving certificates of the API server and the components."""
        return self.dir / "pki" / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        """A kubeconfig whose context ``admin`` (the current one) is a cluster admin (group system:masters)."""
        return self.dir / "kubeconfig" / "admin.yaml"

    @property
    def restricted_kubeconfig(self) -> Path:
        """A kubeconfig whose context ``restricted`` (the current one) may do anything in namespace ``models``
        and nothing in other namespaces."""
        return self.dir / "kubeconfig" / "restricted.yaml"

    @property
    def admin_token(self) -> str:
        return self._tokens["admin"]

    @property
    def restricted_token(self) -> str:
        return self._tokens["restricted"]

    @property
    def registry(self) -> str:
        """The registry's address, 127.0.0.1:PORT (plain HTTP)."""
        return f"127.0.0.1:{self._ports['registry']}"

    def api_client(self, context: str = "admin") -> k8s.ApiClient:
        """A new client of the official ``kubernetes`` package, as ``admin`` or ``restricted``."""
        kubeconfigs = {"admin": self.admin_kubeconfig, "restricted": self.restricted_kubeconfig}
        if context not in kubeconfigs:
            raise ValueError(f"no context {context!r}: admin or restricted")
        kubeconfig = kubeconfigs[context]
        return new_client_from_config(config_file=str(kubeconfig), context=context)

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        """Creates namespace ``name`` (if missing) and waits for its default ServiceAccount's token, without
        which the ServiceAccount admission plugin refuses pods; returns ``name``."""
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            try:
                core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels)))
            except ApiException as exc:
                if exc.status != 409:  # 409: it exists already
                    raise
            self._wait(f"the token of ServiceAccount {name}/default", lambda: _has_token(core, name),
                       "kube-controller-manager")
        return name

    def logs(self) -> dict[str, Path]:
        """Each component's log file, by component name (etcd, kube-apiserver, ..., hollow-node-0, registry)."""
        return {name: c.log for name, c in self.components.items()}

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last ``lines`` lines of component ``name``'s log; for a Kubernetes component that died of a fatal
        error, those up to that error (klog's ``F`` line), not the goroutine dump after it."""
        try:
            text = self.components[name].log.read_text(errors="replace").splitlines()
        except (KeyError, OSError) as exc:
            return f"(no log for {name}: {exc})"
        fatal = [i for i, line in enumerate(text) if re.match(r"F\d{4} ", line)]
        end = fatal[-1] + 1 if fatal else len(text)
        return "\n".join(text[max(0, end - lines):end])

    # Start and stop.

    def start(self) -> Self:
        """Starts everything and waits until it answers; raises ControlPlaneError (after stopping what did
        start) if anything does not, with the end of the guilty component's log."""
        self._start_time = time.monotonic()
        atexit.register(self.stop)
        try:
            self._check_binaries()
            self._write_pki()
            for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "registry"):
                self._ports[name] = _free_port()
            self._write_auth()
            self._start_registry()
            self._start_etcd()
            self._wait("etcd to answer", lambda: _http_ok(f"http://127.0.0.1:{self._ports['etcd']}/health"), "etcd")
            self._start_apiserver()
            self._wait("the API server to be ready", lambda: self._https_ok("apiserver", "/readyz"), "kube-apiserver")
            self._start_controller_manager()
            self._start_scheduler()
            # Not before the API server is ready: a 1.20 kubelet exits if it cannot create its CSINode within
            # ~20s (it needs its Node registered first).
            for index, node in enumerate(self.node_names):
                self._start_hollow_node(index, node)
            self._grant_restricted_user()
            self._wait("the controller manager to be healthy", lambda: self._https_ok("controller-manager"),
                       "kube-controller-manager")
            self._wait("the scheduler to be healthy", lambda: self._https_ok("scheduler"), "kube-scheduler")
            self._wait("the registry to answer", lambda: _http_ok(f"http://{self.registry}/v2/"), "registry")
            self.namespace("default")
            self.namespace(RESTRICTED_NAMESPACE)
            with self.api_client() as api:
                self._wait(f"{len(self.node_names)} nodes to be Ready", lambda: self._nodes_ready(api),
                           *self.node_names)
        except BaseException as exc:
            self._fail_start(exc)
            raise
        self.started_in = time.monotonic() - self._start_time
        return self

    def stop(self) -> None:
        """Ends every process started (SIGTERM to its process group, SIGKILL after 10s) and removes the folder."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._end_processes()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # The components.

    def _check_binaries(self) -> None:
        missing = [str(self.bin_dir / b) for b in KUBE_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        missing += [str(p) for p in (ETCD, REGISTRY) if not os.access(p, os.X_OK)]
        missing += [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise ControlPlaneError(f"missing for the test cluster: {', '.join(missing)} "
                                    f"(run {BUILD_SCRIPT}, as root)")
        if self.bin_dir.resolve().is_relative_to("/tmp"):
            raise ControlPlaneError(f"{self.bin_dir}: the hollow nodes cannot run binaries under /tmp, where each "
                                    "sees a /tmp of its own")
        if os.geteuid() != 0:
            raise ControlPlaneError("the hollow nodes need root: network and mount namespaces of their own")

    def _write_pki(self) -> None:
        """A CA, one serving certificate (127.0.0.1, and the names a pod would use) for the API server, the
        controller manager and the scheduler, and the ServiceAccount token signing key."""
        pki = self.dir / "pki"
        pki.mkdir()
        names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"]
        alt_names = ",".join(["IP:127.0.0.1", f"IP:{SERVICE_IP}", *(f"DNS:{n}" for n in names)])
        (pki / "openssl.cnf").write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"
            "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier = hash\n"
            "[serving]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n"
            f"extendedKeyUsage = serverAuth\nsubjectAltName = {alt_names}\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-config", "openssl.cnf"]
        for args in (
            ["req", "-x509", *ec, "-extensions", "ca", "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
             "-subj", "/CN=mlserve-test-cluster-ca"],
            ["req", "-new", *ec, "-keyout", "serving.key", "-out", "serving.csr", "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "2",
             "-days", "7", "-extfile", "openssl.cnf", "-extensions", "serving", "-out", "serving.crt"],
            ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key"],
            ["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        ):
            result = subprocess.run(["openssl", *args], cwd=pki, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def _write_auth(self) -> None:
        """The static token file and a kubeconfig per user."""
        auth = self.dir / "auth"
        auth.mkdir()
        lines = [f'{self.admin_token},admin,admin,"system:masters"', f"{self.restricted_token},restricted,restricted"]
        # Each node acts as itself, as a kubelet does: the Node authorizer and the NodeRestriction admission
        # plugin let it change its own Node, Lease and the pods bound to it.
        lines += [f'{self._tokens[n]},system:node:{n},{n},"system:nodes"' for n in self.node_names]
        (auth / "tokens.csv").write_text("\n".join(lines) + "\n")
        (auth / "tokens.csv").chmod(0o600)
        kubeconfigs = self.dir / "kubeconfig"
        kubeconfigs.mkdir()
        self._write_kubeconfig(self.admin_kubeconfig, "admin", self.admin_token)
        self._write_kubeconfig(self.restricted_kubeconfig, "restricted", self.restricted_token)
        for node in self.node_names:
            # In the node's own /tmp: the only part of /tmp it sees (see _start_hollow_node).
            (self.dir / "nodes" / node / "tmp").mkdir(parents=True)
            self._write_kubeconfig(self.dir / "nodes" / node / "tmp" / "kubeconfig.yaml", node, self._tokens[node])

    def _write_kubeconfig(self, path: Path, user: str, token: str) -> None:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "mlserve-test", "cluster": {"server": self.server,
                                                              "certificate-authority-data": ca_data}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "mlserve-test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _start_registry(self) -> None:
        storage = self.dir / "registry"
        storage.mkdir()
        config = {
            "version": 0.1,
            "log": {"level": "info", "fields": {"service": "registry"}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            # A secret of our own: otherwise it makes one up and warns that several registries would disagree.
            "http": {"addr": self.registry, "secret": secrets.token_hex(16)},
        }
        path = self.dir / "registry.yaml"
        path.write_text(yaml.safe_dump(config))
        self._run("registry", [str(REGISTRY), "serve", str(path)])

    def _start_etcd(self) -> None:
        client_url = f"http://127.0.0.1:{self._ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self._ports['etcd-peer']}"
        self._run("etcd", [
            str(ETCD), "--name=default", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
        ])

    def _start_apiserver(self) -> None:
        pki, auth = self.dir / "pki", self.dir / "auth"
        self._run("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self._ports['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={self._ports['apiserver']}",
            "--advertise-address=127.0.0.1",
            # The `kubernetes` Service would get 127.0.0.1 as its endpoint, which Endpoints refuse (loopback):
            # without the reconciler the Service exists, with no endpoints (no pod here could reach it anyway).
            "--endpoint-reconciler-type=none",
            "--insecure-port=0",  # 1.20 still serves plain, unauthenticated HTTP on localhost:8080 by default
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--cert-dir={pki}",
            f"--token-auth-file={auth / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            # The default plugins (ServiceAccount among them) and NodeRestriction, as a kubeadm cluster has.
            "--enable-admission-plugins=NodeRestriction",
            # 1.20 requires an issuer and a signing key; the controller manager signs the (legacy, secret)
            # tokens that the ServiceAccount admission plugin waits for with the same key.
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
        ])

    def _component_flags(self, name: str) -> list[str]:
        """Flags the controller manager and the scheduler share: the admin kubeconfig (also to check who asks
        their own HTTPS endpoint), HTTPS on a loopback port with our certificate, no plain HTTP port (1.20 still
        opens one on all interfaces by default), no leader election (one of each)."""
        pki, kubeconfig = self.dir / "pki", self.admin_kubeconfig
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self._ports[name]}", "--port=0",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            "--leader-elect=false",
            # They authenticate callers by token (TokenReview): without this they also look for a front-proxy
            # CA in kube-system/extension-apiserver-authentication, which this API server has none of, and log
            # an error about it every few seconds.
            "--authentication-skip-lookup=true",
        ]

    def _start_controller_manager(self) -> None:
        pki = self.dir / "pki"
        self._run("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"), *self._component_flags("controller-manager"),
            # The tokens controller gives each ServiceAccount its token secret: without it the ServiceAccount
            # admission plugin refuses every pod ("no API token found for service account").
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
        ])

    def _start_scheduler(self) -> None:
        self._run("kube-scheduler", [str(self.bin_dir / "kube-scheduler"), *self._component_flags("scheduler")])

    def _start_hollow_node(self, index: int, name: str) -> None:
        """kubemark in network and mount namespaces of its own (see the module's docstring): the shell mounts
        the node's own /tmp and /etc/hosts, then waits for a line on stdin, sent once the node's loopback
        interface is up and forwards to the API server."""
        node_dir = self.dir / "nodes" / name
        node_ip = NODE_IPS.format(index + 1)
        (node_dir / "hosts").write_text(f"127.0.0.1\tlocalhost\n{node_ip}\t{name}\n")
        # /etc/hosts first: the file is under /tmp (as everything of ours), which the second mount hides: once
        # it is mounted the node sees nothing of this folder but its own tmp/, where its kubeconfig is.
        script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /tmp && shift 2 && read -r _ && exec "$@"'
        component = self._run(name, [
            "unshare", "--net", "--mount", "--propagation=private", "--", "/bin/sh", "-c", script, "sh",
            str(node_dir / "hosts"), str(node_dir / "tmp"),
            str(self.bin_dir / "kubemark"), "--morph=kubelet", f"--name={name}",
            "--kubeconfig=/tmp/kubeconfig.yaml",
            "--kubelet-read-only-port=0",  # the unauthenticated read-only API: not needed
        ], stdin=subprocess.PIPE)
        pid = component.process.pid
        own_netns = os.readlink("/proc/self/ns/net")
        self._wait(f"{name}'s network namespace", lambda: os.readlink(f"/proc/{pid}/ns/net") != own_netns, name)
        api_port = self._ports["apiserver"]

        def set_up_namespace() -> socket.socket:
            _configure_loopback(node_ip)
            return socket.create_server(("127.0.0.1", api_port))

        listener = _in_network_namespace(pid, set_up_namespace)
        forwarder = _Forwarder(listener, ("127.0.0.1", api_port))
        self._forwarders.append(forwarder)
        forwarder.start()
        assert component.process.stdin is not None
        try:
            component.process.stdin.write(b"go\n")
            component.process.stdin.close()
        except BrokenPipeError:  # its shell failed (a mount): _wait reports how
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(5)
            self._wait(f"{name} to start", lambda: False, name, timeout=0)

    def _nodes_ready(self, api: k8s.ApiClient) -> bool:
        """Whether every node is Ready; gives each node that has its CSINode a pod CIDR, 10.244.N.0/24.

        Why: a 1.20 kubelet is not Ready until it has created its CSINode (after registering its Node), and a
        hollow one reports its status every 10s, so it would say Ready only ~10s later. But a kubelet also
        reports at once when its Node first gets a pod CIDR. The controller manager's IPAM controller could
        allocate them (--allocate-node-cidrs) but starts 10s late, so this plays its part: nodes are Ready ~7s
        earlier, and have pod CIDRs as in a cluster whose network plugin gives them out."""
        core = k8s.CoreV1Api(api)
        # As JSON: the client's V1CSINodeSpec requires a list of drivers, where 1.20 sends null (no CSI driver).
        response: Any = k8s.StorageV1Api(api).list_csi_node(_preload_content=False)  # an HTTP response
        csi_nodes = {item["metadata"]["name"] for item in json.loads(response.data)["items"]}
        ready = 0
        for node in core.list_node().items:
            name = node.metadata.name if node.metadata else None
            if name not in self.node_names or not node.spec or not node.status:
                continue
            if not node.spec.pod_cidr and name in csi_nodes:
                cidr = POD_CIDRS.format(self.node_names.index(name) + 1)
                core.patch_node(name, {"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
            if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []):
                ready += 1
        return ready == len(self.node_names)

    def _grant_restricted_user(self) -> None:
        """Namespace ``models``, and a Role there allowing everything, bound to the user ``restricted``."""
        with self.api_client() as api:
            core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
            meta = k8s.V1ObjectMeta(name="restricted-all", namespace=RESTRICTED_NAMESPACE)
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=RESTRICTED_NAMESPACE)))
            rbac.create_namespaced_role(RESTRICTED_NAMESPACE, k8s.V1Role(metadata=meta, rules=[
                k8s.V1PolicyRule(api_groups=["*"], resources=["*"], verbs=["*"])]))
            rbac.create_namespaced_role_binding(RESTRICTED_NAMESPACE, k8s.V1RoleBinding(
                metadata=meta,
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="restricted-all"),
                subjects=[k8s.RbacV1Subject(api_group="rbac.authorization.k8s.io", kind="User", name="restricted")],
            ))

    # Processes and waiting.

    def _run(self, name: str, argv: list[str], stdin: int = subprocess.DEVNULL) -> Component:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                                       start_new_session=True)  # a process group of its own, for stop()
        component = self.components[name] = Component(name, process, log)
        return component

    def _wait(self, what: str, ready: Callable[[], object], *suspects: str, timeout: float = START_TIMEOUT) -> None:
        """Waits until ``ready()`` is true (an exception counts as false); raises ControlPlaneError with the
        end of the suspects' logs after ``timeout``, or at once, with its log, when a component exits."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            for component in self.components.values():
                code = component.process.poll()
                if code is not None:
                    raise ControlPlaneError(f"{component.name} exited with code {code} while waiting for {what}; "
                                            f"the end of its log:\n{self.log_tail(component.name)}")
            try:
                if ready():
                    if self.started_in is None:
                        self.timings[what] = round(time.monotonic() - self._start_time, 2)
                    return
            except Exception as exc:  # noqa: BLE001 - not ready yet; kept for the message
                last_error = exc
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s} ({self.components[s].log}):\n{self.log_tail(s)}"
                                  for s in suspects if s in self.components)
                raise ControlPlaneError(f"timed out after {timeout:g}s waiting for {what} "
                                        f"(last error: {last_error!r})\n{tails}")
            time.sleep(0.2)

    def _https_ok(self, port_name: str, path: str = "/healthz") -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return _http_ok(f"https://127.0.0.1:{self._ports[port_name]}{path}", context)

    def _end_processes(self) -> None:
        for component in reversed(list(self.components.values())):  # nodes first, etcd and registry last
            _end_process_group(component.process)
        for forwarder in self._forwarders:
            forwarder.close()

    def _fail_start(self, exc: BaseException) -> None:
        """Stops what started; keeps the logs (named in the error) and removes the rest of the folder."""
        logs = self.dir / "logs"
        self._end_processes()
        if logs.is_dir():
            kept = Path(tempfile.mkdtemp(prefix="mlskube-failed-logs-"))
            shutil.copytree(logs, kept, dirs_exist_ok=True)
            exc.add_note(f"the control plane's logs: {kept}")
        self.stop()


@contextlib.contextmanager
def running_control_plane(bin_dir: Path | str | None = None, nodes: int = 3) -> Iterator[ControlPlane]:
    """A started ControlPlane (binaries from ``bin_dir``, else kube_bin_dir()), stopped on leaving."""
    plane = ControlPlane(bin_dir if bin_dir is not None else kube_bin_dir(), nodes=nodes)
    with plane:
        yield plane.start()


def kube_bin_dir() -> Path:
    """The folder of the Kubernetes binaries: MLSERVE_KUBE_BIN, else what build-kubernetes prints (a build of
    ~10 minutes the first time on a machine, seconds once cached)."""
    if given := os.environ.get("MLSERVE_KUBE_BIN"):
        return Path(given)
    try:
        result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ControlPlaneError(f"{BUILD_SCRIPT} could not run: {exc}") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = "\n".join(result.stderr.splitlines()[-30:])
        raise ControlPlaneError(f"{BUILD_SCRIPT} exited with code {result.returncode} (`make kube` runs it):\n{tail}")
    return Path(lines[-1])


def start_for_tests(nodes: int = 3) -> ControlPlane:
    """Builds (or finds cached) binaries and starts a control plane; raises ControlPlaneError (a RuntimeError)
    if anything is missing or does not start. The caller stops it."""
    return ControlPlane(kube_bin_dir(), nodes=nodes).start()


# Helpers.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _has_token(core: k8s.CoreV1Api, namespace: str) -> bool:
    try:
        account = core.read_namespaced_service_account("default", namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return bool(account.secrets)


def _end_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the group the process leads, SIGKILL if the process is still there after 10s."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# Network namespaces: the hollow nodes'.

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCSIFADDR, _SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
_IFF_UP = 0x1
_libc = ctypes.CDLL(None, use_errno=True)


def _in_network_namespace(pid: int, work: Callable[[], T]) -> T:
    """``work()``'s value, run on a thread that joined the network namespace of process ``pid``: sockets it
    creates stay in that namespace. (Namespaces are per thread; this process's other threads are unaffected.)"""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into the network namespace of {pid}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            results.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{pid}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _configure_loopback(node_ip: str) -> None:
    """In a new network namespace: brings up its loopback interface (127.0.0.1) and adds ``node_ip``/32 to it,
    as alias lo:1 (ioctls, as ifconfig does: no iproute2 needed)."""

    def ifreq(name: str, payload: bytes) -> bytes:
        return struct.pack("16s24s", name.encode(), payload)

    def sockaddr(ip: str) -> bytes:
        return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack_from("16xH", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq("lo", b"")))[0]
        fcntl.ioctl(s, _SIOCSIFFLAGS, ifreq("lo", struct.pack("H", flags | _IFF_UP)))
        fcntl.ioctl(s, _SIOCSIFADDR, ifreq("lo:1", sockaddr(node_ip)))
        fcntl.ioctl(s, _SIOCSIFNETMASK, ifreq("lo:1", sockaddr("255.255.255.255")))


class _Forwarder:
    """Accepts connections on ``listener`` (in a node's network namespace) and pipes each to a new connection to
    ``target``, made from this process's own network namespace; a thread per connection, ended with it."""

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self.listener = listener
        self.target = target
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._accept, name=f"forward-{self.target[1]}", daemon=True).start()

    def close(self) -> None:
        """Ends the forwarding; the threads close the sockets (closing them here could hand their numbers to
        new files while a thread still waits on them)."""
        with self.lock:
            self.closed = True
            sockets = [self.listener, *self.connections]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() or select()

    def _accept(self) -> None:
        with self.listener:
            while True:
                try:
                    downstream, _ = self.listener.accept()
                except OSError:
                    if self.closed:
                        return
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    downstream.close()  # the API server does not answer (yet): the node retries
                    continue
                upstream.settimeout(None)
                with self.lock:
                    if self.closed:
                        downstream.close()
                        upstream.close()
                        return
                    self.connections.update((downstream, upstream))
                threading.Thread(target=self._pipe, args=(downstream, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(a, selectors.EVENT_READ, b)
                selector.register(b, selectors.EVENT_READ, a)
                while True:
                    for key, _ in selector.select():
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return  # one side closed: close both (HTTPS needs no half-closed connection)
                        key.data.sendall(data)
        except OSError:
            return
        finally:
            with self.lock:
                self.connections.difference_update((a, b))
            a.close()
            b.close()
